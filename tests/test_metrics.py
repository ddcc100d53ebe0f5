from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from bayeslora import metrics


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def test_hand_computed():
    p = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    y = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(p, y) == pytest.approx(0.75)
    # bins (15): 0.9 -> bin 13, 0.7 -> bin 10, 0.6 -> bin 8, 0.8 -> bin 11; one example each
    expected = (abs(1 - 0.9) + abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.8)) / 4 * 100
    assert metrics.ece(p, y) == pytest.approx(expected)
    assert metrics.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.7, 0.4, 0.8])))
    assert metrics.brier(p, y) == pytest.approx(np.mean([0.02, 0.18, 0.72, 0.08]))


def test_against_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 2
    p = logits.softmax(-1).double()
    y = torch.randint(0, 4, (500,), generator=g)
    assert metrics.nll(p, y) == pytest.approx(log_loss(y.numpy(), p.numpy(), labels=[0, 1, 2, 3]), rel=1e-9)
    conf, pred = p.max(-1)
    wrong = (pred != y).numpy()
    assert metrics.misclassification_auroc(p, y) == pytest.approx(roc_auc_score(wrong, -conf.numpy()), rel=1e-9)
    # binary Brier: sklearn's is the mean squared error of the positive-class probability (half of the 2-class sum)
    p2 = torch.stack([1 - p[:, 0], p[:, 0]], -1)
    y2 = (y == 0).long()
    assert metrics.brier(p2, y2) == pytest.approx(2 * brier_score_loss(y2.numpy(), p2[:, 1].numpy()), rel=1e-9)


def test_ece_reference_loop():
    """Against a plain-Python reference of the 15-bin ECE."""
    g = torch.Generator().manual_seed(1)
    p = torch.randn(300, 3, generator=g).softmax(-1).double()
    y = torch.randint(0, 3, (300,), generator=g)
    conf, pred = p.max(-1)
    total = 0.0
    for i in range(15):
        lo, hi = i / 15, (i + 1) / 15
        sel = [(c > lo or (i == 0 and c >= lo)) and c <= hi for c in conf.tolist()]
        sel = torch.tensor(sel)
        if sel.any():
            total += sel.sum().item() / 300 * abs((pred[sel] == y[sel]).double().mean().item() - conf[sel].mean().item())
    assert metrics.ece(p, y) == pytest.approx(total * 100, abs=1e-9)


def test_edge_cases():
    # confidence exactly 1 and 0.5 (ties); many empty bins
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    y = torch.tensor([0, 0, 1])
    bins = metrics.calibration_bins(p, y)
    assert bins["count"].sum() == 3 and (bins["count"] == 0).sum() == 13
    assert bins["count"][-1] == 2  # confidence 1.0 falls in the last bin
    assert metrics.ece(p, y) == pytest.approx((1 / 3) * 100 * 1.0 + (1 / 3) * 100 * 0.5)
    assert np.isfinite(metrics.nll(p, y))  # log(0) clipped
    assert np.isnan(metrics.auroc([0.1, 0.2], [True, True]))
    assert metrics.auroc([0.1, 0.9, 0.5, 0.5], [False, True, True, False]) == pytest.approx(0.875)


@pytest.mark.parametrize("probs,labels,match", [
    (torch.ones(3), torch.zeros(3), "shape"),
    (torch.ones(2, 2) * 0.5, torch.zeros(3), "labels"),
    (torch.full((2, 2), float("nan")), torch.zeros(2), "finite"),
    (torch.ones(2, 2) * 0.5, torch.tensor([0, 5]), "labels"),
    (torch.zeros(0, 2), torch.zeros(0), "at least one"),
])
def test_validation(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.summary(probs, labels)


def test_inputs_that_are_not_probabilities_are_refused():
    import math

    from bayeslora.metrics import auroc, summary

    with pytest.raises(ValueError, match="sum to 1"):
        summary(torch.tensor([[0.2, 0.2], [0.1, 0.1]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        summary(torch.tensor([[0.7, 0.3]]), torch.tensor([0.9]))
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan"), 0.2, 0.3], [True, False, True])
    assert math.isclose(summary(torch.tensor([[0.7, 0.3]]), torch.tensor([0.0]))["acc"], 1.0)  # 0.0 is a label
