"""Calibration and accuracy metrics: pure functions of probabilities ``(N, C)`` and labels ``(N,)``.

>>> import torch
>>> p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]); y = torch.tensor([0, 1, 1])
>>> round(accuracy(p, y), 4), round(ece(p, y), 2)
(0.6667, 33.33)
"""

from __future__ import annotations

import torch

ECE_BINS = 15
_EPS = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs, dtype=torch.float64)
    raw = torch.as_tensor(labels)
    if raw.is_floating_point() and not (torch.isfinite(raw).all() and (raw == raw.round()).all()):
        raise ValueError("Expected `labels` to be integer class indices, but got fractional or non-finite values")
    labels = raw.to(torch.long)
    if probs.ndim != 2:
        raise ValueError(f"Expected `probs` of shape (N, C), but got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"Expected `labels` of shape ({probs.shape[0]},), but got {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("Expected at least one example, but got N = 0")
    if not torch.isfinite(probs).all() or (probs < 0).any() or (probs > 1 + 1e-6).any():
        raise ValueError("Expected `probs` to hold finite values in [0, 1]")
    worst = (probs.sum(-1) - 1).abs().max().item()
    if worst > 1e-3:
        raise ValueError(f"Expected each row of `probs` to sum to 1 (probabilities, not logits or scores), but a row "
                         f"is off by {worst:.3g}")
    if (labels < 0).any() or (labels >= probs.shape[1]).any():
        raise ValueError(f"Expected `labels` in [0, {probs.shape[1]}), but got values outside")
    return probs, labels


def accuracy(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true label (probabilities clipped at 1e-12)."""
    probs, labels = _check(probs, labels)
    return -probs.gather(1, labels[:, None]).clamp_min(_EPS).log().mean().item()


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of the squared distance to the one-hot label (sum over C)."""
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def calibration_bins(probs, labels, n_bins: int = ECE_BINS) -> dict[str, torch.Tensor]:
    """Equal-width confidence bins: count, mean confidence and accuracy per bin (empty bins have count 0).

    Bin ``i`` holds confidences in ``(i / n, (i + 1) / n]``; confidence 0 falls in bin 0.
    """
    probs, labels = _check(probs, labels)
    if n_bins < 1:
        raise ValueError(f"Expected `n_bins` >= 1, but got {n_bins}")
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    safe = count.clamp_min(1)
    return {"edges": edges, "count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def ece(probs, labels, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error in **percent**: sum_i |B_i|/N * |acc(B_i) - conf(B_i)| * 100."""
    bins = calibration_bins(probs, labels, n_bins)
    weights = bins["count"] / bins["count"].sum()
    return (weights * (bins["accuracy"] - bins["confidence"]).abs()).sum().item() * 100


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` separating ``positives`` (bool) from the rest; ties count half.

    Returns NaN when one of the two classes is empty.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positives = torch.as_tensor(positives, dtype=torch.bool).flatten()
    if scores.shape != positives.shape:
        raise ValueError(f"Expected `scores` and `positives` of the same length, got {scores.shape} and {positives.shape}")
    if not torch.isfinite(scores).all():
        raise ValueError("Expected finite `scores`, but got NaN or inf")
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = first + (counts - 1) / 2.0
    ranks[order] = avg[inverse].double()
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return (u / (n_pos * n_neg)).item()


def misclassification_auroc(probs, labels) -> float:
    """AUROC of (1 - confidence) for detecting wrong predictions."""
    probs, labels = _check(probs, labels)
    conf, pred = probs.max(-1)
    return auroc(-conf, pred != labels)


def summary(probs, labels, n_bins: int = ECE_BINS) -> dict[str, float]:
    """All metrics in one dict: acc, ece (percent), nll, brier, auroc_misclassification, n."""
    return {
        "n": int(torch.as_tensor(labels).numel()),
        "acc": accuracy(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "auroc_misclassification": misclassification_auroc(probs, labels),
    }
