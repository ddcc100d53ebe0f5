"""Bayesian-LoRA (arXiv 2601.21003): LoRA factors generated from inducing weights with a sparse-GP-style prior.

Each targeted LoRA factor ``W`` (``A``: (r, d_in), ``B``: (d_out, r)) is *generated* from a small inducing matrix:
whitened ``u₀ ~ N(μ, diag(σ²))`` (m_r, m_c), a masked autoregressive flow ``u = f(u₀)``, then
``W = prior_sd · (T_r U T_c + λ · Matheron noise)`` with ``U = L_r u L_cᵀ`` under the Kronecker prior
``K_U = K_c ⊗ K_r`` (the math is in :mod:`bayeslora.methods.sgp_math`). The PEFT weight of a generated factor is
frozen and unused by bayeslora; it is saved as the factor's deterministic value, so that plain PEFT loads
the posterior-mean adapter.

Loss (per training question): ``CE + kl_weight / N · Σ_layers [log q₀(u₀) - log|det ∂f/∂u₀| - log p(u)
+ d_in d_out (λ²/2 - log λ - 1/2)]``, a one-sample estimate of the inducing KL plus the closed-form conditional KL.
The reference code weights the KL by ``0.1 / n_batches`` (= ``0.1 · batch / N``, i.e. ``kl_weight = 0.8`` at batch 8,
our default) and switches it on after 2 of 6 epochs; here it is on from the first step (documented in
docs/results/sgp.md). Its label smoothing and entropy bonus are left out so the loss compares with the other
methods. Test-time prediction averages ``n_samples`` (default 4, as in the reference code) weight samples, one per
question, run as one batched forward per ``sample_chunk`` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..peft_ext import SamplingState, StochasticLoraA, peft_quietly, replace_lora_A, replace_lora_B
from .base import AdapterConfig, BayesianMethod, MethodError, SampledConfig
from .registry import register_method
from .sgp_math import (
    MaskedAffineFlow,
    conditional_kl,
    diag_normal_logpdf,
    standard_normal_logpdf,
    whitened_inducing_noise,
    whitened_prior,
)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclass
class SGPConfig(SampledConfig):
    """Options of Bayesian-LoRA; defaults follow the reference code's ``inducing8`` configuration."""

    n_samples: int = field(default=4, metadata={"help": "posterior samples at test time (reference code: 4)"})
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "lm_head"],
                               metadata={"help": "LoRA modules whose A and B factors are generated (added to the "
                                                 "adapter's target modules when missing)"})
    inducing_rows: int = field(default=9, metadata={"help": "m_r: rows of the inducing matrix U"})
    inducing_cols: int = field(default=9, metadata={"help": "m_c: columns of the inducing matrix U"})
    prior_sd: float = field(default=0.1, metadata={"help": "prior scale of the generated weights"})
    sqrt_width_scaling: bool = field(default=True, metadata={"help": "divide prior_sd by sqrt(d_in)"})
    init_lamda: float = field(default=1e-3, metadata={"help": "initial conditional-noise scale lambda"})
    max_lamda: float = field(default=0.03, metadata={"help": "cap of lambda"})
    learn_lamda: bool = field(default=True, metadata={"help": "learn lambda (else fixed at init_lamda)"})
    init_sd_u: float = field(default=1e-3, metadata={"help": "initial posterior sd of the whitened inducing weights"})
    max_sd_u: float = field(default=0.1, metadata={"help": "cap of that sd"})
    flow_hidden: int = field(default=16, metadata={"help": "hidden units of the MAF over U's rows (0: no flow)"})
    kl_weight: float = field(default=0.8, metadata={"help": "KL weight times 1/N (reference: 0.1/n_batches)"})
    sample_chunk: int = field(default=8, metadata={"help": "test-time samples per batched forward (0: all S in one; "
                                                            "a memory bound)"})
    scale_lr: float | None = field(default=None, metadata={"help": "learning rate of the posterior scales (lambda "
                                                                    "and the inducing sd; default: the run's --lr). "
                                                                    "Adam moves their softplus parameters by ~lr per "
                                                                    "step, so from 1e-3 a short schedule leaves the "
                                                                    "posterior a point mass"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise MethodError(f"Expected `targets` to be a non-empty list of module names, but got {self.targets!r}")
        for name in ("inducing_rows", "inducing_cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MethodError(f"Expected `{name}` to be a positive int, but got {value!r}")
        if not isinstance(self.flow_hidden, int) or self.flow_hidden < 0:
            raise MethodError(f"Expected `flow_hidden` to be a non-negative int, but got {self.flow_hidden!r}")
        for name in ("prior_sd", "init_lamda", "max_lamda", "init_sd_u", "max_sd_u"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise MethodError(f"Expected `{name}` to be a positive number, but got {value!r}")
        if self.init_lamda > self.max_lamda or self.init_sd_u > self.max_sd_u:
            raise MethodError("Expected `init_lamda` <= `max_lamda` and `init_sd_u` <= `max_sd_u`")
        if self.scale_lr is not None and not (isinstance(self.scale_lr, (int, float))
                                              and 0 < self.scale_lr < math.inf):
            raise MethodError(f"Expected `scale_lr` to be a positive number (or unset), but got {self.scale_lr!r}")
        if not isinstance(self.kl_weight, (int, float)) or not 0 <= self.kl_weight < math.inf:
            raise MethodError(f"Expected `kl_weight` to be a non-negative number, but got {self.kl_weight!r}")


def per_group_matmul(x: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r] @ weights[groups[r]]``: x (R, T, i), weights (G, i, o), groups (R,) -> (R, T, o).

    When the rows come in equal consecutive blocks per group (the scorer's layout), no per-row weight copy is made.
    """
    R, T, _ = x.shape
    G = weights.shape[0]
    if R % G == 0:
        k = R // G
        if torch.equal(groups, torch.arange(G, device=groups.device).repeat_interleave(k)):
            return torch.bmm(x.reshape(G, k * T, -1), weights).reshape(R, T, -1)
    return torch.bmm(x, weights[groups])


class SGPLoraFactor(StochasticLoraA):
    """A LoRA factor (d_out, d_in) generated from whitened inducing weights; one sample per sample group.

    Outside a sampling context the factor is deterministic: ``prior_sd · Q_r f(μ) Q_cᵀ`` (no conditional noise).
    """

    def __init__(self, linear: nn.Linear, config: SGPConfig):
        super().__init__(linear)
        self.weight.requires_grad_(False)  # the factor is generated; PEFT's weight is kept only for reloading
        # posterior tensors and the generation math stay float32 even on a half-precision model (as the reference
        # code's forced fp32 I/O): Cholesky and triangular solves are not available or not stable in 16 bits
        kw = dict(dtype=torch.float32, device=linear.weight.device)
        d_out, d_in, m_r, m_c = linear.out_features, linear.in_features, config.inducing_rows, config.inducing_cols
        self.prior_sd = config.prior_sd / math.sqrt(d_in) if config.sqrt_width_scaling else config.prior_sd
        self.max_lamda, self.max_sd_u = config.max_lamda, config.max_sd_u
        self.inducing_mean = nn.Parameter(torch.randn(m_r, m_c, **kw))
        self.inducing_rho = nn.Parameter(torch.full((m_r, m_c), _inverse_softplus(config.init_sd_u), **kw))
        self.z_row = nn.Parameter(torch.randn(m_r, d_out, **kw) * m_r**-0.5)
        self.z_col = nn.Parameter(torch.randn(m_c, d_in, **kw) * m_c**-0.5)
        self.d_row_rho = nn.Parameter(torch.full((m_r,), _inverse_softplus(1e-3), **kw))
        self.d_col_rho = nn.Parameter(torch.full((m_c,), _inverse_softplus(1e-3), **kw))
        lamda_rho = torch.tensor(_inverse_softplus(config.init_lamda), **kw)
        if config.learn_lamda:
            self.lamda_rho = nn.Parameter(lamda_rho)
        else:
            self.register_buffer("lamda_rho", lamda_rho)
        self.flow = MaskedAffineFlow(m_c, config.flow_hidden).to(**kw) if config.flow_hidden else None
        self._flow_kl: torch.Tensor | None = None

    # -- posterior pieces -------------------------------------------------------------------------------------
    def lamda(self) -> torch.Tensor:
        return nn.functional.softplus(self.lamda_rho).clamp(max=self.max_lamda)

    def sd_u(self) -> torch.Tensor:
        return nn.functional.softplus(self.inducing_rho).clamp(max=self.max_sd_u)

    def priors(self):
        rows = whitened_prior(self.z_row, nn.functional.softplus(self.d_row_rho), "K_r")
        cols = whitened_prior(self.z_col, nn.functional.softplus(self.d_col_rho), "K_c")
        return rows, cols

    def apply_flow(self, u0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, m_r, m_c) -> (u (G, m_r, m_c), log|det| (G,)); the flow acts on each row of U."""
        if self.flow is None:
            return u0, u0.new_zeros(u0.shape[0])
        u, logdet = self.flow(u0)
        return u, logdet.sum(-1)

    def flow_kl(self, u0: torch.Tensor) -> torch.Tensor:
        """One-sample estimate of KL(q(u) || N(0, I)) averaged over the samples ``u0`` (G, m_r, m_c)."""
        u, logdet = self.apply_flow(u0)
        return (diag_normal_logpdf(u0, self.inducing_mean, self.sd_u()) - logdet - standard_normal_logpdf(u)).mean()

    def kl(self) -> torch.Tensor:
        """Inducing KL of the last training sample (or at ``u₀ = μ`` when there is none) + the conditional KL."""
        flow_kl, self._flow_kl = self._flow_kl, None
        if flow_kl is None:
            flow_kl = self.flow_kl(self.inducing_mean[None])
        return flow_kl + conditional_kl(self.lamda(), self.in_features * self.out_features)

    def mean_weight(self) -> torch.Tensor:
        """The deterministic factor (d_out, d_in) used outside a sampling context."""
        rows, cols = self.priors()
        u, _ = self.apply_flow(self.inducing_mean[None])
        return self.prior_sd * rows.Q @ u[0] @ cols.Q.T

    # -- forward ----------------------------------------------------------------------------------------------
    def _noise(self, state: SamplingState, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-group standard normals: eps of u₀ and e1..e4 of the joint prior sample (cached in the context)."""
        (d_out, d_in), (m_r, m_c) = self.weight.shape, self.inducing_mean.shape
        shapes = [(m_r, m_c), (d_out, d_in), (d_out, m_c), (m_r, d_in), (m_r, m_c)]
        flat = state.noise(self, (sum(a * b for a, b in shapes),), x.device, x.dtype)  # (G, total)
        parts = flat.split([a * b for a, b in shapes], dim=1)
        return tuple(p.reshape(-1, *s) for p, s in zip(parts, shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.priors()
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # (R, T, d_in)
        xc = flat @ cols.Q  # (R, T, m_c)
        state = self._sampling
        if state is None:
            u, _ = self.apply_flow(self.inducing_mean[None])
            out = (xc @ u[0].T) @ rows.Q.T
        else:
            eps, e1, e2, e3, e4 = self._noise(state, flat)
            u0 = self.inducing_mean + self.sd_u() * eps  # (G, m_r, m_c)
            u, _ = self.apply_flow(u0)
            lam = self.lamda()
            v = u - lam * whitened_inducing_noise(rows, cols, e1, e2, e3, e4)  # (G, m_r, m_c)
            groups = state.row_groups(x.shape[0]).to(x.device)  # (R,)
            out = per_group_matmul(xc, v.transpose(1, 2), groups) @ rows.Q.T
            out = out + lam * per_group_matmul(flat, e1.transpose(1, 2), groups)
            if torch.is_grad_enabled():
                self._flow_kl = self.flow_kl(u0)
        return (self.prior_sd * out).reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _matches(layer_name: str, targets: list[str]) -> bool:
    return any(layer_name == t or layer_name.endswith("." + t) for t in targets)


@register_method
class SGP(BayesianMethod):
    name = "sgp"
    description = ("Bayesian-LoRA (arXiv 2601.21003): LoRA factors of q/k/lm_head generated from inducing weights "
                   "with a Kronecker sparse-GP prior, a flow posterior and Matheron sampling")
    point_mass_hint = "a longer schedule, or a learning rate for the posterior scales: --option scale_lr=..."
    config_cls = SGPConfig

    def __init__(self, config: SGPConfig | None = None):
        super().__init__(config)
        self._layers: list[SGPLoraFactor] = []

    def prepare(self, base_model: torch.nn.Module, adapter: AdapterConfig):
        from peft import get_peft_model

        targets = list(dict.fromkeys([*adapter.target_modules, *self.config.targets]))
        with peft_quietly():
            model = get_peft_model(base_model, adapter.lora_config(target_modules=targets))
        self.attach(model)
        return model

    def attach(self, model) -> None:
        def factory(_name: str, linear: nn.Linear) -> SGPLoraFactor:
            return SGPLoraFactor(linear, self.config)

        def include(name: str) -> bool:
            return _matches(name, self.config.targets)

        try:
            self._layers = [*replace_lora_A(model, factory, include=include),
                            *replace_lora_B(model, factory, include=include)]
        except ValueError as exc:
            raise MethodError(f"sgp found no LoRA layer among its `targets` {self.config.targets}: {exc}") from None

    def param_groups(self, model) -> list[dict]:
        groups = super().param_groups(model)
        if self.config.scale_lr is None:
            return groups
        scales = {id(p) for layer in self._layers for p in (layer.lamda_rho, layer.inducing_rho)
                  if isinstance(p, nn.Parameter) and p.requires_grad}
        rest = [p for p in groups[0]["params"] if id(p) not in scales]
        return [{**groups[0], "params": rest},
                {"params": [p for p in groups[0]["params"] if id(p) in scales], "weight_decay": 0.0,
                 "lr": self.config.scale_lr}]

    def kl(self) -> torch.Tensor:
        if not self._layers:
            return torch.zeros(())
        return torch.stack([layer.kl() for layer in self._layers]).sum()

    def save(self, model, out_dir) -> None:
        """As every method, but the PEFT weight of each generated factor is written as its deterministic factor
        (:meth:`SGPLoraFactor.mean_weight`): plain PEFT then loads the adapter the run predicts with at
        ``--samples 0``, where it used to load the frozen initial weights of those factors. bayeslora itself never
        reads them (it rebuilds the factors from the posterior)."""
        with torch.no_grad():
            kept = [layer.weight.detach().clone() for layer in self._layers]
            for layer in self._layers:
                layer.weight.copy_(layer.mean_weight().to(layer.weight.dtype))
        try:
            super().save(model, out_dir)
        finally:
            with torch.no_grad():
                for layer, weight in zip(self._layers, kept, strict=True):
                    layer.weight.copy_(weight)

    def kl_scale(self, n_train: int) -> float:
        return self.config.kl_weight / max(n_train, 1)

