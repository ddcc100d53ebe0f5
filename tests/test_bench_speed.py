"""``bayeslora bench speed`` end to end on the tiny model (numbers are meaningless there; the plumbing is not)."""

from __future__ import annotations

import json

from bayeslora.cli import main


def strict_json(text: str):
    """JSON as a strict reader takes it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_bench_speed_writes_tables(tmp_path, capsys):
    md, raw = tmp_path / "speed.md", tmp_path / "speed.json"
    code = main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--methods", "blob",
                 "--steps", "1", "--repeats", "1", "--samples", "2,3", "--md", str(md), "--json", str(raw)])
    assert code == 0
    result = strict_json(raw.read_text())
    assert len(result["commits"]) == 1 and result["commits"][0]  # the code that measured, as `git_commit` names it
    assert [r["method"] for r in result["train"]] == ["blob"]
    assert result["train"][0]["x_step"] == 1.0
    kinds = {(r["predictive"], r["samples"]) for r in result["predictive"]}
    assert ("MC, one batched forward", 2) in kinds and ("MC, sequential forwards", 2) in kinds
    assert ("antithetic pair (eps, -eps), one batched forward", 2) in kinds
    assert ("MC, batched forwards of 2 samples (sample_chunk=2)", 3) in kinds  # chunks of 2 and 1
    memory = result["predictive_memory"]  # one fresh subprocess per row, S = 3
    assert [r["samples"] for r in memory] == [0, 3, 3, 3, 3]
    assert memory[0]["x_peak"] in (1.0, None)  # None: no growth at all
    assert all(r["peak_mib"] >= 0 for r in memory)
    # a rerun with the same options reuses the saved parts (a benchmark cut by a time limit goes on)
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--methods", "blob",
                 "--steps", "1", "--repeats", "1", "--samples", "2,3", "--json", str(raw)]) == 0
    assert "reusing the finished parts" in capsys.readouterr().err
    assert strict_json(raw.read_text())["commits"] == result["commits"]  # reused parts, the same code
    text = md.read_text()
    assert "| blob |" in text and "Versions:" in text and "bench speed" in text
    assert f"bayeslora commit: {result['commits'][0]}." in text
    assert "Peak memory of one predictive" in text and "| MC, sequential forwards | 3 |" in text
    one_pass, shared = result["scoring"]
    assert one_pass["scoring"].startswith("one pass") and shared["scoring"].startswith("shared")
    assert one_pass["x_forward"] == 1.0 and shared["x_forward"] > 0
    # the built-in task's long shared prompt runs once per question instead of once per choice
    assert shared["positions"] < one_pass["positions"]
    assert "| shared context, KV cache |" in text


def test_bench_speed_letter_format(tmp_path):
    """``--format letter``: the predictive rows score by letter (no cloze scoring comparison), and the report says so."""
    md, raw = tmp_path / "speed.md", tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--methods", "blob",
                 "--parts", "predictive,scoring", "--repeats", "1", "--samples", "2", "--format", "letter",
                 "--md", str(md), "--json", str(raw)]) == 0
    result = json.loads(raw.read_text())
    assert result["config"]["format"] == "letter" and result["scoring"] == []
    assert any(r["predictive"].startswith("mean prompt") for r in result["predictive"])
    text = md.read_text()
    assert "`--format letter`" in text and "not applicable: the model scores in letter format" in text


def test_bench_speed_parts(tmp_path):
    md = tmp_path / "scoring.md"
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--parts", "scoring",
                 "--repeats", "1", "--md", str(md)]) == 0
    text = md.read_text()
    assert "Cloze scoring" in text and "Training step" not in text and "BLoB predictive" not in text


def test_bench_speed_rejects_bad_input(capsys):
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--methods", "nope"]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--samples", "0"]) == 2
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--parts", "train,nope"]) == 2
    assert "Expected parts among" in capsys.readouterr().err
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "nope"]) == 2
    assert "Unknown dataset 'nope'" in capsys.readouterr().err


def test_bench_speed_posthoc_part(tmp_path):
    """One MLE epoch over the fit questions, then each post-hoc method fitted on them, as ratios to the epoch."""
    md, raw = tmp_path / "posthoc.md", tmp_path / "posthoc.json"
    tfb = "tfb:fit=anchor:predictive=mc:search=bisect:search_steps=2"  # the paper's search, so that the bisection runs
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--parts", "posthoc",
                 "--posthoc-methods", f"temperature,{tfb}", "--fit-questions", "8",
                 "--batch-size", "4", "--keep-mle", str(tmp_path / "mle"),
                 "--md", str(md), "--json", str(raw)]) == 0
    assert json.loads((tmp_path / "mle" / "run.json").read_text())["method"] == "mle"  # kept, a usable run
    rows = strict_json(raw.read_text())["posthoc"]
    assert [r["method"] for r in rows] == ["mle (one epoch)", "temperature", tfb]
    assert rows[2]["details"]["n_evaluations"] <= 4  # the bisection's 2 + search_steps evaluations at most
    assert rows[0]["x_epoch"] == 1.0 and all(r["fit_s"] > 0 for r in rows)
    assert rows[0]["peak_mib"] is None  # not measured for the epoch: null in the JSON, "–" in the table
    assert rows[1]["split"] == "validation" and rows[2]["split"] == "train" and rows[2]["n_examples"] == 8
    text = md.read_text()
    assert "Post-hoc fit vs one MLE epoch" in text and f"| {tfb} | train | 8 |" in text
    assert "| 1.00 | – |" in text.split("| mle (one epoch) |")[1].splitlines()[0]
    assert "temperature " in text.split("| temperature |")[1].splitlines()[0]  # the fitted temperature is shown


def test_bench_speed_posthoc_methods_must_be_posthoc(capsys, tmp_path):
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--parts", "posthoc",
                 "--posthoc-methods", "blob"]) == 2
    assert "not post hoc" in capsys.readouterr().err
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--parts", "posthoc",
                 "--posthoc-methods", "laplace:no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--parts", "posthoc",
                 "--keep-mle", str(tmp_path)]) == 2  # an existing folder: refused before any measurement
    assert "already exists" in capsys.readouterr().err


def test_peak_memory_growth_is_measured_from_the_reset():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("on CUDA the benchmark measures GPU memory")

    from bayeslora.bench.speed import _peak_growth_mib, _peak_start

    big = torch.ones(64 * 2**20 // 4)  # 64 MiB before the measurement starts: not counted
    start = _peak_start()
    assert _peak_growth_mib(start) < 16
    more = torch.ones(64 * 2**20 // 4)  # 64 MiB inside it
    assert 48 < _peak_growth_mib(start) < 96
    del big, more


def test_train_rows_take_ratios_round_by_round():
    from bayeslora.bench.speed import train_rows

    def run(method, step, peak):
        return {"method": method, "step_s": step, "peak_mib": peak, "trainable_params": 1}

    # round 2 ran slower for both methods: its ratio is read within the round
    rows = train_rows({"mle": [run("mle", 1.0, 100), run("mle", 2.0, 100), run("mle", 1.0, 100)],
                       "blob": [run("blob", 1.1, 110), run("blob", 2.4, 110), run("blob", 1.3, 110)]})
    mle, blob = rows
    assert mle["x_step"] == 1.0 and mle["step_s"] == 1.0 and mle["step_s_rounds"] == [1.0, 2.0, 1.0]
    assert blob["x_step"] == 1.2 and blob["x_step_range"][0] == 1.1 and blob["x_step_range"][1] == 1.3
    assert blob["step_s"] == 1.3 and blob["x_peak"] == 1.1


def test_bench_speed_rounds(tmp_path):
    md, raw = tmp_path / "speed.md", tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--dataset", "arith", "--methods", "mle,map",
                 "--parts", "train", "--steps", "1", "--rounds", "2", "--dtype", "bfloat16", "--md", str(md),
                 "--json", str(raw)]) == 0
    rows = json.loads(raw.read_text())["train"]
    assert [len(r["step_s_rounds"]) for r in rows] == [2, 2] and rows[0]["x_step"] == 1.0
    text = md.read_text()
    assert "2 rounds, each one subprocess per method in turn" in text and "lm_head, bfloat16." in text
    assert main(["bench", "speed", "--model", "tiny-random-llama", "--rounds", "0"]) == 2


def test_reused_parts_keep_the_commit_that_measured_them(tmp_path, monkeypatch):
    """A rerun on other code reuses the saved parts and names both commits; a saved None renders as "–"."""
    from bayeslora.bench import speed

    raw = tmp_path / "speed.json"
    config = speed.SpeedConfig(model="tiny-random-llama", dataset="arith", methods=["mle"], parts=["train"])
    row = {"method": "mle", "step_s": 0.5, "x_step": 1.0, "peak_mib": 0.0, "x_peak": None, "trainable_params": 8}
    from dataclasses import asdict

    raw.write_text(json.dumps({"config": asdict(config), "device": "cpu", "commits": ["aaaaaaa"], "train": [row]}))
    monkeypatch.setattr(speed, "git_commit", lambda: "bbbbbbb")
    result = speed.run_speed(config, log=lambda m: None, partial=raw)
    assert result["commits"] == ["aaaaaaa", "bbbbbbb"] and result["train"] == [row]
    text = speed.format_markdown(result, "bayeslora bench speed")
    assert "| mle | 0.500 | 1.00 | 0 | – | 8 |" in text and "bayeslora commits: aaaaaaa, bbbbbbb." in text


def test_scoring_takes_the_questions_that_share_their_context():
    """A question cut at max_length scores each choice after another context: the scoring part skips it instead
    of stopping (with the tiny model's byte tokenizer, one ARC-E validation question ended the whole part)."""
    import warnings

    from bayeslora.bench.speed import shared_context_questions
    from bayeslora.models import load_model
    from bayeslora.scoring import make_scorer
    from bayeslora.tasks.base import qa_example

    scorer = make_scorer("cloze", load_model("tiny-random-llama").tokenizer, max_length=48)
    short = [qa_example(f"s{i}", f"{i}?", ["a", "bb"], 0) for i in range(3)]
    long = qa_example("long", "word " * 40, ["a", "a much longer choice"], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        assert not scorer.encode([long]).shared_prefix
        assert shared_context_questions(scorer, [short[0], long, short[1], short[2]], 2) == short[:2]
    assert scorer.share_prefix  # left as it was
