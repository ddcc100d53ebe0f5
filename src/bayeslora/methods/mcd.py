"""MC-dropout LoRA (Gal & Ghahramani, 2016, applied to the LoRA input as in the BLoB paper's baseline).

Dropout on the input of ``A`` is a Bernoulli mask on A's *columns*: ``A diag(m) / (1 - p)``, a weight sample. We draw
that mask from the method's generator (never the global RNG) once per *question* (sample group, see
:mod:`bayeslora.peft_ext`): in training each question of the batch gets its own mask, shared by all of its rows (its
cloze choices), so one sample is one model; at test time S masks per question run as one batched forward over the
batch repeated S times. Outside a sampling context the layer is the plain mean ``A`` (dropout's expectation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..peft_ext import SamplingState, StochasticLoraA, replace_lora_A
from .base import AdapterConfig, BayesianMethod, MethodError, SampledConfig
from .registry import register_method


class DropoutLoraA(StochasticLoraA):
    """``lora_A`` whose input features are dropped with probability ``p``, one mask per sample group."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear)
        self.p = float(p)

    def masks(self, state: SamplingState, device, dtype) -> torch.Tensor:
        """Inverted-dropout masks ``(G, d_in)``: 0 or ``1 / (1 - p)``; cached so a context is one sample."""
        key = (id(self), "dropout")
        if key not in state.cache:
            keep = state.draw_groups(torch.rand, state.n_groups, (self.in_features,), device) >= self.p
            state.cache[key] = (keep.to(torch.float32) / (1.0 - self.p)).to(dtype=dtype)
        return state.cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._sampling
        if state is None or self.p == 0.0:
            return nn.functional.linear(x, self.weight)
        per_row = state.per_row(self.masks(state, x.device, x.dtype), x.shape[0])  # (R, d_in)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return nn.functional.linear(x * per_row.view(shape), self.weight)


@dataclass
class MCDropoutConfig(SampledConfig):
    n_samples: int = field(default=10, metadata={"help": "stochastic forward passes at test time"})
    p: float = field(default=0.1, metadata={"help": "dropout probability on the LoRA input (A's columns)"})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.p < 1.0:
            raise MethodError(f"Expected MC-dropout `p` in [0, 1), but got {self.p!r}")


@register_method
class MCDropout(BayesianMethod):
    name = "mcd"
    description = "MC-dropout on the LoRA input: one Bernoulli mask per question, S masks batched at test time"
    config_cls = MCDropoutConfig

    def prepare(self, base_model, adapter: AdapterConfig):
        model = super().prepare(base_model, adapter)
        self.attach(model)
        return model

    def attach(self, model) -> None:
        replace_lora_A(model, lambda name, linear: DropoutLoraA(linear, self.config.p))
