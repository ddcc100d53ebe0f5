"""Laplace-LoRA (Yang, Robeyns, Wang, Aitchison, ICLR 2024, "Bayesian Low-rank Adaptation for Large Language
Models"): a Laplace approximation over the LoRA parameters around a trained adapter.

* Curvature: per LoRA matrix ``W`` (each ``lora_A`` and ``lora_B``) a Kronecker-factored Fisher
  ``F_W ~= N * (E[x x^T] (x) E[g g^T])`` (KFAC-*reduce*, Eschenhagen et al. 2023: per question, the layer inputs
  are averaged and the output gradients summed over its rows and tokens), with labels sampled from the model
  (``fisher="mc"``, an unbiased GGN estimate) or the true labels (``"empirical"``). Each factor is kept as its top
  ``max_rank`` eigenpairs: the LM head's output side has vocabulary width (49k for SmolLM2), whose dense factor
  would take ~10 GB — the reason for a low-rank factor (as in ``MaximeRobeyns/bayesian_lora``) and for not using
  laplace-torch's dense ``kron`` (also: in cloze scoring a question spans several rows, which its backends treat
  as separate data points). Directions outside the kept eigenspace get the prior variance (conservative).
* Both the curvature and the Jacobians run on the scorer's shared-prefix layout (the context once per question,
  the choices on its KV cache): the hooks see both forwards, and a context position's output gradient there is the
  sum of its copies' gradients in the one-pass layout, so gradients and Jacobians are exact; only the KFAC input
  mean counts a context token once per question instead of once per choice. Measured on ARC-E (SmolLM2, CPU):
  forward+backward 0.39x of the one-pass layout (docs/results/speed_scoring.md).
* Posterior precision ``F + delta I``; the prior precision ``delta`` minimizes the validation NLL of the
  closed-form predictive (mean-field, or probit with ``link="probit"``; ``prior="val_nll"``, the default) or
  maximizes the Laplace evidence (``"marglik"``; ``"marglik_ab"``: one precision for the A factors and one for
  the B factors, each maximizing its own part of the evidence), on a log grid.
* Predictive: the linearized (GLM) model, choice logits ``~ N(f(x; theta*), J Sigma J^T)`` with ``J`` the
  Jacobian ``(C, P)`` of the ``C`` choice logits w.r.t. the LoRA parameters (one backward pass per choice), and
  the pairwise mean-field (default: closed form, shift-invariant; its ``n_samples`` logit samples give the
  aleatoric / epistemic split), the probit or an MC link (``n_samples`` logit samples; ``0``: probit). Cost: one
  forward + ``C`` backwards (one vectorized backward with ``is_grads_batched``); the link's cost is negligible.
  The Jacobians and links are :mod:`bayeslora.methods.linearized`, shared with TFB's ``predictive="glm"``.
* ``subset="last_layer"``: only the LM-head LoRA (cheap backward passes).

Saved (``posterior.safetensors``): eigenvectors/eigenvalues of every factor, ``delta`` and ``N``: no refit needed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import torch

from ..peft_ext import lora_layers
from ..predictive import Predictive
from ..tasks import random_subset as subsample
from .base import MethodConfig, MethodError, SamplePlan
from .linearized import (Link, capture_io, forward_passes, glm_predictive, grad_only, lora_jacobians, meanfield_probs,
                         probit_probs, recorded_calls)
from .posthoc_base import PosthocMethod, batches
from .registry import register_method


class Subset(str, Enum):
    ALL = "all"
    """Every LoRA matrix of the adapter."""
    LAST_LAYER = "last_layer"
    """Only the LoRA of the LM head."""


class PriorFit(str, Enum):
    MARGLIK = "marglik"
    """Maximize the Laplace marginal likelihood (evidence) of the fit data."""
    VAL_NLL = "val_nll"
    """Minimize the validation NLL of the closed-form predictive (mean-field; probit for ``link="probit"``)."""
    MARGLIK_AB = "marglik_ab"
    """The evidence with two precisions, one for all ``A`` factors and one for all ``B`` factors, each maximized on
    its own (the log evidence separates into the two groups). ``A`` starts random and keeps most of its initial
    norm, ``B`` starts at zero: one shared precision is set by ``A``'s initial norm (``delta ~ gamma / |theta|^2``)
    and is far too weak for ``B`` (docs/FINDINGS.md, finding 11)."""


#: prior=val_nll: the largest prior precision of its grid (1e-6 .. 1e8, four per decade)
VAL_GRID_MAX = 1e8


def val_nll_grid() -> torch.Tensor:
    """The prior precisions that ``prior=val_nll`` tries: 1e-6 .. ``VAL_GRID_MAX``, four per decade."""
    return torch.logspace(-6, math.log10(VAL_GRID_MAX), 57, dtype=torch.float64)


def _is_a(key: str) -> bool:
    return key.endswith("lora_A")


class LaplaceError(MethodError):
    """The curvature or the prior cannot be fitted (NaN, singular, no LoRA to cover)."""


@dataclass
class LaplaceConfig(MethodConfig):
    n_samples: int = field(default=50, metadata={"help": "logit samples: the MC link's, or meanfield's uncertainty "
                                                         "split (0: no samples; mc then uses the probit)"})
    subset: str = field(default="all", metadata={"help": "all | last_layer (LM-head LoRA only)"})
    # val_nll by default: on small fit sets the evidence picks a far too weak prior (measured on the cpu-fewshot grid,
    # docs/FINDINGS.md: precision ~2, ARC-E accuracy 61.7 -> 50.0), because |theta|^2 is dominated by the random
    # init of the LoRA A matrices, which the data never determine, while only the few data-determined directions
    # pull the other way (MacKay: delta = gamma / |theta|^2).
    prior: str = field(default="val_nll", metadata={"help": "val_nll | marglik | marglik_ab (one evidence precision "
                                                             "for the A factors, one for B): how the prior is tuned "
                                                             "(val_nll uses the dataset's validation split; a user "
                                                             "file is one split, so there it tunes on the fit data "
                                                             "itself: prefer marglik)"})
    prior_precision: float | None = field(default=None, metadata={"help": "fixed prior precision (skip tuning)"})
    # meanfield by default: on cpu-overfit (3 seeds) the MC link at 50 samples moved test accuracy by +-3-5 points
    # from draw to draw and, converged, lost 1.7-3.3 points; the probit reorders cloze answers (not shift-invariant);
    # the mean-field kept accuracy on every seed of cpu-overfit and cpu-fewshot, at an NLL 0.3-2.1% (overfit) and
    # 3-5% (fewshot) above the converged MC's (docs/FINDINGS.md, finding 10)
    PREDICTION_OPTIONS: ClassVar[tuple[str, ...]] = ("n_samples", "link")
    link: str = field(default="meanfield", metadata={"help": "meanfield | mc | probit: the link approximation (the "
                                                             "prior is tuned with probit for probit, else meanfield)"})
    fisher: str = field(default="mc", metadata={"help": "mc (sampled labels) | empirical (true labels)"})
    # 100 fit and 128 validation questions (were 500 / 200, then 200 / 64): the fit is a curvature pass (about one
    # training step per question) plus the Jacobians of the validation questions (one backward per choice, about
    # three steps per question), so the budget of #4 (0.25x an MLE epoch over ARC-E's 2251 questions) buys about
    # 100 + 128. The prior is where the questions pay: on the cpu-fewshot adapters, bootstrap draws of 128 instead
    # of 64 validation questions raised ECE above the adapter's in 3-25% of draws instead of 9-33% (mean ECE 6.3
    # against 6.8, MLE 8.0), while curvature on 64, 100 or 200 questions gave the same prior and test NLL on a
    # full-data adapter (docs/FINDINGS.md, findings 24-25). Small presets fit on their fit_limit training questions.
    n_fit: int = field(default=100, metadata={"help": "questions used to estimate the curvature (scaled to N)"})
    n_data: int | None = field(default=None, metadata={"help": "N, the training-set size the curvature is scaled "
                                                              "to (default: the number of fit-split examples)"})
    n_val: int = field(default=128, metadata={"help": "validation questions for prior=val_nll (drawn at random from "
                                                       "the split)"})
    max_rank: int = field(default=256, metadata={"help": "eigenpairs kept per Kronecker factor"})

    def sample_plan(self) -> SamplePlan:
        # the posterior is read through the choice logits' Jacobians: generation decodes the adapter alone
        return SamplePlan(decodes=False)

    def __post_init__(self):
        super().__post_init__()
        for name, enum in (("subset", Subset), ("prior", PriorFit), ("link", Link)):
            try:
                enum(getattr(self, name))
            except ValueError:
                choices = [e.value for e in enum]
                raise MethodError(f"Expected `{name}` in {choices}, got {getattr(self, name)!r}") from None
        if self.fisher not in ("mc", "empirical"):
            raise MethodError(f"Expected `fisher` to be 'mc' or 'empirical', got {self.fisher!r}")
        for name in ("n_fit", "n_val", "max_rank") + (("n_data",) if self.n_data is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MethodError(f"Expected `{name}` to be a positive int, got {getattr(self, name)!r}")
        if self.prior_precision is not None and not self.prior_precision > 0:
            raise MethodError(f"Expected `prior_precision` > 0, got {self.prior_precision!r}")


# -- pure math ----------------------------------------------------------------------------------------------------
def low_rank_eigen(vectors: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs of ``vectors^T vectors / n`` for ``vectors (n, d)``: ``Q (d, k)``, ``lam (k,)``, k<=max_rank."""
    n, d = vectors.shape
    v = vectors.double()
    if d <= n:
        lam, Q = torch.linalg.eigh(v.T @ v / n)
        lam, Q = lam.flip(0), Q.flip(1)
    else:  # wide side (e.g. the LM head's vocabulary): right singular vectors, never the (d, d) matrix
        _, s, Vh = torch.linalg.svd(v, full_matrices=False)
        lam, Q = s**2 / n, Vh.T
    k = min(max_rank, lam.shape[0])
    return Q[:, :k].float().contiguous(), lam[:k].clamp_min(0.0).float().contiguous()


def log_evidence(eig: torch.Tensor, sq_norm: float, prior_precision: torch.Tensor) -> torch.Tensor:
    """Laplace log evidence up to terms constant in ``delta``: ``-(logdet(1 + eig/delta) + delta |theta|^2) / 2``.

    eig: eigenvalues ``N lam_g lam_a`` of the data precision (all Kronecker pairs); prior_precision: ``(G,)`` grid.
    """
    delta = prior_precision.double()[:, None]
    return -0.5 * (torch.log1p(eig.double()[None, :] / delta).sum(-1) + delta[:, 0] * sq_norm)


# -- the layers covered --------------------------------------------------------------------------------------------
@dataclass
class _Factor:
    """KFAC eigenbasis of one LoRA matrix W (d_out, d_in): input side (qa, la), output-gradient side (qg, lg)."""

    module: torch.nn.Linear
    qa: torch.Tensor | None = None  # (d_in, k_a)
    la: torch.Tensor | None = None  # (k_a,)
    qg: torch.Tensor | None = None  # (d_out, k_g)
    lg: torch.Tensor | None = None  # (k_g,)

    def eig(self, n_data: float) -> torch.Tensor:
        return (n_data * self.lg[:, None] * self.la[None, :]).flatten()  # (k_g * k_a,)


def _per_question(calls: list[tuple[torch.Tensor, torch.Tensor]], passes, n_q: int):
    """KFAC-reduce statistics over one module's forwards ``calls`` = ``[(input x (rows, T', d_in), output grad
    (rows, T', d_out))]``: per question the mean input ``(B, d_in)`` over its valid positions and the summed output
    gradient ``(B, d_out)``."""
    d_in, d_out = calls[0][0].shape[-1], calls[0][1].shape[-1]
    kw = dict(dtype=torch.float64, device=calls[0][0].device)
    xs, cnt, gs = torch.zeros(n_q, d_in, **kw), torch.zeros(n_q, **kw), torch.zeros(n_q, d_out, **kw)
    for (x, g), (mask, rows) in zip(calls, passes, strict=True):
        m = mask[:, -x.shape[1]:].to(x.dtype)[..., None]  # (rows, T', 1): the positions this layer saw
        xs.index_add_(0, rows, (x * m).sum(1).double())
        cnt.index_add_(0, rows, m.sum((1, 2)).double())
        gs.index_add_(0, rows, g.sum(1).double())
    return (xs / cnt.clamp_min(1.0)[:, None]).float(), gs.float()


@register_method
class Laplace(PosthocMethod):
    name = "laplace"
    description = "Laplace-LoRA: KFAC posterior around a trained adapter, tuned prior, GLM predictive (post hoc)"
    point_mass_hint = ("its prior was tuned strong: no spread lowered the NLL of its validation questions; more of "
                       "them (--option n_val=N) or a fixed weaker prior (--option prior_precision=P) at refit")
    config_cls = LaplaceConfig

    def __init__(self, config: LaplaceConfig | None = None):
        super().__init__(config)
        self.factors: dict[str, _Factor] = {}
        self.prior_precision = float("nan")
        self.prior_precision_a: float | None = None  # the A factors' own precision (prior="marglik_ab")
        self.n_data = 0.0

    @property
    def tune_split(self) -> str | None:
        if self.config.prior == PriorFit.VAL_NLL.value and self.config.prior_precision is None:
            return "validation"
        return None

    # -- covered modules ------------------------------------------------------------------------------------
    def _modules(self, model) -> dict[str, torch.nn.Linear]:
        out = {}
        for name, layer in lora_layers(model):
            if "default" not in layer.lora_A:
                continue
            if self.config.subset == Subset.LAST_LAYER.value and not name.endswith("lm_head"):
                continue
            out[f"{name}.lora_A"] = layer.lora_A["default"]
            out[f"{name}.lora_B"] = layer.lora_B["default"]
        if not out:
            raise LaplaceError(f"The adapter has no LoRA layers for subset={self.config.subset!r}"
                               + (" (no LoRA on lm_head): use --option subset=all" if self.config.subset != "all"
                                  else ""))
        return out

    def _bind(self, model) -> None:
        modules = self._modules(model)
        if self.factors and set(self.factors) == set(modules):
            for k, m in modules.items():
                self.factors[k].module = m
        else:
            self.factors = {k: _Factor(m) for k, m in modules.items()}

    # -- fit ------------------------------------------------------------------------------------------------
    def _curvature_stats(self, model, scorer, examples, batch_size, generator) -> dict[str, tuple[list, list]]:
        modules = self.jacobian_modules()
        stats = {k: ([], []) for k in modules}
        n_choices = max(ex.n_choices for ex in examples)
        device = next(model.parameters()).device
        params = [m.weight for m in modules.values()]
        for chunk in batches(examples, batch_size, desc="curvature"):
            enc = scorer.encode(chunk, n_choices=n_choices).to(device)
            with grad_only(model, params), capture_io(modules) as io:
                enc = enc.for_autograd()
                logits = scorer.choice_logits(model, enc)
                if not torch.isfinite(logits.masked_fill(~enc.choice_mask, 0.0)).all():
                    raise LaplaceError("The adapter's logits are NaN/inf on the fit data: the curvature would be NaN "
                                       "(check the source adapter's weights)")
                y = enc.labels
                if self.config.fisher == "mc":
                    y = torch.multinomial(torch.softmax(logits.detach().float().cpu(), -1), 1, generator=generator)
                    y = y[:, 0].to(logits.device)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                calls = recorded_calls(io, enc)
                grads = torch.autograd.grad(loss, [io[k][i][1] for k, i in calls], allow_unused=True)
            grad_of = dict(zip(calls, grads, strict=True))
            for k in io:
                per_call = []
                for i, (x, out) in enumerate(io[k]):
                    g = grad_of[k, i]
                    per_call.append((x, torch.zeros_like(out) if g is None else g.detach()))
                xb, gb = _per_question(per_call, forward_passes(enc), enc.n_questions)
                stats[k][0].append(xb.cpu())
                stats[k][1].append(gb.cpu())
        return stats

    def _factorize(self, stats) -> None:
        for k, (xs, gs) in stats.items():
            X, G = torch.cat(xs), torch.cat(gs)
            if not (torch.isfinite(X).all() and torch.isfinite(G).all()):
                raise LaplaceError(f"The curvature of {k} is NaN/inf: the source adapter or the data produce "
                                   "non-finite gradients; check the adapter (or lower max_length)")
            f = self.factors[k]
            f.qa, f.la = low_rank_eigen(X, self.config.max_rank)
            f.qg, f.lg = low_rank_eigen(G, self.config.max_rank)
        if all(float(f.lg.max()) * float(f.la.max()) <= 0.0 for f in self.factors.values()):
            raise LaplaceError("The curvature is zero (singular): the adapter's gradients vanish on the fit data; "
                               "use more or other fit examples, or --option fisher=mc")

    def _tune_marglik(self, keys: list[str] | None = None) -> tuple[float, float]:
        """The evidence-maximizing precision of the factors ``keys`` (default: all) on a log grid."""
        factors = [self.factors[k] for k in (keys if keys is not None else self.factors)]
        eig = torch.cat([f.eig(self.n_data) for f in factors])
        sq_norm = float(sum(f.module.weight.detach().double().pow(2).sum() for f in factors))
        grid = torch.logspace(-6, 8, 281, dtype=torch.float64)
        ev = log_evidence(eig, sq_norm, grid)
        i = int(ev.argmax())
        return float(grid[i]), float(ev[i])

    def _delta(self, key: str, delta: float) -> float:
        return self.prior_precision_a if self.prior_precision_a is not None and _is_a(key) else delta

    def _tune_val_nll(self, model, scorer, validation, batch_size) -> tuple[float, float]:
        grid = val_nll_grid()
        nll = torch.zeros(len(grid), dtype=torch.float64)
        device = next(model.parameters()).device
        closed_form = probit_probs if self.config.link == Link.PROBIT.value else meanfield_probs
        for chunk in batches(validation, batch_size, desc="prior (Jacobians)"):
            enc = scorer.encode(chunk).to(device)  # the batch's own choice count: one backward per choice
            mean, feats, gram = self._jacobian_features(model, scorer, enc, relative=closed_form is meanfield_probs)
            for i, cov in enumerate(self.logit_covs(feats, gram, grid.tolist())):
                probs = closed_form(mean, cov)
                nll[i] -= probs.gather(1, enc.labels.cpu()[:, None]).clamp_min(1e-30).log().sum().double()
        i = int(nll.argmin())
        return float(grid[i]), float(nll[i] / len(validation))

    def fit(self, model, scorer, examples, batch_size=8, generator=None, validation=None) -> dict:
        cfg = self.config
        self._bind(model)
        fit_set = subsample(examples, cfg.n_fit, generator)
        self.n_data = float(cfg.n_data if cfg.n_data is not None else len(examples))
        t0 = time.perf_counter()
        self._factorize(self._curvature_stats(model, scorer, fit_set, batch_size, generator))
        t1 = time.perf_counter()
        result = {"n_fit": len(fit_set), "n_data": int(self.n_data), "n_params": self._n_params(),
                  "subset": cfg.subset, "curvature_time_s": round(t1 - t0, 3)}
        if cfg.prior_precision is not None:
            self.prior_precision = float(cfg.prior_precision)
        elif cfg.prior == PriorFit.MARGLIK.value:
            self.prior_precision, result["log_evidence"] = self._tune_marglik()
        elif cfg.prior == PriorFit.MARGLIK_AB.value:
            a_keys = [k for k in self.factors if _is_a(k)]
            b_keys = [k for k in self.factors if not _is_a(k)]
            self.prior_precision, ev_b = self._tune_marglik(b_keys)
            self.prior_precision_a, ev_a = self._tune_marglik(a_keys)
            result["log_evidence"] = ev_a + ev_b
            result["prior_precision_a"] = self.prior_precision_a
        else:
            if not validation:
                raise LaplaceError("prior=val_nll (the default) needs validation examples and the split is empty: "
                                   "use a dataset with a validation split, or --option prior=marglik")
            val = subsample(validation, cfg.n_val, generator)
            self.prior_precision, result["val_nll"] = self._tune_val_nll(model, scorer, val, batch_size)
            if self.prior_precision >= VAL_GRID_MAX * (1 - 1e-9):
                result["note"] = (f"the validation NLL is lowest at the strongest prior tried ({VAL_GRID_MAX:g}): on "
                                  "these validation questions no posterior spread helps, so the predictive is about "
                                  "the adapter's own (more validation questions: --option n_val=N)")
            result["n_val"] = len(val)
        result["prior_time_s"] = round(time.perf_counter() - t1, 3)
        for value in (self.prior_precision, self.prior_precision_a):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise LaplaceError(f"The tuned prior precision is {value}: the curvature is degenerate")
        result["prior_precision"] = self.prior_precision
        return result

    def _n_params(self) -> int:
        return sum(f.module.weight.numel() for f in self.factors.values())

    # -- predictive -----------------------------------------------------------------------------------------
    def _jacobian_features(self, model, scorer, enc, relative: bool = False):
        """Choice logits ``(B, C)``, and per covered matrix the Jacobian in the KFAC eigenbasis ``(B, C, k_g * k_a)``
        and the Gram ``(B, C, C)`` of the full Jacobian (for the prior part of the covariance). ``relative``: of the
        logits' differences to the first choice, one backward fewer (exact for shift-invariant links only)."""
        logits, jacobians = lora_jacobians(model, scorer, enc, self.jacobian_modules(), relative=relative)
        return (logits, *self.project_jacobians(jacobians))

    def jacobian_modules(self) -> dict[str, torch.nn.Module]:
        """The covered LoRA factors, by key: what the curvature and :func:`lora_jacobians` differentiate through."""
        return {k: f.module for k, f in self.factors.items()}

    def project_jacobians(self, jacobians: dict[str, torch.Tensor]):
        """Per covered matrix, the Jacobian ``(C, B, o, i)`` in this fit's KFAC eigenbasis ``(B, C, k_g * k_a)`` and
        the Gram ``(B, C, C)`` of the full Jacobian; fits of one adapter share the Jacobians, not the eigenbasis."""
        C, B = next(iter(jacobians.values())).shape[:2]
        feats, gram = {}, {}
        for k, J in jacobians.items():  # J (C, B, o, i)
            f = self.factors[k]
            feats[k] = torch.einsum("og,cboi,ia->bcga", f.qg, J, f.qa).reshape(B, C, -1)
            Jf = J.transpose(0, 1).reshape(B, C, -1).double()  # (B, C, P_k)
            gram[k] = Jf @ Jf.transpose(1, 2)
        return feats, gram

    def _logit_cov(self, feats: dict[str, torch.Tensor], gram: dict[str, torch.Tensor], delta: float) -> torch.Tensor:
        """``J Sigma J^T`` ``(B, C, C)`` at prior precision ``delta``: :meth:`logit_covs` for one precision."""
        return self.logit_covs(feats, gram, [delta])[0]

    def logit_covs(self, feats: dict[str, torch.Tensor], gram: dict[str, torch.Tensor],
                   deltas: list[float]) -> torch.Tensor:
        """``J Sigma J^T`` ``(G, B, C, C)`` at each prior precision of ``deltas`` ``(G,)``; per matrix
        ``Sigma = Q diag(1/(eig + delta)) Q^T + (I - Q Q^T) / delta`` (``delta``: the matrix's prior precision,
        :meth:`_delta`).

        All precisions in one product per matrix: the outer products ``F_bc F_bd`` ``(B C C, K)`` times the
        weights ``(K, G)``. A loop over the 57 precisions of ``prior=val_nll`` did the same arithmetic in 57 x
        (covered matrices) small products and float64 copies, on the host even when the model is on a GPU
        (docs/FINDINGS.md, finding 28).
        """
        cov = 0.0
        for k, F in feats.items():
            d = torch.tensor([self._delta(k, x) for x in deltas], dtype=torch.float64)[:, None]  # (G, 1)
            w = 1.0 / (self.factors[k].eig(self.n_data).double()[None, :] + d) - 1.0 / d  # (G, K)
            Fd = F.double()
            B, C, K = Fd.shape
            outer = (Fd[:, :, None, :] * Fd[:, None, :, :]).reshape(B * C * C, K)
            cov = cov + (w @ outer.T).reshape(len(deltas), B, C, C) + gram[k][None] / d[:, :, None, None]
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        if not torch.isfinite(cov).all():
            raise LaplaceError("The predictive covariance is NaN/inf: the saved curvature is corrupted")
        return cov.float()

    def predict(self, model, scorer, batch, n_samples=None, generator=None) -> Predictive:
        S = self.resolve_samples(n_samples)
        if not self.factors:
            raise LaplaceError("Laplace has no fitted curvature: fit it (bayeslora bayesianize) or load a run")
        # the mean-field link and logit samples read only the logits' differences: C - 1 backwards, not C
        shift_invariant = self.config.link == Link.MEANFIELD.value or (self.config.link == Link.MC.value and S > 0)
        mean, feats, gram = self._jacobian_features(model, scorer, batch, relative=shift_invariant)
        cov = self._logit_cov(feats, gram, self.prior_precision)
        return glm_predictive(mean, cov, self.config.link, S, generator)

    # -- persistence ----------------------------------------------------------------------------------------
    def state_dict(self, model) -> dict[str, torch.Tensor]:
        # float64 scalars: a reloaded run predicts bit for bit like the fitted one
        state = {"prior_precision": torch.tensor([self.prior_precision], dtype=torch.float64),
                 "n_data": torch.tensor([self.n_data], dtype=torch.float64)}
        if self.prior_precision_a is not None:
            state["prior_precision_a"] = torch.tensor([self.prior_precision_a], dtype=torch.float64)
        for k, f in self.factors.items():
            state.update({f"{k}.qa": f.qa, f"{k}.la": f.la, f"{k}.qg": f.qg, f"{k}.lg": f.lg})
        return state

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        self.factors = {}
        self._bind(model)
        expected = {f"{k}.{s}" for k in self.factors for s in ("qa", "la", "qg", "lg")} | {"prior_precision",
                                                                                            "n_data"}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected - {"prior_precision_a"})
        if missing or unexpected:
            raise LaplaceError(f"The saved Laplace posterior does not match the adapter (subset "
                               f"{self.config.subset!r}): missing {missing[:2]}, unexpected {unexpected[:2]}")
        for k, f in self.factors.items():
            f.qa, f.la, f.qg, f.lg = (state[f"{k}.{s}"].float() for s in ("qa", "la", "qg", "lg"))
            d_out, d_in = f.module.weight.shape
            if f.qa.ndim != 2 or f.qg.ndim != 2 or f.la.ndim != 1 or f.lg.ndim != 1 or f.qa.shape[0] != d_in \
                    or f.qg.shape[0] != d_out or f.qa.shape[1] != f.la.shape[0] or f.qg.shape[1] != f.lg.shape[0]:
                raise LaplaceError(f"The saved curvature of {k} has the wrong shape for the adapter")
            if not all(torch.isfinite(t).all() for t in (f.qa, f.la, f.qg, f.lg)) \
                    or bool((f.la < 0).any() or (f.lg < 0).any()):
                raise LaplaceError(f"The saved curvature of {k} holds non-finite values or negative eigenvalues "
                                   "(a curvature is positive semi-definite): the run is corrupted")
        scalars = {}
        for key in ("prior_precision", "prior_precision_a", "n_data"):
            if key in state:
                value = state[key]
                if value.numel() != 1 or not math.isfinite(float(value)) or float(value) <= 0:
                    raise LaplaceError(f"The saved `{key}` should be one finite positive number, got "
                                       f"{value.flatten()[:3].tolist()}: the run is corrupted")
                scalars[key] = float(value)
        self.prior_precision = scalars["prior_precision"]
        self.prior_precision_a = scalars.get("prior_precision_a")
        self.n_data = scalars["n_data"]
