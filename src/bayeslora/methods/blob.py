"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation (Wang, Shi, Han, Metaxas & Wang, NeurIPS 2024).

Posterior ``q(A) = N(M, sigma^2)`` elementwise on every LoRA ``A`` with ``sigma = rho^2`` (``rho`` initialized
``U(eps / sqrt(2), eps)``); ``B`` stays deterministic; prior ``p(A) = N(0, beta^2)``. Training minimizes the negative
ELBO per example, ``mean NLL + kl_weight * KL(q || p) / N`` (N: training questions), with one weight sample per
*question* (all rows of a question share it; the reference redraws flipout signs per token). Prediction averages S
samples run as one batched forward; ``n_samples = 0`` is the posterior mean.

KL weighting (a choice; the paper's code offers two): we use the dataset-size scaling of the ELBO, ``1 / N`` per
example, which makes the loss an unbiased per-example negative ELBO. The reference weights the KL of each minibatch
by ``1 / M`` (M = minibatches per epoch) next to a *mean* NLL, i.e. ``batch_size / N``: ``kl_weight = batch_size``
reproduces it. The reference also steps the KL gradient with a separate SGD optimizer (lr 0.01-0.02); we keep one
AdamW over ``loss = nll + kl_scale * kl`` (the generic loop), with ``rho`` in its own group without weight decay
and, with ``rho_lr``, its own learning rate: under Adam ``rho`` moves by about its learning rate per step whatever
the KL weight, so with the paper's ``eps`` = 0.05 sigma stays near its initial 0.002 for the first few hundred
steps at lr 1e-4-1e-3 (docs/results/methods.md measures this).

``predictive = "head"`` (the cheap predictive): the trunk runs once at the posterior mean and only the LM head's
``A`` is resampled, ``S`` times, from the captured LM-head input ``h``: per sample the extra cost is
``scaling * B ((sigma * eps_s) h)``, ``V x r`` per position instead of a whole forward. It is exact MC for the head's
uncertainty (the largest single LoRA in the model) and ignores the trunk's (:mod:`bayeslora.methods.head`).

``predictive = "antithetic"``: full weight samples like ``mc``, drawn as mirrored pairs (``eps``, ``-eps``) in one
batched forward (S even; S = 2 is one pair). The average of a pair cancels every odd-order term of the samples'
effect on the probabilities, so the first-order sampling noise that dominates a small independent-sample average is
gone: with S = 2 it is the cheapest predictive that samples the trunk's LoRA layers too (docs/FINDINGS.md, finding 9,
compares it with independent S = 10 on runs where sigma matters).

``prompt = "mean"`` (with ``mc`` or ``antithetic``): the prompt runs once at the posterior mean and its KV cache is
shared by the S samples, which run only the scored positions (letter: the last token; cloze: the context's last
token and the continuations). The samples then act on the answer's positions through every layer but not on the
prompt's keys and values: S samples cost one forward plus S passes over a few tokens. Measured (docs/FINDINGS.md,
finding 12): one antithetic pair costs 1.2-1.4x the deterministic forward (the full pair: 1.8-2x) but keeps only a
third to a half of the epistemic uncertainty, because most of the samples' disagreement comes from the prompt.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import torch

from ..peft_ext import GaussianLoraA, replace_lora_A, stochastic_layers
from .base import AdapterConfig, BayesianMethod, MethodError, SampledConfig, SamplePlan
from .registry import register_method


class BlobPredictive(str, Enum):
    """How BLoB predicts with ``n_samples`` > 0."""

    MC = "mc"
    """S full weight samples (every LoRA A), one batched forward."""
    HEAD = "head"
    """One deterministic forward; S samples of the LM head's A only (cheap)."""
    ANTITHETIC = "antithetic"
    """S full weight samples as S / 2 mirrored pairs (eps, -eps), one batched forward."""


def squared(rho: torch.Tensor) -> torch.Tensor:
    """BLoB's parameterization of the standard deviation: ``sigma = rho^2``."""
    return rho * rho


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """``sum KL(N(mean, std^2) || N(0, prior_std^2))`` elementwise, in float64 (many near-cancelling terms)."""
    mean, std = mean.double(), std.double()
    var_ratio = (std / prior_std) ** 2
    return 0.5 * (var_ratio + (mean / prior_std) ** 2 - 1.0 - torch.log(var_ratio)).sum()


@dataclass
class BlobConfig(SampledConfig):
    n_samples: int = field(default=10, metadata={"help": "posterior samples at test time (0: posterior mean)"})
    init_eps: float = field(default=0.05, metadata={"help": "rho ~ U(eps / sqrt(2), eps) at initialization"})
    prior_std: float = field(default=0.2, metadata={"help": "prior standard deviation beta of A"})
    kl_weight: float = field(default=1.0, metadata={"help": "multiplies the per-example KL / N (batch_size: the "
                                                             "reference's 1/M minibatch weighting)"})
    predictive: str = field(default="mc", metadata={"help": "mc (full samples), head (cheap: LM head only) or "
                                                            "antithetic (full samples in mirrored pairs; S even)"})
    PREDICTION_OPTIONS: ClassVar[tuple[str, ...]] = ("n_samples", "sample_chunk", "prompt", "predictive")
    rho_lr: float | None = field(default=None, metadata={"help": "learning rate of rho (default: the run's --lr). "
                                                                  "Adam moves rho by about lr per step whatever the "
                                                                  "KL weight, so a short schedule needs a larger one "
                                                                  "for sigma to leave its initial value"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("init_eps", "prior_std"):
            if not getattr(self, name) > 0:
                raise MethodError(f"Expected BLoB `{name}` > 0, but got {getattr(self, name)!r}")
        if self.rho_lr is not None and not self.rho_lr > 0:
            raise MethodError(f"Expected BLoB `rho_lr` > 0 (or unset), but got {self.rho_lr!r}")
        if not self.kl_weight >= 0:
            raise MethodError(f"Expected BLoB `kl_weight` >= 0, but got {self.kl_weight!r}")
        try:
            self.predictive = BlobPredictive(self.predictive).value
        except ValueError:
            raise MethodError(f"Expected BLoB `predictive` in {[p.value for p in BlobPredictive]}, "
                              f"but got {self.predictive!r}") from None
        if self.prompt == "mean" and self.predictive == BlobPredictive.HEAD.value:
            raise MethodError("`prompt=mean` applies to the mc and antithetic predictives; the head predictive "
                              "already runs the whole trunk once at the posterior mean")

    def sample_plan(self) -> SamplePlan:
        return dataclasses.replace(super().sample_plan(), antithetic=self.predictive == BlobPredictive.ANTITHETIC.value,
                                   head=self.predictive == BlobPredictive.HEAD.value)


@register_method
class Blob(BayesianMethod):
    name = "blob"
    description = "BLoB: variational Gaussian LoRA A (std = rho^2), closed-form KL, batched posterior samples"
    point_mass_hint = "a longer schedule, or a learning rate for the posterior scales: --option rho_lr=..."
    config_cls = BlobConfig

    def __init__(self, config: BlobConfig | None = None):
        super().__init__(config)
        self._layers: list[GaussianLoraA] = []

    def prepare(self, base_model, adapter: AdapterConfig):
        model = super().prepare(base_model, adapter)
        self.attach(model)
        return model

    def attach(self, model) -> None:
        # rho comes from the global RNG like PEFT's own LoRA init (seeded by the training loop); loading overwrites it
        lo, hi = self.config.init_eps / math.sqrt(2.0), self.config.init_eps

        def factory(name, linear):
            rho = torch.empty_like(linear.weight).uniform_(lo, hi)
            return GaussianLoraA(linear, rho, squared, trainable=linear.weight.requires_grad)

        self._layers = replace_lora_A(model, factory)

    def param_groups(self, model) -> list[dict]:
        rho = {id(layer.rho) for layer in stochastic_layers(model)}
        params = [p for p in model.parameters() if p.requires_grad]
        rho_group = {"params": [p for p in params if id(p) in rho], "weight_decay": 0.0}
        if self.config.rho_lr is not None:
            rho_group["lr"] = self.config.rho_lr
        return [{"params": [p for p in params if id(p) not in rho], "weight_decay": self.config.weight_decay},
                rho_group]

    def kl(self) -> torch.Tensor:
        """The KL of all layers in one elementwise pass over their concatenated means and rhos: a few dozen kernels
        per step instead of ~20 per layer (launch-bound on a GPU: see docs/results/speed_llama2-7b-h100.md)."""
        if not self._layers:
            return torch.zeros(())
        mean = torch.cat([layer.weight.reshape(-1) for layer in self._layers])
        std = squared(torch.cat([layer.rho.reshape(-1) for layer in self._layers]))  # every layer: std = rho^2
        return gaussian_kl(mean, std, self.config.prior_std).to(self._layers[0].weight.dtype)

    def kl_scale(self, n_train: int) -> float:
        return self.config.kl_weight / max(n_train, 1)
