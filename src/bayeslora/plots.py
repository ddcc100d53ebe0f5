"""Plots (matplotlib, imported lazily and rendered off-screen)."""

from __future__ import annotations

from pathlib import Path

import torch

from .io_utils import atomic_write_bytes
from .metrics import ECE_BINS, calibration_bins, ece


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "",
                        n_bins: int = ECE_BINS) -> Path:
    """Accuracy vs confidence per bin (bars), the diagonal, the gap, and a histogram of confidences."""
    plt = _pyplot()
    bins = calibration_bins(probs, labels, n_bins)
    edges = bins["edges"].numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    count = bins["count"].numpy()
    acc = bins["accuracy"].numpy()
    conf = bins["confidence"].numpy()
    filled = count > 0
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers[filled], acc[filled], width=width * 0.95, color="#4C72B0", edgecolor="black", label="accuracy")
    # the gap spans accuracy..confidence: above the bar where over-confident, inside it where under-confident
    # (two colours, so an under-confident bin does not read as a taller accuracy bar)
    for side, color, label in ((conf > acc, "#DD8452", "over-confident gap"),
                               (conf < acc, "#55A868", "under-confident gap")):
        keep = filled & side
        if keep.any():
            low = acc[keep].clip(max=conf[keep])
            ax.bar(centers[keep], abs(conf[keep] - acc[keep]), bottom=low, width=width * 0.95, color=color,
                   alpha=0.6, edgecolor=color, hatch="//", label=label)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece(probs, labels, n_bins):.2f}%  (n = {int(count.sum())}, {n_bins} bins)",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, count, width=width * 0.95, color="gray")
    hist.set_xlabel("confidence")
    hist.set_ylabel("count")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
