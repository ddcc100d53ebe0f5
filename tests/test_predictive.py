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


def test_cat_pads_choices():
    a = Predictive.from_logits(torch.zeros(2, 2))
    b = Predictive.from_logits(torch.zeros(1, 4))
    c = Predictive.cat([a, b])
    assert c.probs.shape == (3, 4) and torch.allclose(c.probs.sum(-1), torch.ones(3))
