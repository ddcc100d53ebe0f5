"""The HTML report opened in a real headless Chromium: the tables are there and every embedded image decodes.

Chromium comes from Debian's packages (``make test`` installs it). Outside CI a missing browser skips the test;
under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from bayeslora.bench.grid import Cell, save_predictions, write_cell, write_results
from bayeslora.bench.report import write_report
from bayeslora.predictive import Predictive

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = f"no headless browser found (tried {', '.join(BROWSERS)}); `make test` installs Debian's chromium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def fake_grid(out):
    """Two methods x one dataset x two seeds with random predictions, written as the grid writes them."""
    g = torch.Generator().manual_seed(0)
    for method in ("mle", "blob-like"):
        for seed in (1, 2):
            cell = Cell(method, "arc-e", seed)
            probs = torch.softmax(torch.randn(40, 4, generator=g) * 2, -1)
            labels = torch.randint(0, 4, (40,), generator=g)
            save_predictions(out / "cells" / cell.key / "validation.safetensors", Predictive(probs), labels)
            metrics = {"validation": {"acc": 0.3 + 0.1 * seed, "ece": 5.0 * seed, "nll": 1.2, "brier": 0.7,
                                      "aurc": 0.5, "acc_at_80cov": 0.4, "eval_time_s": 1.0}}
            write_cell(out, cell, {"method": method, "dataset": "arc-e", "seed": seed, "status": "ok",
                                   "metrics": metrics, "train_time_s": 2.0, "wall_time_s": 3.0, "peak_rss_mb": 100})
    write_results(out)


def test_report_renders_in_headless_chromium(tmp_path):
    browser = find_browser()
    fake_grid(tmp_path)
    page = write_report(tmp_path, command="bayeslora bench calibration --out grid")["html"]
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert dom.count("<table>") == 2  # the validation split and the cost table
    assert "<th>arc-e / blob-like</th>" in dom and "<th>arc-e / mle</th>" in dom and "<th>ECE (%)</th>" in dom
    assert "<td>45.00 ± 7.07</td>" in dom  # ACC (%) of each method: 0.4 and 0.5 over the two seeds
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == 3  # 2 reliability + 1 risk-coverage
    assert 'data-images-decoded="3"' in dom  # the browser decoded every embedded PNG
