"""The benchmark scripts: ``bench/generation_bench.py`` (every row decodes, chunking changes no number, the report is
written), ``bench/generation_selective.py`` (the answer judge, the metrics, a run end to end) and
``scripts/eval_table.py``."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from bayeslora.config import TrainConfig
from bayeslora.train import train

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "generation_bench"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rank_corr_and_common_prefix():
    bench = _bench()
    assert bench.rank_corr([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert bench.rank_corr([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert bench.rank_corr([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)  # 1 - 6 * 2 / 60
    assert bench.rank_corr([1.0, 2.0], [1.0, 2.0]) is None
    assert bench.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and bench.common_prefix([], [1]) == 0


def test_generation_bench_on_a_tiny_blob_run(tmp_path):
    config = TrainConfig(model="tiny-random-llama", dataset="arith", method="blob", max_steps=1, batch_size=2,
                         train_limit=4, save_every=0, max_length=64, method_options={"init_eps": 0.5})
    run_dir = train(config, tmp_path / "blob", progress=False)
    out = tmp_path / "gen.md"
    assert _bench().main([str(run_dir), "--dataset", "arith", "--prompts", "2", "--max-tokens", "3",
                          "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) >= {"deterministic (S=1)", "MC S=10", "MC S=10, chunks of 2", "MC S=10, prompt=mean",
                         "antithetic S=2", "head S=10"}
    assert rows["deterministic (S=1)"]["mean_epistemic"] == 0 and rows["MC S=10"]["mean_epistemic"] > 0
    # the same samples decoded 2 rows at a time: the same numbers
    assert abs(rows["MC S=10, chunks of 2"]["mean_epistemic"] - rows["MC S=10"]["mean_epistemic"]) < 1e-5
    assert all(len(r["seconds"]) == 2 and r["cost_vs_deterministic"] > 0 for r in rows.values())
    text = out.read_text()
    assert "| head S=10 |" in text and "python bench/generation_bench.py" in text
    det_row = next(line for line in text.splitlines() if line.startswith("| deterministic (S=1) |"))
    assert det_row.split("|")[6].strip() == "–"  # no rank correlation, and no token count beside the dash


def test_generation_bench_rows_for_tfb_and_row_selection():
    """A TFB run gets the linearized rows (its glm predictive), BLoB does not; --rows keeps the rows it names plus
    the deterministic and reference rows, and names an unknown row."""
    from bayeslora.methods import get_method_class

    bench = _bench()
    tfb = bench.rows_for(get_method_class("tfb").config_cls())
    names = [row.name for row in tfb]
    assert {"linearized S=4", "linearized S=2", "antithetic S=4"} <= set(names) and "head S=10" not in names
    assert all(row.options == {"predictive": "glm"} for row in tfb if row.name.startswith("linearized"))
    assert not any(n.startswith("linearized") for n in
                   (row.name for row in bench.rows_for(get_method_class("blob").config_cls())))
    picked = bench.select_rows(tfb, "linearized S=4, antithetic S=4")
    assert [row.name for row in picked] == ["deterministic (S=1)", "MC S=10", "antithetic S=4", "linearized S=4"]
    assert bench.select_rows(tfb, None) == tfb
    with pytest.raises(ValueError, match="Unknown rows.*nope"):
        bench.select_rows(tfb, "nope")


def test_generation_bench_refuses_a_run_without_samples(tmp_path):
    config = TrainConfig(model="tiny-random-llama", dataset="arith", method="mle", max_steps=1, batch_size=2,
                         train_limit=4, save_every=0, max_length=64)
    run_dir = train(config, tmp_path / "mle", progress=False)
    with pytest.raises(SystemExit, match="'mle' run"):
        _bench().main([str(run_dir), "--dataset", "arith", "--out", str(tmp_path / "gen.md")])
    assert not (tmp_path / "gen.md").exists()


def test_selective_judge_and_metrics():
    sel = _bench("generation_selective")
    choices = ["Sunlight is the source of energy.", "Most ecosystems are on land.", "Carbon dioxide."]
    assert sel.normalize("The Sun's light, mostly!") == ["sun", "s", "light", "mostly"]
    assert sel.judge(" sunlight is the source of energy", choices, 0, 0.5)[:2] == (True, 0)
    assert sel.judge(" Carbon dioxide", choices, 0, 0.5)[:2] == (False, 2)
    assert not sel.judge(" energy", choices, 0, 0.5)[0]  # the gold choice is best but its F1 (0.4) is too low
    assert not sel.judge(" energy land", choices, 0, 0.1)[0]  # a tie between two choices is not an answer
    assert not sel.judge("", choices, 0, 0.0)[0]
    m = sel.selective_metrics([0.9, 0.1, 0.8, 0.2], [False, True, False, True])
    assert m["auroc_errors"] == 1.0 and m["acc_at_50"] == 1.0 and m["aurc"] < 0.3
    assert math.isnan(sel.selective_metrics([0.5, 0.5], [True, True])["auroc_errors"])  # no wrong answer: NaN


def test_generation_selective_on_a_tiny_blob_run(tmp_path):
    config = TrainConfig(model="tiny-random-llama", dataset="arith", method="blob", max_steps=1, batch_size=2,
                         train_limit=4, save_every=0, max_length=64, method_options={"init_eps": 0.5})
    run_dir = train(config, tmp_path / "blob", progress=False)
    out = tmp_path / "sel.md"
    sel = _bench("generation_selective")
    assert sel.main([str(run_dir), "--dataset", "arith", "--questions", "3", "--max-tokens", "3",
                     "--rows", "det,anti2,mc4,head10", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["deterministic (S=1)", "antithetic S=2", "MC S=4", "head S=10"]
    det = report["answers"]["deterministic (S=1)"]
    assert len(det) == 3 and all(a["confidence"]["mean_epistemic"] == 0 for a in det)
    assert all(a["confidence"]["n_samples"] == 4 for a in report["answers"]["MC S=4"])
    assert any(a["confidence"]["mean_epistemic"] > 0 for a in report["answers"]["MC S=4"])
    assert all(set(r["uncertainty"]) == set(sel.UNCERTAINTIES) for r in rows.values())
    assert "| antithetic S=2 |" in out.read_text()
    with pytest.raises(SystemExit, match="Unknown row"):
        sel.main([str(run_dir), "--dataset", "arith", "--rows", "det,nope", "--out", str(out)])
    with pytest.raises(SystemExit, match="does not exist"):  # a message, not a traceback
        sel.main([str(tmp_path / "nope"), "--dataset", "arith", "--out", str(out)])
    with pytest.raises(SystemExit, match="Unknown dataset"):
        sel.main([str(run_dir), "--dataset", "no-such-task", "--out", str(out)])


def _script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_eval_table_reads_eval_folders(tmp_path):
    """scripts/eval_table.py: mean ± std per row from `bayeslora eval` folders; mismatched folders are refused."""
    def folder(name, acc, n=200):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"n": n, "acc": acc, "ece": 10.0 * acc, "nll": 1.0, "brier": 0.5,
                                                    "mean_epistemic": 0.0, "dataset": "arc-e", "split": "test"}))
        return str(d)

    out = tmp_path / "frag.md"
    table = _script("eval_table")
    assert table.main(["--row", "a=b", ",".join([folder("x", 0.4), folder("y", 0.5)]), "--title", "T",
                       "--command", "bayeslora eval X", "--md", str(out)]) == 0
    text = out.read_text()
    assert "| a=b | 2 | 45.0 ± 7.1 | 4.5 ± 0.7 |" in text and "bayeslora eval X" in text
    with pytest.raises(SystemExit, match="different questions"):
        table.main(["--row", "a", ",".join([folder("p", 0.4), folder("q", 0.4, n=100)]), "--title", "T",
                    "--md", str(tmp_path / "bad.md")])
    with pytest.raises(SystemExit, match="not found"):
        table.main(["--row", "a", str(tmp_path / "missing"), "--title", "T", "--md", str(tmp_path / "bad.md")])
    assert not (tmp_path / "bad.md").exists()


def test_every_script_imports(monkeypatch):
    """The research scripts keep up with the package (an import that moved is an error here, not in a long run)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    for path in sorted((ROOT / "scripts").glob("*.py")):
        _script(path.stem)


def _sweep_file(path, probs, labels, grid):
    from safetensors.torch import save_file

    save_file({"grid": grid, "probs": probs, "adapter": probs[-1].clone(), "labels": labels}, str(path),
              metadata={"run": f"runs/{path.stem}"})


def test_laplace_prior_rules_pick_and_report(tmp_path, monkeypatch):
    """scripts/laplace_prior_rules.py: argmin takes the lowest mean validation NLL, 1se the strongest prior within
    one standard error of it; the report scores each pick on the test sweep."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    rules = _script("laplace_prior_rules")
    nll = torch.tensor([[3.0, 3.0, 3.0, 3.0], [1.0, 1.2, 0.8, 1.0], [1.3, 1.2, 0.6, 1.3], [2.0, 1.8, 2.2, 2.0]])
    assert rules.pick(nll, "argmin") == 1  # mean 1.0
    assert rules.pick(nll, "1se") == 2  # mean 1.1: 0.1 above, under the paired difference's standard error (0.12)
    nll[2] = torch.tensor([1.1, 1.3, 0.9, 1.1])  # the same mean, but a constant difference: no error to hide in
    assert rules.pick(nll, "1se") == 1
    grid = torch.logspace(-1, 2, 4, dtype=torch.float64)
    # sweeps of 4 identical questions (label 0): the strongest prior (100) gives the label 0.9, the best NLL
    conf = torch.tensor([0.3, 0.7, 0.6, 0.9])
    probs = torch.stack([torch.stack([torch.tensor([c, 1 - c])] * 4) for c in conf]).float()
    labels = torch.zeros(4, dtype=torch.long)
    val = tmp_path / "val.safetensors"
    test = tmp_path / "test.safetensors"
    _sweep_file(val, probs, labels, grid)
    _sweep_file(test, probs, labels, grid)
    out = tmp_path / "frag.md"
    rules.main(["report", "--pair", str(val), str(test), "--k", "2", "3", "--draws", "5", "--title", "T",
                "--command", "sweep X", "--md", str(out)])
    text = out.read_text()
    assert "# T" in text and "sweep X" in text and "| test | argmin, all 4 | 100 | 100.0 | 10.0 | 0% |" in text
    assert "| test | argmin, 2 random |" in text and "| test | 1se, 3 random |" in text
    with pytest.raises(SystemExit, match="fewer than --k"):
        rules.main(["report", "--pair", str(val), str(test), "--k", "9"])
    gen = torch.Generator().manual_seed(0)
    assert sorted(rules._draw(4, 4, False, gen).tolist()) == [0, 1, 2, 3]  # without replacement: a permutation
    boot = torch.stack([rules._draw(4, 4, True, gen) for _ in range(50)])
    assert boot.min() >= 0 and boot.max() <= 3 and any(len(set(row.tolist())) < 4 for row in boot)  # repeats
    rules.main(["report", "--pair", str(val), str(test), "--k", "2", "--replace", "--draws", "5", "--title", "T",
                "--md", str(out)])
    assert "with replacement" in out.read_text()


def test_laplace_prior_rules_sweep_shares_jacobians(tmp_path, monkeypatch):
    """One sweep of two Laplace fits of one adapter gives each fit the sweep it gets alone; a fit of another
    adapter is refused."""
    import torch
    from safetensors.torch import load_file

    from bayeslora.posthoc import bayesianize

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    rules = _script("laplace_prior_rules")
    runs = []
    for seed in (0, 1):
        config = TrainConfig(model="tiny-random-llama", dataset="arith", max_steps=2, batch_size=4, train_limit=8,
                             save_every=0, seed=seed)
        runs.append(train(config, tmp_path / f"mle{seed}", progress=False))
    fits = [bayesianize(runs[0], "laplace", tmp_path / f"lap{n}", options={"n_fit": n, "prior_precision": 1.0},
                        limit=8, seed=n) for n in (3, 8)]
    other = bayesianize(runs[1], "laplace", tmp_path / "other", options={"prior_precision": 1.0}, limit=8)
    common = ["--split", "validation", "--limit", "6", "--batch-size", "4"]
    rules.main(["sweep", *map(str, fits), *common, "--out", str(tmp_path / "a.st"), str(tmp_path / "b.st")])
    rules.main(["sweep", str(fits[1]), *common, "--out", str(tmp_path / "b-alone.st")])
    a, b, alone = (load_file(str(tmp_path / n)) for n in ("a.st", "b.st", "b-alone.st"))
    assert a["probs"].shape == (len(rules.GRID), 6, 4)
    torch.testing.assert_close(b["probs"], alone["probs"])
    assert torch.equal(a["adapter"], b["adapter"]) and not torch.allclose(a["probs"], b["probs"])
    with pytest.raises(SystemExit, match="another adapter"):
        rules.main(["sweep", str(fits[0]), str(other), *common, "--out", str(tmp_path / "x"), str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="one per run"):
        rules.main(["sweep", str(fits[0]), str(fits[1]), *common, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
