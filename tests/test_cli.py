from __future__ import annotations

import json

import pytest

from bayeslora.cli import build_parser, main


def _train(tmp_path, *extra):
    return main(["train", "--model", "tiny-random-llama", "--dataset", "arith", "--max-steps", "2", "--no-progress",
                 "--out", str(tmp_path / "run"), *extra])


def test_train_then_eval(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert main(["eval", str(tmp_path / "run"), "--dataset", "arith-ood", "--limit", "12"]) == 0
    out = tmp_path / "run" / "eval" / "arith-ood-validation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 12 and 0 <= metrics["acc"] <= 1 and metrics["ece"] >= 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"id", "probs", "label", "confidence", "epistemic", "aleatoric", "total"} <= rows[0].keys()
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["questions"] == "first 12"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--dataset", "arith-ood", "--limit", "4", "--no-progress"]) == 0
    assert f"replacing the evaluation in {out}" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["n"] == 4


def test_eval_writes_strict_json_when_a_metric_is_undefined(tmp_path, capsys):
    """One question: the misclassification AUROC is undefined (NaN); metrics.json and the printed line say null."""
    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert _train(tmp_path) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--dataset", "arith-ood", "--limit", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "predict" not in captured.err  # --no-progress
    metrics = strict((tmp_path / "run" / "eval" / "arith-ood-validation" / "metrics.json").read_text())
    assert metrics["n"] == 1 and metrics["auroc_misclassification"] is None
    assert strict(captured.out.splitlines()[0])["auroc_misclassification"] is None


def test_eval_sample_takes_a_fixed_random_subset(tmp_path, capsys):
    """--sample N: the same random N questions every time (in their order), not the split's first N."""
    from bayeslora.tasks import load_task, random_subset

    assert _train(tmp_path) == 0
    ids = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["eval", str(tmp_path / "run"), "--dataset", "arith-ood", "--sample", "12", "--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["questions"] == "random 12 of 1200 (fixed draw)"
        ids.append([json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()])
    split = load_task("arith-ood", "validation")
    assert ids[0] == ids[1] == [ex.id for ex in random_subset(split, 12)] != [ex.id for ex in split[:12]]
    capsys.readouterr()
    for extra, match in ((["--limit", "5", "--sample", "5"], "not both"), (["--sample", "0"], "--sample >= 1")):
        assert main(["eval", str(tmp_path / "run"), "--dataset", "arith-ood", *extra]) == 2
        assert match in capsys.readouterr().err


def test_methods_lists_name_and_description(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.split()[0] == "mle" and len(line.split()) > 2 for line in lines)


@pytest.mark.parametrize("args,match", [
    (["train", "--method", "nope", "--model", "tiny-random-llama", "--out", "{tmp}/a"], "Unknown method 'nope'"),
    (["train", "--dataset", "nope", "--model", "tiny-random-llama", "--out", "{tmp}/b"], "Unknown dataset"),
    (["train", "--model", "not-a-model", "--out", "{tmp}/c"], "Unknown model spec"),
    (["train", "--model", "tiny-random-llama", "--batch-size", "0", "--out", "{tmp}/d"], "batch_size"),
    (["train", "--model", "tiny-random-llama", "--option", "nonsense", "--out", "{tmp}/e"], "KEY=VALUE"),
    (["train", "--model", "tiny-random-llama", "--option", "zzz=1", "--out", "{tmp}/f"], "Unknown option"),
    (["train", "--model", "tiny-random-llama", "--samples", "-1", "--out", "{tmp}/g"], "n_samples"),
    (["eval", "{tmp}/missing"], "does not exist"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, args, match):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and match in err


def test_eval_of_a_corrupted_run(tmp_path, capsys):
    assert _train(tmp_path) == 0
    (tmp_path / "run" / "run.json").write_text("{broken")
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "corrupted" in capsys.readouterr().err
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": "tiny-random-llama", "method": "mle",
                                                           "format": "cloze"}))
    (tmp_path / "run" / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["eval", str(tmp_path / "run"), "--dataset", "arith", "--limit", "2"]) == 2
    assert "adapter" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    ('["model", "method", "format"]', "holds a JSON list, not an object"),
    ('"a string"', "holds a JSON str, not an object"),
    ('{"model": "tiny-random-llama", "method": ["mle"], "format": "cloze"}', "'method' should be a string"),
    ('{"model": "tiny-random-llama", "method": "mle", "format": "cloze", "max_length": "abc"}',
     "'max_length' should be a positive integer"),
    ('{"model": "tiny-random-llama", "method": "mle", "format": "cloze", "max_length": 0}',
     "'max_length' should be a positive integer"),
    ("[" * 100_000, "not readable JSON (RecursionError)"),
])
def test_a_run_json_of_the_wrong_shape_is_one_line(tmp_path, capsys, content, problem):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(content)
    for command in (["eval", str(tmp_path / "run")],
                    ["calibrate", str(tmp_path / "run"), "--out", str(tmp_path / "t")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err and "corrupted" in err


def test_every_subcommand_documents_its_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_dtype_flags_offer_the_models_dtypes():
    """The CLI lists its --dtype choices without importing torch; they must stay those of ``models.DTYPES``."""
    import argparse

    from bayeslora.cli import build_parser
    from bayeslora.models import DTYPES

    def choices(parser: argparse.ArgumentParser, *path: str) -> list:
        for name in path:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        return next(a.choices for a in parser._actions if a.dest == "dtype")

    assert choices(build_parser(), "train") == list(DTYPES)
    assert choices(build_parser(), "bench", "speed") == list(DTYPES)


def test_point_mass_note_gives_the_method_s_own_advice():
    from bayeslora.evaluate import collapse_note
    from bayeslora.methods import get_method_class

    flat = {"n_samples": 10, "mean_epistemic": 1e-5}
    assert collapse_note({**flat, "mean_epistemic": 0.1}, "x") is None and collapse_note({"n_samples": 0}, "x") is None
    laplace, blob = (collapse_note(flat, get_method_class(m).point_mass_hint) for m in ("laplace", "blob"))
    assert "n_val" in laplace and "rho_lr" not in laplace
    assert "rho_lr" in blob and "n_val" not in blob


def test_methods_lists_one_method_s_options(capsys):
    assert main(["methods", "laplace"]) == 0
    out = capsys.readouterr().out
    assert "n_val            128" in out and "* link" in out and "  n_fit" in out  # * = a prediction-time option
    assert main(["methods", "nope"]) == 2 and "Unknown method 'nope'" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0003)" in text and "(default: 200)" in text and "(default: 0)" in text  # lr, steps, seed
    assert "(default: None)" not in text and "(default: False)" not in text


def test_eval_ood_auroc_settings_and_data_files(tmp_path, capsys):
    """--ood adds the AUROC of telling another set's questions apart by epistemic uncertainty and by entropy;
    metrics.json records how it was evaluated; a data file is one split, and the run's own training file is
    named as such; a bad --out fails before the model loads."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["a", "b", "c"], "answer": i % 3}) + "\n"
                            for i in range(6)))
    assert main(["train", "--model", "tiny-random-llama", "--dataset", str(data), "--max-steps", "1", "--no-progress",
                 "--method", "mcd", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--ood", "arith-ood", "--limit", "6", "--samples", "3",
                 "--option", "sample_chunk=3", "--split", "test", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "one split: --split test is ignored" in captured.err and "training-set metrics" in captured.err
    metrics = json.loads((tmp_path / "run" / "eval" / "mine-file" / "metrics.json").read_text())
    assert metrics["split"] == "file"
    assert metrics["settings"] == {"samples": 3, "seed": 0, "batch_size": 8, "options": {"sample_chunk": 3},
                                   "model": "tiny-random-llama"}
    ood = metrics["ood"]["arith-ood"]
    assert ood["n"] == 6 and 0 <= ood["auroc_ood_epistemic"] <= 1 and 0 <= ood["auroc_ood_entropy"] <= 1
    assert '"ood": "arith-ood"' in captured.out
    (tmp_path / "afile").write_text("x")
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err


def test_a_failed_plot_keeps_the_earlier_evaluation(tmp_path, monkeypatch):
    """eval's three files are replaced as a set: a failure while making them leaves the earlier three."""
    from bayeslora import plots

    assert _train(tmp_path) == 0
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "run"), "--limit", "4", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("no plot today")
    monkeypatch.setattr(plots, "reliability_diagram", broken)
    with pytest.raises(RuntimeError, match="no plot today"):
        main(["eval", str(tmp_path / "run"), "--limit", "6", "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
