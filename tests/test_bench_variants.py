"""Predictive variants and ablations on top of a calibration grid (tiny random model, built-in task)."""

from __future__ import annotations

import json

import pytest
import torch

from bayeslora.bench import variants
from bayeslora.bench.grid import GridError, Preset, make_config, read_results, run_grid

TINY = Preset("tiny", "test preset", max_steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, max_length=48,
              train_limit=16, eval_limit=10, fit_limit=8, eval_batch_size=5, n_samples=2, datasets=("arith",),
              seeds=(1,))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("vgrid")
    config = make_config(str(out), TINY, methods=["mle", "blob"], model="tiny-random-llama", ood_train="none",
                         command="test")
    rows = run_grid(config, log=lambda msg: None)
    assert all(r["status"] == "ok" for r in rows), rows
    return out


def test_predictive_variants_evaluate_every_run_once(grid):
    with pytest.raises(GridError, match="No predictive variants"):
        variants.run_predictive(grid, methods=["map"])
    assert variants.run_predictive(grid, split="test", log=lambda msg: None, seeds=[7]) == []
    rows = variants.run_predictive(grid, split="test", log=lambda msg: None)
    labels = {(r["method"], r["variant"]) for r in rows}
    assert labels == {("mle", "deterministic"), ("blob", "MC S=10"), ("blob", "head S=10"),
                      ("blob", "posterior mean"), ("blob", "MC S=2"), ("blob", "antithetic S=2"),
                      ("blob", "antithetic S=10"), ("blob", "MC S=40"), ("blob", "mean prompt, antithetic S=2"),
                      ("blob", "mean prompt, MC S=10"), ("blob", "mean prompt, antithetic S=10")}
    by = {(r["method"], r["variant"]): r for r in rows}
    assert by["blob", "MC S=10"]["n_samples"] == 10 and by["blob", "posterior mean"]["n_samples"] == 0
    assert by["blob", "MC S=10"]["mean_epistemic"] > 0 and by["blob", "posterior mean"]["mean_epistemic"] == 0
    assert all(r["n"] == 10 for r in rows)  # the grid's eval_limit subset
    # a rerun evaluates nothing new
    assert variants.run_predictive(grid, split="test", log=lambda msg: None) == rows
    table = "\n".join(variants.predictive_table(rows))
    assert "| mle | deterministic | 1 |" in table and "1.00x" in table
    assert "| blob | MC S=10 | 1 |" in table and "| 0.00 |" in table  # MC S=10 is its own NLL reference


def test_ablation_changes_the_option_and_reports_next_to_the_grid(grid):
    out = variants.run_ablation(grid, "blob", {"init_eps": 0.3}, log=lambda msg: None)
    assert out.name == "blob-init_eps=0.3"
    saved = json.loads((out / "grid.json").read_text())
    assert saved["config"]["preset"]["method_options"]["blob"] == {"init_eps": 0.3}
    assert [r["status"] for r in read_results(out)] == ["ok"]
    config = variants.load_grid(grid)
    std = {}
    for label, folder in (("grid", grid), ("ablation", out)):
        std[label] = variants.posterior_std_summary(folder / "runs" / "blob-arith-s1", config.model)["std"]
    # rho ~ U(eps / sqrt 2, eps), std = rho^2: ~0.0019 at eps 0.05, ~0.068 at eps 0.3 (2 steps barely move it)
    assert std["grid"] < 0.003 < 0.03 < std["ablation"]
    # the ablated run's predictives are reported next to the grid's, labelled with the ablation
    variants.run_predictive(out, methods=["blob"], log=lambda msg: None)
    md = variants.report(grid, split="test")
    assert "| blob (init_eps=0.3) | head S=10 | 1 |" in md and "| blob | head S=10 | 1 |" in md
    assert "| grid (preset defaults) | blob | 1 |" in md and "| blob-init_eps=0.3 | blob | 1 |" in md
    assert "| grid (preset defaults) | mle | 1 |" in md
    assert "### ECE noise floor" in md and "- arith seed 1: 10 questions, ECE " in md


def test_ece_noise_floor_shrinks_with_more_questions():
    probs = torch.softmax(torch.randn(60, 4, generator=torch.Generator().manual_seed(0)), -1)
    small, _ = variants.ece_noise_floor(probs, draws=300)
    large, _ = variants.ece_noise_floor(probs.repeat(20, 1), draws=300)
    assert 5 < small < 30 and large < small / 3  # ~1/sqrt(n)


def test_posthoc_ablation_reuses_the_grids_mle_run(grid):
    out = variants.run_ablation(grid, "temperature", {"max_iter": 20}, log=lambda msg: None)
    rows = read_results(out)
    assert [(r["method"], r["status"]) for r in rows] == [("temperature", "ok")]
    copied = json.loads((out / "runs" / "mle-arith-s1" / "run.json").read_text())
    original = json.loads((grid / "runs" / "mle-arith-s1" / "run.json").read_text())
    assert copied == original  # copied, not retrained
    assert rows[0]["mle_train_time_s"] == original["train_time_s"]
    # a report of one method's ablations: its rows next to the grid's MLE, without the predictive variants
    md = variants.report(grid, split="test", ablations=["temperature"])
    assert md.startswith("## Methods: ablations of temperature")
    assert "| temperature-max_iter=20 | temperature | 1 |" in md and "| grid (preset defaults) | mle | 1 |" in md
    assert "### Predictives" not in md and "| blob" not in md and "blob-" not in md


def test_bad_requests_are_clear_errors(tmp_path, grid):
    with pytest.raises(GridError, match="not a calibration grid"):
        variants.load_grid(tmp_path)
    with pytest.raises(GridError, match="KEY=VALUE"):
        variants.parse_option("init_eps")
    assert variants.parse_option("init_eps=0.3") == ("init_eps", 0.3)
    assert variants.parse_option("predictive=head") == ("predictive", "head")
    assert variants.main(["predictive", str(tmp_path)]) == 2
