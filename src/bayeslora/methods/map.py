"""MAP LoRA: maximum likelihood plus a Gaussian prior on the adapter, applied as weight decay.

AdamW's decoupled weight decay ``wd`` shrinks every adapter weight by ``lr * wd`` per step; it plays the role of the
prior precision of a zero-mean Gaussian prior (exactly so for plain SGD, where decay ``wd`` is the gradient of
``wd / 2 * ||theta||^2``). The BLoB paper's MAP baseline uses the same AdamW weight decay on the LoRA factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BayesianMethod, MethodConfig, MethodError
from .registry import register_method


@dataclass
class MAPConfig(MethodConfig):
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on the adapter (prior precision)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.weight_decay > 0:
            raise MethodError(f"Expected MAP `weight_decay` > 0 (the prior precision), but got {self.weight_decay!r}")


@register_method
class MAP(BayesianMethod):
    name = "map"
    description = "LoRA MAP: maximum likelihood + weight decay as a Gaussian prior (deterministic)"
    weight_samples = False
    config_cls = MAPConfig
