from __future__ import annotations

import json

from bayeslora.cli import main


def test_demo_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    code = main(["demo", "--model", "tiny-random-llama", "--steps", "2", "--eval-limit", "8", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert set(report["results"]) == {"before fine-tuning", "LoRA mle", "LoRA blob"}
    for per_set in report["results"].values():
        assert set(per_set) == {"arith", "arith-ood"}
    assert report["results"]["LoRA blob"]["arith"]["n_samples"] == 10
    assert (tmp_path / "blob" / "arith-ood" / "reliability.png").is_file()
    assert "| LoRA blob" in capsys.readouterr().out
