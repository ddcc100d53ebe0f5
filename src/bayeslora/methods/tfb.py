"""TFB: Training-Free Bayesianization of LoRA adapters (Shi, Wang, Han, Zhang, Wang, NeurIPS 2025,
"Training-Free Bayesianization for Low-Rank Adapters of Large Language Models").

From a trained LoRA ``Delta W = B A`` (B: (d_out, r), A: (r, d_in)): the SVD ``B = U diag(d) V^T`` gives the
equivalent factors ``B' = U diag(d)``, ``A' = V^T A`` (``B' A' = B A``). The posterior is Gaussian on ``A'`` with
std ``sigma / d_i`` on row ``i``: the induced noise on ``Delta W`` is ``sigma * U eps`` — an isotropic Gaussian of
std ``sigma`` inside the adapter's column space. One scalar ``sigma`` is shared by all layers. The paper picks the
largest for which the predictive NLL on an anchor set (500 fit examples, S = 10 samples), measured against the
adapter's own predicted labels, changes by at most a relative ``tau`` (0.003): ``fit="anchor"``,
``predictive="mc"``. Our defaults are ``fit="val_nll"`` and ``predictive="glm"`` (below): with the paper's rule the
posterior stays where the adapter is and calibrates nothing, and the search costs more than an epoch at its
defaults (docs/FINDINGS.md, findings 5, 8 and 22). Sampling reuses
:class:`bayeslora.peft_ext.GaussianLoraA` (fixed, non-trainable std) and the batched per-question samples of
:meth:`BayesianMethod.sampling`. No gradient is computed, but by the linearized predictive (``predictive="glm"``).

The search (``search``):

- ``bisect`` (the paper's): bisection in log sigma over [sigma_min, sigma_max]; 2 + ``search_steps`` anchor
  evaluations.
- ``secant`` (default, cheaper): the anchor samples are antithetic pairs (``eps``, ``-eps``) with common random
  numbers, so the odd-order terms of the sample average cancel and the NLL change grows like ``c sigma^2`` for
  small sigma. Each step fits the exponent of that power law through the last two evaluations (log-log secant,
  2 until there are two) and jumps to the sigma it predicts for 0.85 ``tau``; it stops at the first sigma whose
  change lies in [0.7 ``tau``, ``tau``] (a sigma within ~1.2x of the largest one allowed: the resolution of
  6 bisection steps) and returns the largest sigma seen with change <= ``tau``. Typically 2-4 evaluations; at most
  ``search_steps`` + 2.

A half-precision (bfloat16) model is searched in float32 (``search_dtype``): in bfloat16 any sigma > 0 moves the
anchor NLL by the rounding of the perturbed sums, more than ``tau`` (SmolLM2 on the CPU: 0.67% at sigma 1e-4 and
0.62% at 1e-3, against 8e-7 and 1.3e-4 in float32), so on an H100 every search ended at sigma = 0.

The tolerance (``tolerance``):

- ``relative`` (default; the rule as our issue states it): ``|NLL(sigma) - NLL(0)| / NLL(0) <= tau``.
- ``per-anchor`` (the reference code's rule, ``Wang-ML-Lab/bayesian-peft``, ``modelwrappers/tfblora.py``): that
  relative change is divided by the number of anchors before it is compared with ``tau``, so the change allowed is
  ``tau * n_anchor`` (its scripts' ``th = 0.003`` with our default 500 anchors: 150%). Its scripts also cap sigma at
  0.015 (their ``--bayes-beta``; here ``sigma_max=0.015``). With the relative rule an adapter that is
  overconfident on its anchors stays overconfident; the per-anchor rule is what lets the reference's TFB spread
  its predictions (cpu-overfit, 3 seeds: test NLL -2% to -4% against MLE, where the relative rule gives -0.3% to
  +0.1%; docs/FINDINGS.md, finding 8).

What sigma is fitted to (``fit``):

- ``anchor`` (the paper's): the search above, on the adapter's own predictions.
- ``val_nll`` (ours, the default; like Laplace's ``prior=val_nll``): the sigma with the lowest NLL of the true labels
  of ``n_val`` validation questions under the ``search_samples`` antithetic-sample predictive (common random numbers),
  sigma = 0 when no sigma beats the adapter. Only sigmas whose validation accuracy stays within ``max_acc_drop``
  (default 0.01) of the adapter's count: on an adapter whose NLL is worse than a uniform guess, NLL alone rewards noise
  that wipes out the answers (cpu-overfit seed 1 without the limit: sigma 0.32, test accuracy 50% -> 23%). A scan in
  half-decades up from 1e-3 until the NLL rises or the accuracy drops beyond the limit, then one parabolic step in log
  sigma (:meth:`TFB._scan_min`): typically 4-7 evaluations. The anchor rules hold the adapter's own answers nearly
  fixed, so an overconfident adapter stays overconfident; this one asks how far the noise family can calibrate it.

Prediction: ``n_samples`` independent samples (``predictive="mc"``, the paper's), or mirrored pairs (eps, -eps) as for
BLoB (``"antithetic"``; S even), whose average keeps the adapter's answers to second order in sigma, or (``"glm"``,
ours, the default) the linearized predictive of the same posterior, as Laplace-LoRA's
(:mod:`bayeslora.methods.linearized`): choice logits ``N(f(x), sigma^2 J D J^T)`` with ``J`` the Jacobian w.r.t. the
Gaussian ``A'`` factors and ``D`` the ``1 / d_i^2`` of their rows, through the mean-field link. Its mean is the
adapter's own logits, so noise cannot reorder the answers the way weight samples do (cpu-overfit: TFB's MC predictive
lost 3-5 points of accuracy where its sigma calibrates, docs/FINDINGS.md, finding 14); it costs one forward and a
vectorized backward per batch. With ``glm`` the fit searches sigma on the same predictive, in closed form: the
Jacobians of its questions once, then every sigma of a log grid (:meth:`TFB._fit_glm`). Generation in
``bayeslora serve`` cannot take the Jacobians of every vocabulary logit, so it samples the same linearized model by
central differences: S/2 mirrored weight-sample pairs and the adapter itself decoded as S + 1 rows of one forward,
logits ``f(x) +- (f(x; +eps) - f(x; -eps)) / 2`` (:func:`bayeslora.serve.generation.linearized_logits`), the tokens
chosen from the adapter's own distribution.

Which LoRA layers get the noise (``subset``): ``all`` (default, the paper's), or ``last_layer``: the LM head's LoRA
only. Then the trunk is deterministic, so a sample costs an LM-head pass, not a forward: the search evaluates
every sigma on head inputs cached from one forward over its questions, and prediction and generation use the head
predictive (:mod:`bayeslora.methods.head`), which is exact MC here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..peft_ext import GaussianLoraA, head_lora, lora_layers, replace_lora_A, stochastic_layers
from ..predictive import Predictive
from ..tasks import random_subset as subsample
from .base import MethodError, SampledConfig, SamplePlan
from .head import gaussian_head, head_logits, head_noise
from .linearized import Link, glm_predictive, lora_jacobians, meanfield_probs
from .posthoc_base import PosthocMethod, batches, in_float32, progress
from .registry import register_method

SEARCHES = ("secant", "bisect")
TOLERANCES = ("relative", "per-anchor")
FITS = ("anchor", "val_nll")
PREDICTIVES = ("mc", "antithetic", "glm")
SUBSETS = ("all", "last_layer")
#: fit=val_nll: the scan's first sigma and its step (half a decade)
VAL_SCAN_START, VAL_SCAN_FACTOR = 1e-3, math.sqrt(10.0)
#: predictive=glm: sigmas per decade of the closed-form search's grid
GLM_GRID_PER_DECADE = 10


@dataclass
class TFBConfig(SampledConfig):
    n_samples: int = field(default=10, metadata={"help": "posterior samples at test time (0: the adapter itself)"})
    # glm and val_nll by default (were mc and anchor, the paper's): on the cpu-fewshot and cpu-overfit adapters
    # (500 test questions, 3 seeds each) they lower ECE and NLL on every seed with accuracy within 0.4 points, at
    # 0.09x an MLE epoch; the paper's pair left both where MLE had them, at 2.49x (docs/FINDINGS.md, finding 22)
    predictive: str = field(default="glm", metadata={"help": "glm (the linearized predictive, mean-field link; sigma "
                                                             "fitted on it) | mc (independent samples, the paper's) | "
                                                             "antithetic (mirrored pairs (eps, -eps); S even)"})
    PREDICTION_OPTIONS: ClassVar[tuple[str, ...]] = ("n_samples", "sample_chunk", "prompt", "predictive")
    tau: float = field(default=0.003, metadata={"help": "largest allowed relative change of the anchor NLL"})
    n_anchor: int = field(default=500, metadata={"help": "anchor questions drawn from the fit split"})
    search_samples: int = field(default=10, metadata={"help": "posterior samples per anchor NLL evaluation"})
    search_steps: int = field(default=8, metadata={"help": "bisection steps (in log sigma); for secant, the "
                                                                   "evaluation budget is search_steps + 2"})
    search: str = field(default="secant", metadata={"help": "secant (antithetic samples, power-law steps) | bisect "
                                                            "(the paper's bisection in log sigma)"})
    tolerance: str = field(default="relative", metadata={
        "help": "relative (|change| / NLL(0) <= tau) | per-anchor (reference code: ratio / n_anchor <= tau)"})
    sigma_min: float = field(default=1e-5, metadata={"help": "lower end of the sigma search (fit=val_nll with "
                                                             "predictive=mc|antithetic scans up from max(1e-3, "
                                                             "sigma_min))"})
    sigma_max: float = field(default=1.0, metadata={"help": "upper end of the sigma search"})
    search_dtype: str = field(default="float32", metadata={"help": "float32 (a half-precision model is searched in "
                                                                   "float32) | model (its own dtype)"})
    fit: str = field(default="val_nll", metadata={"help": "val_nll (the sigma with the lowest validation NLL, true "
                                                          "labels; a user file, one split, tunes on the fit data) | "
                                                          "anchor (the paper's: the largest sigma within tau on the "
                                                          "anchors)"})
    # 64 (was 200), as Laplace's n_val: with predictive=glm the fit is the Jacobians of these questions, 0.09x an
    # MLE epoch over ARC-E's 2251 questions at 64 and about 0.3x at 200 (docs/FINDINGS.md, finding 20)
    n_val: int = field(default=64, metadata={"help": "validation questions for fit=val_nll"})
    max_acc_drop: float = field(default=0.01, metadata={"help": "fit=val_nll: largest drop of the validation accuracy "
                                                                "allowed (1: no limit); the scan stops at the first "
                                                                "sigma beyond it"})
    subset: str = field(default="all", metadata={"help": "all (every LoRA A) | last_layer (the LM head's LoRA only: "
                                                         "its samples reuse one trunk forward, in the search and at "
                                                         "prediction)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.tau > 0:
            raise MethodError(f"Expected `tau` > 0, but got {self.tau!r}")
        for name in ("n_anchor", "search_samples", "search_steps", "n_val"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MethodError(f"Expected `{name}` to be a positive int, but got {value!r}")
        if self.search_dtype not in ("float32", "model"):
            raise MethodError(f"Expected `search_dtype` in ['float32', 'model'], but got {self.search_dtype!r}")
        if self.search not in SEARCHES:
            raise MethodError(f"Unknown `search` {self.search!r}; expected one of {', '.join(SEARCHES)}")
        if self.tolerance not in TOLERANCES:
            raise MethodError(f"Unknown `tolerance` {self.tolerance!r}; expected one of {', '.join(TOLERANCES)}")
        if not 0 <= self.max_acc_drop <= 1:
            raise MethodError(f"Expected 0 <= `max_acc_drop` <= 1, but got {self.max_acc_drop!r}")
        if self.predictive not in PREDICTIVES:
            raise MethodError(f"Unknown `predictive` {self.predictive!r}; expected one of {', '.join(PREDICTIVES)}")
        if self.fit not in FITS:
            raise MethodError(f"Unknown `fit` {self.fit!r}; expected one of {', '.join(FITS)}")
        if self.subset not in SUBSETS:
            raise MethodError(f"Unknown `subset` {self.subset!r}; expected one of {', '.join(SUBSETS)}")
        if self.predictive == "glm" and self.prompt == "mean":
            raise MethodError("`prompt=mean` does not apply to predictive=glm: it draws no weight samples")
        if self.subset == "last_layer" and self.prompt == "mean":
            raise MethodError("`prompt=mean` does not apply to subset=last_layer: its samples already reuse one "
                              "forward of the prompt (only the LM head is sampled)")
        if self.fit == "val_nll" and self.search_samples % 2:
            raise MethodError(f"fit=val_nll draws its samples in antithetic pairs: `search_samples` must be even, "
                              f"but got {self.search_samples}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise MethodError(f"Expected 0 < `sigma_min` < `sigma_max`, got {self.sigma_min!r}, {self.sigma_max!r}")

    def sample_plan(self) -> SamplePlan:
        # last_layer: the LM head's A is the only Gaussian factor, so the head predictive is exact MC
        # glm on all layers: generation samples the linearized model (on the head alone, MC is already linear)
        return dataclasses.replace(super().sample_plan(), antithetic=self.predictive == "antithetic",
                                   head=self.subset == "last_layer",
                                   linearized=self.predictive == "glm" and self.subset == "all")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def svd_reparameterize(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A', B', d)`` with ``B' = U diag(d)``, ``A' = V^T A`` from ``B = U diag(d) V^T``; A (r, d_in), B (d_out, r).

    Computed in float64, returned in A's dtype; ``B' @ A' == B @ A`` up to rounding.
    """
    U, d, Vh = torch.linalg.svd(B.double(), full_matrices=False)  # (d_out, r), (r,), (r, r)
    return (Vh @ A.double()).to(A.dtype), (U * d).to(B.dtype), d.to(A.dtype)


def _gaussian_factory(name: str, linear: torch.nn.Linear) -> GaussianLoraA:
    return GaussianLoraA(linear, torch.zeros(linear.out_features, 1), _identity, trainable=False)


@register_method
class TFB(PosthocMethod):
    name = "tfb"
    description = "training-free Bayesianization: SVD-reparameterized LoRA, sigma fitted to validation NLL (post hoc)"
    point_mass_hint = ("its fit chose sigma near 0: no noise lowered the NLL of its validation questions within "
                       "max_acc_drop; more of them (--option n_val=N) or a larger --option max_acc_drop at refit")
    config_cls = TFBConfig

    def prepare(self, base_model, adapter):
        """A fresh adapter with (zero-std) Gaussian A factors: the same parameters before and after :meth:`fit`."""
        model = super().prepare(base_model, adapter)
        self.attach(model)
        return model

    def attach(self, model) -> None:
        replace_lora_A(model, _gaussian_factory, include=self._covers(model))

    def _covers(self, model):
        """Which LoRA layers (by name) get a Gaussian A: all, or (``subset=last_layer``) the LM head's only."""
        if self.config.subset == "all":
            return None
        try:
            head = head_lora(model).layer
        except ValueError:
            raise MethodError("TFB with subset=last_layer needs a LoRA on the LM head: train the adapter with "
                              "lm_head in its target modules, or use subset=all") from None
        names = {name for name, layer in lora_layers(model) if layer is head}
        return lambda name: name in names

    @property
    def tune_split(self) -> str | None:
        return "validation" if self.config.fit == "val_nll" else None

    def _reparameterize(self, model) -> list[tuple[GaussianLoraA, torch.Tensor]]:
        """Rewrite every covered (A, B) in SVD form and make A Gaussian; returns (layer, 1 / d) with 1/0 := 0."""
        covers = self._covers(model)
        covered = [layer for name, layer in lora_layers(model)
                   if "default" in layer.lora_A and (covers is None or covers(name))]
        for layer in covered:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            new_A, new_B, _ = svd_reparameterize(A.data, B.data)
            A.data.copy_(new_A)
            B.data.copy_(new_B)
        if not stochastic_layers(model):
            self.attach(model)
        out = []
        for layer in covered:  # lora_A["default"] is the Gaussian factor now
            d = layer.lora_B["default"].weight.data.norm(dim=0)  # column norms of U diag(d) = d
            inv = torch.where(d > 1e-12 * d.max().clamp_min(1e-30), 1.0 / d.clamp_min(1e-30), torch.zeros_like(d))
            out.append((layer.lora_A["default"], inv.reshape(-1, 1)))
        return out

    @staticmethod
    def _set_sigma(scales: list[tuple[GaussianLoraA, torch.Tensor]], sigma: float) -> None:
        with torch.no_grad():
            for module, inv in scales:
                module.rho.copy_((sigma * inv).to(module.rho.dtype))

    @torch.no_grad()
    def _head_inputs(self, model, scorer, encoded) -> list[torch.Tensor] | None:
        """``subset=last_layer``: per batch, the LM head's inputs at the scored positions, from one forward at the
        posterior mean. The trunk has no noise, so every evaluation of the search reuses them and runs the LM head
        alone."""
        if self.config.subset != "last_layer":
            return None
        head = gaussian_head(model)
        return [scorer.forward_vocab(model, enc, capture=head.layer)[1] for enc in encoded]

    @staticmethod
    def _mean_logits(model, scorer, enc, heads: list[torch.Tensor] | None, i: int) -> torch.Tensor:
        """The adapter's choice logits on batch ``enc`` (the ``i``-th): from its cached head inputs if any."""
        if heads is None:
            return scorer.choice_logits(model, enc)
        return scorer.logits_from_vocab(gaussian_head(model).layer(heads[i]), enc)

    @torch.no_grad()
    def _labels_nll(self, model, scorer, encoded, pseudo, n_samples: int, seed: int,
                    antithetic: bool, heads: list[torch.Tensor] | None = None) -> tuple[float, float]:
        """Mean NLL of the labels ``pseudo`` (the adapter's own, or the true ones for fit=val_nll) under the
        S-sample predictive (common random numbers: fixed seed; antithetic pairs for the secant and val_nll
        searches), and the predictive's accuracy on them. ``heads`` (:meth:`_head_inputs`): sample the LM head
        only, from these inputs."""
        generator = torch.Generator().manual_seed(seed)
        total, count, correct = 0.0, 0, 0
        desc = "NLL of the adapter" if n_samples == 0 else f"NLL, {n_samples} samples"
        for i, (enc, labels) in enumerate(progress(list(zip(encoded, pseudo, strict=True)), desc)):
            if n_samples == 0:
                probs = torch.softmax(self._mean_logits(model, scorer, enc, heads, i).float(), -1)
            else:
                if heads is not None:
                    head = gaussian_head(model)
                    logits = head_logits(head, scorer, enc, head.layer(heads[i]), heads[i],
                                         head_noise(head, n_samples, generator, antithetic))
                else:
                    logits = self.sample_logits(model, scorer, enc, n_samples, generator, antithetic=antithetic)
                probs = torch.softmax(logits.float(), -1).mean(0)
            total += -probs.gather(1, labels[:, None]).clamp_min(1e-30).log().sum().item()
            correct += int((probs.argmax(-1) == labels).sum())
            count += labels.shape[0]
        return total / count, correct / count

    def fit(self, model, scorer, examples, batch_size=8, generator=None, validation=None) -> dict:
        if self.config.fit == "val_nll" and not validation:
            raise MethodError("fit=val_nll needs validation examples and the split is empty: use a dataset with a "
                              "validation split, or fit=anchor")
        if self.config.predictive == "glm":
            fit = self._fit_glm
        else:
            fit = self._fit_val_nll if self.config.fit == "val_nll" else self._fit
        data = validation if self.config.fit == "val_nll" else examples
        if self.config.search_dtype == "float32":
            with in_float32(model):
                return fit(model, scorer, data, batch_size, generator)
        return fit(model, scorer, data, batch_size, generator)

    @staticmethod
    def _encode(scorer, model, examples, batch_size) -> list:
        """The fit's batches, each with its own choice count (the linearized fit pays one backward per choice)."""
        device = next(model.parameters()).device
        return [scorer.encode(chunk).to(device) for chunk in batches(examples, batch_size)]

    def _fit(self, model, scorer, examples, batch_size, generator) -> dict:
        cfg = self.config
        anchors = subsample(examples, cfg.n_anchor, generator)
        encoded = self._encode(scorer, model, anchors, batch_size)
        scales = self._reparameterize(model)
        self._set_sigma(scales, 0.0)
        heads = self._head_inputs(model, scorer, encoded)
        with torch.no_grad():
            pseudo = [self._mean_logits(model, scorer, enc, heads, i).argmax(-1) for i, enc in enumerate(encoded)]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        antithetic = cfg.search == "secant"
        nll0, _ = self._labels_nll(model, scorer, encoded, pseudo, 0, seed, antithetic, heads)
        if not math.isfinite(nll0):
            raise MethodError(f"The adapter's anchor NLL is {nll0}: the source adapter is broken (NaN weights?)")
        evaluations: list[tuple[float, float]] = []
        per = len(anchors) if cfg.tolerance == "per-anchor" else 1

        def rel_change(sigma: float) -> float:
            self._set_sigma(scales, sigma)
            nll, _ = self._labels_nll(model, scorer, encoded, pseudo, cfg.search_samples, seed, antithetic, heads)
            evaluations.append((sigma, nll))
            return abs(nll - nll0) / max(nll0, 1e-12) / per

        sigma = (self._secant if cfg.search == "secant" else self._bisect)(rel_change)
        self._set_sigma(scales, sigma)
        best = next((nll for s, nll in reversed(evaluations) if s == sigma), nll0)
        return {"sigma": sigma, "anchor_nll0": nll0, "anchor_nll": best, "n_anchor": len(anchors),
                "n_evaluations": len(evaluations), "allowed_change": cfg.tau * per}

    def _fit_val_nll(self, model, scorer, validation, batch_size, generator) -> dict:
        """sigma minimizing the validation NLL (true labels) of the ``search_samples`` antithetic-sample predictive
        (common random numbers), 0 when no sigma beats the adapter itself: :meth:`_scan_min`."""
        cfg = self.config
        val = subsample(validation, cfg.n_val, generator)
        encoded = self._encode(scorer, model, val, batch_size)
        labels = [enc.labels for enc in encoded]
        scales = self._reparameterize(model)
        self._set_sigma(scales, 0.0)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        heads = self._head_inputs(model, scorer, encoded)
        nll0, acc0 = self._labels_nll(model, scorer, encoded, labels, 0, seed, True, heads)
        if not math.isfinite(nll0):
            raise MethodError(f"The adapter's validation NLL is {nll0}: the source adapter is broken (NaN weights?)")

        def val_nll(sigma: float) -> tuple[float, float]:
            self._set_sigma(scales, sigma)
            return self._labels_nll(model, scorer, encoded, labels, cfg.search_samples, seed, True, heads)

        sigma, nll, acc, n_evaluations = self._scan_min(val_nll, nll0, acc0)
        self._set_sigma(scales, sigma)
        return {"sigma": sigma, "val_nll0": nll0, "val_nll": nll, "val_acc0": acc0, "val_acc": acc,
                "n_val": len(val), "n_evaluations": n_evaluations}

    def _fit_glm(self, model, scorer, examples, batch_size, generator) -> dict:
        """predictive=glm: sigma by the fit rule (``fit``) on the linearized predictive, whose covariance is
        ``sigma^2`` times the one at sigma = 1. One Jacobian pass over the questions, then every sigma of a log grid
        over [sigma_min, sigma_max] (``GLM_GRID_PER_DECADE`` per decade) in closed form: ``anchor``, the largest
        sigma below the first whose anchor NLL change exceeds ``tau``; ``val_nll``, the lowest validation NLL below
        the first sigma whose accuracy drops beyond ``max_acc_drop`` (0 when none beats the adapter)."""
        cfg = self.config
        val = cfg.fit == "val_nll"
        questions = subsample(examples, cfg.n_val if val else cfg.n_anchor, generator)
        encoded = self._encode(scorer, model, questions, batch_size)
        scales = self._reparameterize(model)
        self._set_sigma(scales, 1.0)
        means, covs = zip(*(self._glm_cov(model, scorer, enc) for enc in progress(encoded, "Jacobians")), strict=True)
        labels = [enc.labels.cpu() for enc in encoded] if val else [m.argmax(-1) for m in means]

        def nll_acc(sigma: float) -> tuple[float, float]:
            total, correct, count = 0.0, 0, 0
            for mean, cov, y in zip(means, covs, labels, strict=True):
                probs = meanfield_probs(mean, sigma**2 * cov)
                total -= probs.double().gather(1, y[:, None]).clamp_min(1e-30).log().sum().item()
                correct += int((probs.argmax(-1) == y).sum())
                count += y.shape[0]
            return total / count, correct / count

        nll0, acc0 = nll_acc(0.0)
        if not math.isfinite(nll0):
            raise MethodError(f"The adapter's NLL on the fit questions is {nll0}: the source adapter is broken (NaN "
                              "weights?)")
        decades = math.log10(cfg.sigma_max / cfg.sigma_min)
        grid = torch.logspace(math.log10(cfg.sigma_min), math.log10(cfg.sigma_max),
                              max(2, round(decades * GLM_GRID_PER_DECADE) + 1), dtype=torch.float64).tolist()
        per = len(questions) if cfg.tolerance == "per-anchor" else 1
        sigma, nll, acc, n_grid = 0.0, nll0, acc0, 0
        for s in grid:
            n_grid += 1
            s_nll, s_acc = nll_acc(s)
            if val:
                if s_acc < acc0 - cfg.max_acc_drop - 1e-9:
                    break
                if s_nll < nll:
                    sigma, nll, acc = s, s_nll, s_acc
            else:
                if abs(s_nll - nll0) / max(nll0, 1e-12) / per > cfg.tau:
                    break
                sigma, nll, acc = s, s_nll, s_acc
        self._set_sigma(scales, sigma)
        kind = "val" if val else "anchor"
        result = {"sigma": sigma, f"{kind}_nll0": nll0, f"{kind}_nll": nll, f"{kind}_acc0": acc0, f"{kind}_acc": acc,
                  f"n_{kind}": len(questions), "n_evaluations": 1, "n_grid": n_grid, "predictive": "glm"}
        if sigma >= grid[-1] * (1 - 1e-9):
            result["note"] = (f"sigma is the largest the search allows (sigma_max={cfg.sigma_max:g}): a larger one "
                              "may fit better (--option sigma_max=...)")
        return result

    @staticmethod
    def _glm_cov(model, scorer, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """Choice logits ``(B, C)`` and the linearized predictive's covariance ``J diag(std^2) J^T`` ``(B, C, C)``
        (float64, CPU): per Gaussian ``A'`` (r, d_in) the Jacobian of the choice logits, weighted by its std. The
        Jacobians are of the logits' differences to the first choice (row and column 0 of the covariance are zero):
        the same ``var(f_i - f_j)``, all that the mean-field link and softmax samples read."""
        layers = {str(i): m for i, m in enumerate(stochastic_layers(model))}
        mean, jacobians = lora_jacobians(model, scorer, enc, layers, relative=True)
        cov = torch.zeros(*mean.shape, mean.shape[1], dtype=torch.float64)
        for k, J in jacobians.items():  # (C, B, r, d_in)
            Jw = J.double() * layers[k].std().detach().double().cpu()  # std (r, 1): sigma / d_i per row
            cov += torch.einsum("cbri,dbri->bcd", Jw, Jw)
        return mean, cov

    def predict(self, model, scorer, batch, n_samples=None, generator=None) -> Predictive:
        if self.config.predictive != "glm":
            return super().predict(model, scorer, batch, n_samples, generator)
        S = self.resolve_samples(n_samples)
        if S == 0 or not stochastic_layers(model):  # the adapter itself
            with torch.no_grad():
                return Predictive.from_logits(scorer.choice_logits(model, batch))
        mean, cov = self._glm_cov(model, scorer, batch)
        return glm_predictive(mean, cov.float(), Link.MEANFIELD.value, S, generator)

    def _scan_min(self, evaluate, nll0: float, acc0: float) -> tuple[float, float, float, int]:
        """``(sigma, nll, accuracy, evaluations)`` of the lowest NLL found among the sigmas whose accuracy is at
        most ``max_acc_drop`` below ``acc0`` (``evaluate(sigma) -> (nll, accuracy)``): half-decade steps up from
        ``VAL_SCAN_START`` (clamped to [sigma_min, sigma_max]) until the NLL rises or the accuracy drops beyond the
        limit, then one parabolic step in log sigma through the lowest point and its two neighbours. sigma 0
        (``nll0``, ``acc0``) wins ties: no noise unless it helps. At most ``search_steps`` + 2 evaluations."""
        cfg = self.config
        budget = cfg.search_steps + 2

        def allowed(point) -> bool:
            return point[2] >= acc0 - cfg.max_acc_drop - 1e-9

        points: list[tuple[float, float, float]] = []  # (sigma, nll, accuracy), sigma increasing
        sigma = min(max(VAL_SCAN_START, cfg.sigma_min), cfg.sigma_max)
        while len(points) < budget:
            points.append((sigma, *evaluate(sigma)))
            if not allowed(points[-1]) or sigma >= cfg.sigma_max \
                    or (len(points) > 1 and points[-1][1] > points[-2][1]):
                break
            sigma = min(sigma * VAL_SCAN_FACTOR, cfg.sigma_max)
        candidates = [j for j, p in enumerate(points) if allowed(p)]
        i = min(candidates, key=lambda j: points[j][1]) if candidates else -1
        if 0 < i < len(points) - 1 and len(points) < budget:
            (s0, f0, _), (s1, f1, _), (s2, f2, _) = points[i - 1:i + 2]
            x0, x1, x2 = math.log(s0), math.log(s1), math.log(s2)
            curvature = (f2 - f1) / (x2 - x1) - (f1 - f0) / (x1 - x0)
            if curvature > 0:  # vertex of the parabola through the three points, inside the bracket
                vertex = 0.5 * (x1 + x2) - (f2 - f1) / (x2 - x1) * (x2 - x0) / (2 * curvature)
                vertex = min(max(vertex, x0), x2)
                if abs(vertex - x1) > 1e-3:
                    points.append((math.exp(vertex), *evaluate(math.exp(vertex))))
        best = min((p for p in points if allowed(p)), key=lambda p: p[1], default=None)
        if best is None or not best[1] < nll0:
            return 0.0, nll0, acc0, len(points)
        return (*best, len(points))

    def _bisect(self, rel_change) -> float:
        """Largest sigma in [sigma_min, sigma_max] with rel_change(sigma) <= tau (bisection in log sigma, assuming
        the change grows with sigma; common random numbers make it a smooth function of sigma)."""
        cfg = self.config
        if rel_change(cfg.sigma_max) <= cfg.tau:
            return cfg.sigma_max
        if rel_change(cfg.sigma_min) > cfg.tau:
            return 0.0
        lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        for _ in range(cfg.search_steps):
            mid = (lo + hi) / 2
            if rel_change(math.exp(mid)) <= cfg.tau:
                lo = mid
            else:
                hi = mid
        return math.exp(lo)

    def _secant(self, rel_change) -> float:
        """Largest sigma seen with rel_change(sigma) <= tau, stepping along the local power law of the change."""
        cfg = self.config
        lo_log, hi_log = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
        target = 0.85 * cfg.tau
        points: list[tuple[float, float]] = []  # (log sigma, log change) of measurable changes
        best, log_s = 0.0, (lo_log + hi_log) / 2
        for _ in range(cfg.search_steps + 2):
            change = rel_change(math.exp(log_s))
            if change <= cfg.tau:
                best = max(best, math.exp(log_s))
                if change >= 0.7 * cfg.tau or log_s >= hi_log:
                    break
            elif log_s <= lo_log:
                break
            if change <= 1e-12:  # too small to measure: a big step up
                step = math.log(100.0)
            else:
                points.append((log_s, math.log(change)))
                slope = 2.0
                if len(points) >= 2:
                    (x0, y0), (x1, y1) = points[-2], points[-1]
                    if abs(x1 - x0) > 1e-9:
                        slope = min(max((y1 - y0) / (x1 - x0), 0.5), 4.0)
                step = (math.log(target) - math.log(change)) / slope
            log_s = min(max(log_s + step, lo_log), hi_log)
        return best
