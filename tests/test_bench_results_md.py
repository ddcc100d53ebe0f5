"""docs/RESULTS.md generation: our fragments first (calibration leading), the published numbers apart."""

from __future__ import annotations

import json

from bayeslora.bench.grid import Cell, write_cell, write_results
from bayeslora.bench.results_md import (PUBLISHED, calibration_fragment, environment, write_calibration_fragment,
                                        write_results_md)


def small_grid(out, model: str = "smollm2-135m"):
    row = {"method": "mle", "dataset": "obqa", "seed": 1, "status": "ok", "train_time_s": 1.0, "wall_time_s": 2.0,
           "peak_rss_mb": 10.0, "metrics": {"validation": {"acc": 0.5, "ece": 12.5, "nll": 1.1}}}
    write_cell(out, Cell("mle", "obqa", 1), row)
    write_results(out)
    config = {"preset": {"name": "cpu-small", "description": "tiny budget", "datasets": ["obqa"]}, "model": model,
              "methods": ["mle"],
              "datasets": ["obqa"], "seeds": [1], "command": "bayeslora bench calibration --out g"}
    (out / "grid.json").write_text(json.dumps({"protocol": {}, "config": config}))


def test_fragment_has_command_hardware_versions_and_table(tmp_path):
    small_grid(tmp_path)
    text = calibration_fragment(tmp_path)
    env = environment()
    assert "`bayeslora bench calibration --out g`" in text
    assert env["cpu"] in text and f"torch {env['torch']}" in text and "preset `cpu-small`" in text
    assert "| obqa / mle | 50.00 | 12.50 | 1.100 |" in text
    assert "did not record theirs" in text  # a row without its machine: the report's own, said so


def test_a_grid_on_another_model_does_not_replace_the_presets_table(tmp_path):
    """The fragment is named by preset, and by model and datasets where they are not the preset's, so a tiny-model
    grid does not overwrite the published table; the hardware line is the cells' own machine."""
    from bayeslora.bench.grid import read_results
    from bayeslora.bench.results_md import calibration_fragment_name

    small_grid(tmp_path, model="tiny-random-llama")
    assert calibration_fragment_name(tmp_path) == "calibration-cpu-small-tiny-random-llama.md"
    rows = read_results(tmp_path)
    rows[0]["env"] = {**environment(), "cpu": "Some GPU host CPU", "gpu": "NVIDIA H100"}
    write_cell(tmp_path, Cell("mle", "obqa", 1), rows[0])
    write_results(tmp_path)
    text = calibration_fragment(tmp_path)
    assert "Some GPU host CPU" in text and "GPU NVIDIA H100" in text and "did not record" not in text


def test_results_md_orders_fragments_and_separates_published(tmp_path):
    grid, docs = tmp_path / "grid", tmp_path / "docs"
    grid.mkdir()
    small_grid(grid)
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "a-speed.md").write_text("## Speed benchmark\n\nratio 1.5x\n")
    assert write_calibration_fragment(grid, docs).name == "calibration-cpu-small.md"
    text = write_results_md(docs).read_text()
    ours, published = text.split("# Part 2: published reference numbers (not measured here)")
    assert ours.index("## Calibration benchmark") < ours.index("## Speed benchmark")
    assert "10.2x" in published and "1.06x" in published and "10.2x" not in ours
    assert published.count("\n| ") == len(PUBLISHED) + 1  # header + one row per published claim


def test_results_md_without_fragments(tmp_path):
    text = write_results_md(tmp_path).read_text()
    assert "no benchmark fragment" in text and "Part 2" in text
