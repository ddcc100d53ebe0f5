"""LoRA fine-tuned by maximum likelihood (Hu et al., 2022): the deterministic baseline."""

from __future__ import annotations

from .base import BayesianMethod
from .registry import register_method


@register_method
class MLE(BayesianMethod):
    name = "mle"
    description = "LoRA by maximum likelihood (deterministic baseline, no weight decay)"
    weight_samples = False
