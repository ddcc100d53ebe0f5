"""Selective prediction and OOD AUROC: hand-computed values and an independent reference (scikit-learn)."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.bench.ood import ood_auroc
from bayeslora.bench.selective import accuracy_at_coverage, aurc, risk_coverage, selective_summary
from bayeslora.predictive import Predictive


def test_risk_coverage_hand_computed():
    conf = torch.tensor([0.6, 0.9, 0.7, 0.8])  # ranked: 0.9 (ok), 0.8 (wrong), 0.7 (ok), 0.6 (wrong)
    correct = torch.tensor([False, True, True, False])
    cov, risk = risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert aurc(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # 80% of 4 -> the 4 most confident (ceil 3.2); 50% -> 2
    assert accuracy_at_coverage(conf, correct, 0.8) == pytest.approx(0.5)
    assert accuracy_at_coverage(conf, correct, 0.5) == pytest.approx(0.5)
    assert accuracy_at_coverage(conf, correct, 0.25) == pytest.approx(1.0)


def test_accuracy_at_80_coverage_of_ten():
    conf = torch.linspace(1.0, 0.1, 10)
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 0, 0])  # the 8 most confident hold 7 correct
    assert accuracy_at_coverage(conf, correct, 0.8) == pytest.approx(7 / 8)


def test_ties_keep_original_order_and_perfect_ranking():
    correct = torch.tensor([True, False, True])
    _, risk = risk_coverage(torch.ones(3), correct)
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3])
    conf = torch.tensor([0.9, 0.2, 0.8])  # the wrong answer is the least confident: zero risk until it is taken
    assert risk_coverage(conf, correct)[1].tolist() == pytest.approx([0.0, 0.0, 1 / 3])


def test_selective_summary_from_probs():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 1])  # confidences .9 ok, .6 wrong, .55 ok, .8 ok
    out = selective_summary(probs, labels)
    assert out["acc_at_80cov"] == pytest.approx(0.75)
    assert out["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)


@pytest.mark.parametrize("bad", [dict(confidence=[], correct=[]), dict(confidence=[0.5], correct=[1, 0]),
                                 dict(confidence=[float("nan")], correct=[1]), dict(confidence=[0.5], correct=[2])])
def test_validation_errors(bad):
    with pytest.raises(ValueError):
        risk_coverage(**bad)
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage([0.5], [1], 0.0)


def test_ood_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    samples_in = torch.softmax(torch.randn(5, 30, 4, generator=g) * 3, -1)
    samples_out = torch.softmax(torch.randn(5, 20, 4, generator=g), -1)
    p_in = Predictive(samples_in.mean(0), samples_in)
    p_out = Predictive(samples_out.mean(0), samples_out)
    got = ood_auroc(p_in, p_out)
    y = [0] * 30 + [1] * 20
    assert got["auroc_ood_epistemic"] == pytest.approx(roc_auc_score(y, torch.cat([p_in.epistemic, p_out.epistemic])))
    assert got["auroc_ood_entropy"] == pytest.approx(roc_auc_score(y, torch.cat([p_in.total, p_out.total])))


def test_ood_auroc_deterministic_predictive_is_chance_by_epistemic():
    p_in = Predictive(torch.tensor([[0.9, 0.1], [0.8, 0.2]]))
    p_out = Predictive(torch.tensor([[0.5, 0.5], [0.6, 0.4]]))
    got = ood_auroc(p_in, p_out)
    assert got["auroc_ood_epistemic"] == 0.5  # zero epistemic everywhere: all ties
    assert got["auroc_ood_entropy"] == 1.0
    assert not math.isnan(got["auroc_ood_entropy"])
