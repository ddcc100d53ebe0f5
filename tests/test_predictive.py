from __future__ import annotations

import math

import pytest
import torch

from bayeslora.predictive import Predictive


def test_deterministic_has_no_epistemic():
    pred = Predictive.from_logits(torch.tensor([[0.0, 0.0, float("-inf")]]))
    assert torch.allclose(pred.probs, torch.tensor([[0.5, 0.5, 0.0]]))
    assert pred.total.item() == pytest.approx(math.log(2))
    assert pred.epistemic.item() == 0 and pred.n_samples == 0


def test_disagreeing_samples_are_epistemic():
    # two confident samples that disagree: aleatoric ~0, epistemic ~log 2
    logits = torch.tensor([[[20.0, 0.0]], [[0.0, 20.0]]])
    pred = Predictive.from_sample_logits(logits)
    assert pred.aleatoric.item() == pytest.approx(0.0, abs=1e-6)
    assert pred.epistemic.item() == pytest.approx(math.log(2), abs=1e-6)
    # agreeing uncertain samples: all aleatoric
    pred = Predictive.from_sample_logits(torch.zeros(5, 1, 2))
    assert pred.epistemic.item() == pytest.approx(0.0, abs=1e-7)
    assert pred.aleatoric.item() == pytest.approx(math.log(2))


def test_closed_form_probs_keep_a_consistent_split():
    """Laplace / TFB's linearized predictive: closed-form probs with a few logit samples whose expected entropy
    exceeds H[probs] (as 3 samples did in `bayeslora serve`): total = aleatoric + epistemic, both >= 0."""
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4]])
    sample_probs = torch.tensor([[[0.5, 0.5], [0.99, 0.01], [0.6, 0.4]],
                                 [[0.6, 0.4], [0.01, 0.99], [0.6, 0.4]]])
    pred = Predictive(probs, sample_probs)
    mutual = torch.tensor([0.6881 - 0.6831, 0.6931 - 0.0560, 0.0])  # H[mean_s p_s] - mean_s H[p_s]
    assert pred.total.tolist() == pytest.approx([0.3251, 0.6931, 0.6730], abs=1e-4)
    # row 0: mean_s H[p_s] = 0.68 > H[probs] = 0.33 (the old split read aleatoric 0.68, epistemic 0)
    assert pred.epistemic.tolist() == pytest.approx(mutual.tolist(), abs=2e-4)
    assert torch.allclose(pred.aleatoric + pred.epistemic, pred.total)
    assert (pred.aleatoric >= 0).all() and (pred.epistemic >= 0).all()
    # mutual information above H[probs] is capped there: all of total is epistemic
    capped = Predictive(torch.tensor([[0.99, 0.01]]), sample_probs[:, 1:2])
    assert capped.epistemic.item() == pytest.approx(capped.total.item()) and capped.aleatoric.item() == 0.0


def test_cat_pads_choices():
    a = Predictive.from_logits(torch.zeros(2, 2))
    b = Predictive.from_logits(torch.zeros(1, 4))
    c = Predictive.cat([a, b])
    assert c.probs.shape == (3, 4) and torch.allclose(c.probs.sum(-1), torch.ones(3))
