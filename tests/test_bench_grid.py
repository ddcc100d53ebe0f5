"""The calibration grid on the tiny random model: run, resume/skip, crash isolation, post-hoc cells, report."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from bayeslora.bench import grid as grid_mod
from bayeslora.bench.grid import Cell, GridError, Preset, make_config, read_results, run_grid
from bayeslora.bench.report import markdown_table, mean_std, tables_markdown, write_report
from bayeslora.methods import METHODS, BayesianMethod, MethodConfig

TINY = Preset("tiny", "test preset", max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, max_length=48,
              train_limit=16, eval_limit=10, fit_limit=8, eval_batch_size=5, datasets=("arith",), seeds=(1,))


class Crash(BayesianMethod):
    """A trained method whose preparation always fails."""

    name = "bench-crash"
    description = "test only: raises"
    config_cls = MethodConfig

    def prepare(self, base_model, adapter):
        raise RuntimeError("boom in prepare")


class FakePosthoc(BayesianMethod):
    """A post-hoc method that keeps the MLE adapter as it is."""

    name = "bench-posthoc"
    description = "test only: post-hoc identity"
    config_cls = MethodConfig
    posthoc = True


def fake_bayesianize(source, method, out, dataset=None, split=None, options=None, data_dir=None, model=None,
                     limit=None, seed=0, batch_size=8):
    shutil.copytree(source, out)
    (Path(out) / "posterior.safetensors").unlink(missing_ok=True)  # the MLE run's file names its method
    info = json.loads((Path(out) / "run.json").read_text())
    info.update(method=method, method_config={}, fit={"n_examples": 6, "time_s": 0.5})
    (Path(out) / "run.json").write_text(json.dumps(info))
    fake_bayesianize.calls.append((str(source), method, dataset, limit))
    fake_bayesianize.batch_sizes.append(batch_size)
    return Path(out)


fake_bayesianize.calls = []
fake_bayesianize.batch_sizes = []


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One grid of mle, a crashing method and a post-hoc method on the built-in task (OOD: arith-ood)."""
    out = tmp_path_factory.mktemp("grid")
    ood_file = out.parent / "colors.jsonl"
    ood_file.write_text("".join(json.dumps({"question": f"Color {i}?", "choices": ["red", "blue", "green"],
                                            "answer": i % 3}) + "\n" for i in range(6)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, Crash.name, Crash)
        mp.setitem(METHODS, FakePosthoc.name, FakePosthoc)
        mp.setitem(sys.modules, "bayeslora.posthoc", types.SimpleNamespace(bayesianize=fake_bayesianize))
        config = make_config(str(out), TINY, methods=["bench-posthoc", "bench-crash", "mle"],
                             model="tiny-random-llama", ood_train="arith", ood_tasks=["arith-ood"], command="test",
                             ood_files=[str(ood_file)])
        logs: list[str] = []
        rows = run_grid(config, log=logs.append)
        yield {"out": out, "config": config, "rows": rows, "logs": logs, "mp": mp}


def by_method(rows):
    return {r["method"]: r for r in rows}


def test_methods_ordered_mle_first_posthoc_last(grid):
    assert grid["config"].methods == ["mle", "bench-crash", "bench-posthoc"]


def test_rows_have_metrics_times_and_memory(grid):
    rows = by_method(read_results(grid["out"]))
    mle = rows["mle"]
    assert mle["status"] == "ok" and mle["steps"] == 2
    assert set(mle["metrics"]) == {"validation", "test", "ood:arith-ood", "ood:colors"}
    assert mle["metrics"]["ood:colors"]["n"] == 6 and mle["metrics"]["ood:colors"]["ood_reference"] == "test"
    val = mle["metrics"]["validation"]
    for key in ("acc", "ece", "nll", "brier", "aurc", "acc_at_80cov", "eval_time_s"):
        assert isinstance(val[key], float), key
    assert val["n"] == 10
    ood = mle["metrics"]["ood:arith-ood"]
    assert ood["auroc_ood_epistemic"] == 0.5 and 0 <= ood["auroc_ood_entropy"] <= 1
    assert mle["train_time_s"] > 0 and mle["wall_time_s"] > 0 and mle["peak_rss_mb"] > 0


def test_crash_is_recorded_and_grid_goes_on(grid):
    rows = by_method(grid["rows"])
    assert rows["bench-crash"]["status"] == "error"
    assert "boom in prepare" in rows["bench-crash"]["error"]
    assert (grid["out"] / "cells" / "bench-crash__arith__s1.log").read_text().count("RuntimeError") >= 1
    assert rows["bench-posthoc"]["status"] == "ok"  # the cell after the crash ran


def test_posthoc_starts_from_the_mle_run(grid):
    source, method, dataset, limit = fake_bayesianize.calls[0]
    assert source.endswith("runs/mle-arith-s1") and method == "bench-posthoc" and dataset == "arith" and limit == 8
    assert fake_bayesianize.batch_sizes[0] == 5  # the preset's eval_batch_size, not bayesianize's default
    row = by_method(grid["rows"])["bench-posthoc"]
    assert row["metrics"]["validation"]["n"] == 10
    # the post-hoc cost unit: one MLE epoch over the 6 fit questions = 2 steps of 4 at the MLE cell's step time
    assert row["fit_epoch_s"] == pytest.approx(row["mle_train_time_s"] / row["mle_steps"] * 2, rel=1e-3, abs=1e-3)
    # ... against the fit's own time (run.json), not the whole bayesianize call with the model's loading
    assert row["fit_only_s"] == 0.5 and row["fit_time_s"] > 0
    from bayeslora.bench.report import cost_table

    cost = cost_table([row])
    cells = dict(zip(cost["columns"], cost["rows"]["bench-posthoc"], strict=True))
    assert cells["post-hoc fit s"] == "0.5"
    assert float(cells["fit / MLE epoch"].split()[0]) == pytest.approx(0.5 / row["fit_epoch_s"], rel=0.01, abs=0.01)


def test_a_posthoc_method_fitted_on_validation_gets_all_of_it(grid, tmp_path):
    """The preset's fit limit is for training questions: a method whose fit split is validation (temperature
    scaling) fits on the whole split, since a split's first questions are no sample of it."""
    class ValidationPosthoc(FakePosthoc):
        name = "bench-posthoc-val"
        fit_split = "validation"

    grid["mp"].setitem(METHODS, ValidationPosthoc.name, ValidationPosthoc)
    config = dataclasses.replace(grid["config"], out=str(tmp_path))
    source = grid["out"] / "runs" / "mle-arith-s1"
    grid_mod.ensure_posthoc(config, Cell(ValidationPosthoc.name, "arith", 1), source, {})
    assert fake_bayesianize.calls[-1] == (str(source), ValidationPosthoc.name, "arith", None)


def test_rerun_skips_finished_cells_and_retries_failed(grid):
    out, config = grid["out"], grid["config"]
    cell_file = out / "cells" / "mle__arith__s1.json"
    before = cell_file.stat().st_mtime_ns
    logs: list[str] = []
    run_grid(config, log=logs.append)
    assert cell_file.stat().st_mtime_ns == before
    assert any("mle__arith__s1: done earlier, skipped" in m for m in logs)
    assert any("bench-crash__arith__s1: FAILED" in m for m in logs)  # retried, fails again


def test_lost_cell_record_reuses_the_finished_run(grid):
    out, config = grid["out"], grid["config"]
    log_file = out / "runs" / "mle-arith-s1" / "train_log.jsonl"
    trained = log_file.read_text()
    (out / "cells" / "mle__arith__s1.json").unlink()
    run_grid(config, log=lambda m: None)
    assert log_file.read_text() == trained  # evaluated again, not retrained
    assert by_method(read_results(out))["mle"]["status"] == "ok"


def test_a_second_run_with_other_methods_keeps_both_commands_and_the_row_order(grid):
    from bayeslora.bench.grid import grid_commands

    out = grid["out"]
    again = make_config(str(out), TINY, methods=["bench-posthoc"], model="tiny-random-llama", ood_train="arith",
                        ood_tasks=["arith-ood"], command="test --methods bench-posthoc",
                        ood_files=grid["config"].ood_files)
    run_grid(again, log=lambda m: None)
    assert grid_commands(out)[-2:] == ["test", "test --methods bench-posthoc"]
    run_grid(again, log=lambda m: None)  # the same command again is not repeated
    assert grid_commands(out).count("test --methods bench-posthoc") == 1
    methods = [r["method"] for r in read_results(out)]
    assert methods.index("mle") < methods.index("bench-crash") < methods.index("bench-posthoc")


def test_other_protocol_in_same_folder_is_refused(grid):
    other = make_config(str(grid["out"]), TINY, methods=["mle"], model="tiny-random-llama", ood_train="obqa")
    with pytest.raises(GridError, match="another preset or model"):
        run_grid(other)
    reworded = dataclasses.replace(TINY, description="the same budget, described in other words")
    same = make_config(str(grid["out"]), reworded, methods=["mle"], model="tiny-random-llama", ood_train="arith",
                       ood_tasks=["arith-ood"])
    assert same.protocol() == grid["config"].protocol()
    saved = json.loads((grid["out"] / "grid.json").read_text())  # a folder written when the wording was in it
    saved["protocol"]["preset"]["description"] = "old words"
    del saved["protocol"]["preset"]["dtype"]  # and before presets named a dtype (theirs was the device's default)
    (grid["out"] / "grid.json").write_text(json.dumps(saved))
    run_grid(same, log=lambda m: None)
    in_float32 = make_config(str(grid["out"]), dataclasses.replace(TINY, dtype="float32"), methods=["mle"],
                             model="tiny-random-llama", ood_train="arith", ood_tasks=["arith-ood"])
    with pytest.raises(GridError, match="another preset or model"):
        run_grid(in_float32)


def test_report_files(grid):
    paths = write_report(grid["out"], command="bayeslora bench calibration --out X")
    table = paths["table"].read_text()
    assert "| mle |" in table
    assert "ECE (%)" in table and "AUROC epistemic" in table and "### Failed cells" in table
    assert "fit / MLE epoch" in table and "eval / MLE eval" in table and "Sum of the cells' wall times" in table
    from bayeslora.bench.report import cost_table

    cost = cost_table(read_results(grid["out"]))
    assert cost["rows"]["mle"][cost["columns"].index("eval / MLE eval")] == "1.00"
    assert "| arith / mle |" in table and "| arith / bench-posthoc |" in table and "| arith-ood / mle |" in table
    assert "| colors / mle |" in table
    figures = sorted(p.name for p in paths["figures"].iterdir())
    assert figures == ["reliability_bench-posthoc-arith.png", "reliability_mle-arith.png", "risk_coverage_arith.png"]
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page and "boom in prepare" in page


def test_subprocess_cell_error_row(grid):
    """The child-process path end to end: the child reports the failure of an unknown method as a row."""
    row = grid_mod.run_cell_subprocess(grid["config"], Cell("no-such-method", "arith", 1))
    assert row["status"] == "error" and "no-such-method" in row["error"] and row["peak_rss_mb"] > 0


def test_subprocess_hard_crash_is_recorded(grid, monkeypatch):
    monkeypatch.setattr(grid_mod, "CELL_COMMAND", [sys.executable, "-c", "import sys; print('dying'); sys.exit(137)"])
    row = grid_mod.run_cell_subprocess(grid["config"], Cell("mle", "arith", 7))
    assert row["status"] == "error" and "exited with code 137" in row["error"]
    assert "dying" in (grid["out"] / "cells" / "mle__arith__s7.log").read_text()


def test_a_terminated_grid_stops_its_running_cell(tmp_path):
    """SIGTERM to a grid waiting on a cell's process ends that process too (an orphaned cell kept the GPU's memory)."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = ("import sys; from bayeslora.bench import grid as g; "
              f"g._run_child([sys.executable, '-c', {child!r}, 'request', 'result'])")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the cell's process outlived its grid")


def test_make_config_errors(tmp_path):
    with pytest.raises(GridError, match="Unknown preset"):
        make_config(str(tmp_path), "huge")
    with pytest.raises(GridError, match="Unknown method"):
        make_config(str(tmp_path), TINY, methods=["nope"])
    with pytest.raises(GridError, match="Unknown dataset"):
        make_config(str(tmp_path), TINY, methods=["mle"], datasets=["nope"])
    with pytest.raises(GridError, match="one split"):
        make_config(str(tmp_path), TINY, methods=["mle"], datasets=["questions.jsonl"])
    with pytest.raises(GridError, match="does not exist"):
        make_config(str(tmp_path), TINY, methods=["mle"], ood_files=[str(tmp_path / "missing.jsonl")])


def test_table_mean_std_over_seeds():
    rows = [{"method": "mle", "dataset": "d", "seed": s, "status": "ok",
             "metrics": {"validation": {"acc": a, "ece": e}}} for s, a, e in ((1, 0.5, 10.0), (2, 0.7, 20.0))]
    rows.append({"method": "x", "dataset": "d", "seed": 1, "status": "error", "error": "E"})
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([1.0])[1] is None
    md = tables_markdown(rows)
    assert "| dataset / method | ACC (%) | ECE (%) | NLL |" in md
    assert "| d / mle | 60.00 ± 14.14 | 15.00 ± 7.07 | – |" in md
    assert md.splitlines()[[i for i, line in enumerate(md.splitlines()) if "| d / mle |" in line][0]].endswith(
        "| 1, 2 |")  # the seeds the row averages, not only how many
    assert "- x / d / seed 1: E" in md
    assert markdown_table({"columns": ["a"], "rows": {"m": ["1"]}}) == "| method | a |\n|---|---:|\n| m | 1 |"


def test_subsample_is_fixed_and_ordered():
    items = list(range(50))
    a, b = grid_mod.subsample(items, 10), grid_mod.subsample(items, 10)
    assert a == b == sorted(a) and len(a) == 10
    assert grid_mod.subsample(items, None) == items and grid_mod.subsample(items, 80) == items
    from bayeslora.tasks import random_subset

    assert random_subset(items, 10) == a  # `bayeslora eval --sample 10` evaluates the grid's subset


def test_cell_keys_are_safe():
    assert Cell("mle", "/tmp/my data.jsonl", 2).key == "mle__my_data__s2"


def test_hand_over_files_of_a_killed_cell_are_not_rows(grid):
    """A grid killed mid-cell leaves ``KEY.request.json`` behind; the results must still be written."""
    leftover = grid["out"] / "cells" / "mle__arith__s9.request.json"
    leftover.write_text(json.dumps({"config": {}, "cell": {"method": "mle", "dataset": "arith", "seed": 9}}))
    try:
        rows = grid_mod.collect_rows(grid["out"])
        assert rows and all("status" in r for r in rows)
        grid_mod.write_results(grid["out"])
    finally:
        leftover.unlink()


def test_git_commit_marks_uncommitted_source(tmp_path):
    """A cell run on uncommitted code records ``COMMIT+dirty``, not the commit it does not match."""
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    clean = grid_mod.git_commit(package)
    assert clean != "unknown" and not clean.endswith("+dirty")
    (package / "m.py").write_text("x = 2\n")
    assert grid_mod.git_commit(package) == clean + "+dirty"
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-repo"
    outside.mkdir()
    assert grid_mod.git_commit(outside) == "unknown"


def test_ood_files_added_on_a_rerun_reach_the_finished_cells(grid):
    """A finished cell is evaluated on a new --ood file without training again; its other numbers stay."""
    out, config = grid["out"], grid["config"]
    shapes = out.parent / "shapes.jsonl"
    shapes.write_text("".join(json.dumps({"question": f"Shape {i}?", "choices": ["round", "square"],
                                          "answer": i % 2}) + "\n" for i in range(4)))
    before = by_method(read_results(out))["mle"]
    log_file = out / "runs" / "mle-arith-s1" / "train_log.jsonl"
    trained = log_file.read_text()
    more = dataclasses.replace(config, ood_files=[*config.ood_files, str(shapes)])
    logs: list[str] = []
    run_grid(more, log=logs.append)
    assert any("mle__arith__s1: done earlier, adding ood:shapes" in m for m in logs), logs
    after = by_method(read_results(out))["mle"]
    assert log_file.read_text() == trained
    assert after["metrics"]["ood:shapes"]["n"] == 4 and after["metrics"]["ood:shapes"]["ood_reference"] == "test"
    assert {k: v for k, v in after["metrics"].items() if k != "ood:shapes"} == before["metrics"]
    assert after["wall_time_s"] == before["wall_time_s"] and after["train_time_s"] == before["train_time_s"]
    assert "ood:shapes" in by_method(read_results(out))["bench-posthoc"]["metrics"]
    logs.clear()
    run_grid(more, log=logs.append)
    assert any("mle__arith__s1: done earlier, skipped" in m for m in logs), logs


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "expected a JSON object"),
    ('{"dataset": "d", "seed": 1, "status": "ok", "metrics": {}}', "'method' should be a string"),
    ('{"method": "m", "dataset": "d", "seed": "1", "status": "ok", "metrics": {}}', "'seed' should be an integer"),
    ('{"method": "m", "dataset": "d", "seed": 1, "status": "ok", "metrics": [1]}', "'metrics' should map"),
])
def test_a_malformed_results_row_is_named(tmp_path, line, problem):
    good = json.dumps({"method": "m", "dataset": "d", "seed": 1, "status": "ok", "metrics": {"validation": {}}})
    (tmp_path / "results.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(GridError, match=f"results.jsonl:2 is not a grid cell's row: {problem}"):
        read_results(tmp_path)


def test_figures_name_their_seeds(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bayeslora.bench import report

    rows = []
    for method, seeds in (("mle", (1, 2)), ("blob", (1,))):
        for seed in seeds:
            rows.append({"method": method, "dataset": "d", "seed": seed, "status": "ok",
                         "metrics": {"validation": {"acc": 0.5}}})
            cell_dir = tmp_path / "cells" / Cell(method, "d", seed).key
            cell_dir.mkdir(parents=True)
            save_file({"probs": torch.full((4, 2), 0.5), "labels": torch.zeros(4, dtype=torch.long)},
                      str(cell_dir / "validation.safetensors"))
    titles, legends = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("bayeslora.plots.reliability_diagram", lambda p, y, path, title="": titles.append(title) or path)
        mp.setattr(report, "risk_coverage_plot", lambda curves, path, title="": legends.append((title, list(curves)))
                   or path)
        report.make_figures(tmp_path, rows)
    assert titles == ["mle on d (validation, seeds 1, 2 pooled)", "blob on d (validation, seed 1)"]
    assert legends == [("Selective prediction on d (validation, seeds 1, 2 pooled)", ["mle", "blob, seed 1"])]
