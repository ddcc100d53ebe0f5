"""Plots (matplotlib, imported lazily and rendered off-screen).

Figures are ``matplotlib.figure.Figure`` objects rendered straight to a file: pyplot and its global backend are
never touched, so a notebook's inline plots and a script's own backend keep working. The file's suffix picks the
format (``.png``, ``.pdf`` or ``.svg``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .io_utils import atomic_write_bytes
from .metrics import ECE_BINS, calibration_bins, ece


FORMATS = ("png", "pdf", "svg")


def figure(**subplots):
    """``(fig, axes)``: a new off-screen figure and ``fig.subplots(**subplots)`` (``figsize`` goes to the figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=subplots.pop("figsize", None))
    return fig, fig.subplots(**subplots)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix (one of :data:`FORMATS`)."""
    import io

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"Expected a plot file ending in {', '.join('.' + f for f in FORMATS)}, but got {str(path)!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "",
                        n_bins: int = ECE_BINS) -> Path:
    """Accuracy vs confidence per bin (bars), the diagonal, the gap, and a histogram of confidences."""
    bins = calibration_bins(probs, labels, n_bins)
    edges = bins["edges"].numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    count = bins["count"].numpy()
    acc = bins["accuracy"].numpy()
    conf = bins["confidence"].numpy()
    filled = count > 0
    fig, (ax, hist) = figure(nrows=2, ncols=1, figsize=(4.6, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
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
    return save_figure(fig, path)
