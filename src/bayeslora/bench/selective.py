"""Selective prediction: answer only the most confident questions and abstain on the rest.

Pure functions of a confidence score ``(N,)`` and a correctness mask ``(N,)``. Following Geifman & El-Yaniv
(2017, "Selective classification for deep neural networks"), questions are ranked by decreasing confidence; keeping
the top ``k`` gives coverage ``k / N`` and selective risk = error rate among those ``k``. The area under the
risk-coverage curve (AURC) is the mean of the ``N`` selective risks (lower is better).

>>> import torch
>>> conf = torch.tensor([0.9, 0.8, 0.7, 0.6]); correct = torch.tensor([True, False, True, True])
>>> cov, risk = risk_coverage(conf, correct)
>>> [round(x, 4) for x in risk.tolist()]
[0.0, 0.5, 0.3333, 0.25]
>>> round(aurc(conf, correct), 4)
0.2708
>>> accuracy_at_coverage(conf, correct, 0.8)  # keeps ceil(0.8 * 4) = 4 questions
0.75
"""

from __future__ import annotations

import math

import torch


def _check(confidence, correct) -> tuple[torch.Tensor, torch.Tensor]:
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    correct = torch.as_tensor(correct).flatten()
    if correct.dtype != torch.bool:
        if not ((correct == 0) | (correct == 1)).all():
            raise ValueError("Expected `correct` to hold booleans or 0/1 values")
        correct = correct.bool()
    if confidence.shape != correct.shape:
        raise ValueError(f"Expected `confidence` and `correct` of the same length, but got {confidence.numel()} "
                         f"and {correct.numel()}")
    if confidence.numel() == 0:
        raise ValueError("Expected at least one question, but got N = 0")
    if not torch.isfinite(confidence).all():
        raise ValueError("Expected finite `confidence` values")
    return confidence, correct


def risk_coverage(confidence, correct) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage ``(N,)`` = ``k / N`` and selective risk ``(N,)`` = error rate of the ``k`` most confident.

    Ties in confidence are broken by the original order (a stable sort), so the curve is deterministic.
    """
    confidence, correct = _check(confidence, correct)
    order = torch.sort(confidence, descending=True, stable=True).indices
    errors = torch.cumsum((~correct[order]).double(), 0)
    k = torch.arange(1, confidence.numel() + 1, dtype=torch.float64)
    return k / confidence.numel(), errors / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: the mean selective risk over coverages ``1/N, 2/N, ..., 1``."""
    return risk_coverage(confidence, correct)[1].mean().item()


def accuracy_at_coverage(confidence, correct, coverage: float = 0.8) -> float:
    """Accuracy on the ``ceil(coverage * N)`` most confident questions."""
    if not 0 < coverage <= 1:
        raise ValueError(f"Expected `coverage` in (0, 1], but got {coverage!r}")
    cov, risk = risk_coverage(confidence, correct)
    k = max(1, math.ceil(coverage * cov.numel() - 1e-9))
    return 1.0 - risk[k - 1].item()


def selective_summary(probs: torch.Tensor, labels: torch.Tensor, coverage: float = 0.8) -> dict[str, float]:
    """AURC and accuracy at ``coverage`` for a predictive ``probs (N, C)``, ranked by its max probability."""
    conf, pred = torch.as_tensor(probs).max(-1)
    correct = pred == torch.as_tensor(labels)
    return {"aurc": aurc(conf, correct), f"acc_at_{round(coverage * 100)}cov": accuracy_at_coverage(conf, correct,
                                                                                                     coverage)}
