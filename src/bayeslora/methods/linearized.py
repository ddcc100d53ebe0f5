"""The linearized (GLM) predictive of a Gaussian posterior over LoRA weights, shared by the post-hoc methods
(Laplace-LoRA; TFB with ``predictive="glm"``).

Around the adapter's weights ``theta*`` the choice logits are linearized, ``f(x; theta) ~ f(x; theta*) + J (theta -
theta*)``, so a posterior ``N(theta*, Sigma)`` gives Gaussian logits ``N(f(x; theta*), J Sigma J^T)`` over the
``C`` choices (Immer, Korzepa & Bauer 2021; Laplace-LoRA's predictive). ``J`` is the ``(C, P)`` Jacobian of the
choice logits w.r.t. the covered LoRA matrices, from forward hooks on those modules and one vectorized backward per
batch (:func:`lora_jacobians`); a link approximation (:class:`Link`) turns the logit Gaussian into probabilities.

Both scorer layouts work: in the shared-prefix layout (the context once per question, the choices on its KV cache)
the hooks see both forwards and a context position's output gradient there is the sum of its copies' gradients in
the one-pass layout, so the Jacobians are exact.
"""

from __future__ import annotations

import contextlib
import math
from enum import Enum

import torch

from ..predictive import Predictive
from .base import MethodError


class Link(str, Enum):
    PROBIT = "probit"
    """``softmax(mu / sqrt(1 + pi/8 var))``: closed form, no samples. Not invariant to a shift of all choice logits
    (cloze logits are negative log-likelihoods, so a choice with a larger variance gains probability)."""
    MEANFIELD = "meanfield"
    """Pairwise mean-field (Lu, Ie & Sha 2020): ``p_i ~ 1 / sum_j exp(-(mu_i - mu_j) / sqrt(1 + pi/8 var(f_i -
    f_j)))``, renormalized: closed form, shift-invariant, uses the full covariance; the probit for two choices.
    The ``n_samples`` logit samples still give the expected entropy (aleatoric), so epistemic = H[p] minus it."""
    MC = "mc"
    """Mean softmax of ``n_samples`` logit samples (probit when ``n_samples`` is 0)."""


def probit_probs(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Generalized probit: ``softmax(mu / sqrt(1 + pi/8 diag(cov)))``; mean (..., C), cov (..., C, C)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0)
    return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)


def meanfield_probs(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Pairwise mean-field approximation of ``E[softmax(f)]``, ``f ~ N(mean, cov)`` (Lu, Ie & Sha 2020):
    ``p_i = 1 / sum_j exp(-(mu_i - mu_j) / sqrt(1 + pi/8 var(f_i - f_j)))``, renormalized over the present
    choices. mean (B, C) with ``-inf`` at absent choices, cov (B, C, C)."""
    present = torch.isfinite(mean)
    mu = mean.double().masked_fill(~present, 0.0)
    var = torch.diagonal(cov, dim1=-2, dim2=-1).double()
    var_diff = (var[:, :, None] + var[:, None, :] - 2.0 * cov.double()).clamp_min(0.0)  # var(f_i - f_j)
    z = (mu[:, :, None] - mu[:, None, :]) / torch.sqrt(1.0 + math.pi / 8.0 * var_diff)  # (B, i, j)
    z = z.masked_fill(~present[:, None, :], math.inf)  # absent j: no competitor
    log_p = -torch.logsumexp(-z, dim=-1)  # the j = i term is exp(0) = 1
    log_p = log_p.masked_fill(~present, -math.inf)
    return torch.softmax(log_p, dim=-1).float()


def sample_logit_gaussian(mean: torch.Tensor, cov: torch.Tensor, n_samples: int,
                          generator: torch.Generator | None) -> torch.Tensor:
    """``n_samples`` draws ``(S, B, C)`` of ``N(mean (B, C), cov (B, C, C))``; ``-inf`` means stay ``-inf``."""
    C = cov.shape[-1]
    jitter = 1e-6 * (1.0 + torch.diagonal(cov, dim1=-2, dim2=-1).abs().amax(-1))[:, None, None]
    L = torch.linalg.cholesky(cov.double() + jitter.double() * torch.eye(C, dtype=torch.float64))
    eps = torch.randn((n_samples, *mean.shape), generator=generator, dtype=torch.float64)
    return (mean.double()[None] + torch.einsum("bcd,sbd->sbc", L, eps)).float()


# -- Jacobians of the choice logits w.r.t. LoRA weights ---------------------------------------------------------------
@contextlib.contextmanager
def capture_io(modules: dict[str, torch.nn.Module]):
    """Record each module's ``(input (detached), output (in the graph))`` of every forward inside the context."""
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in modules}
    handles = [m.register_forward_hook(lambda mod, inp, out, k=k: store[k].append((inp[0].detach(), out)))
               for k, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_passes(enc) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(mask (rows, T), question of each row (rows,))`` of each forward the scorer runs on ``enc``, in order."""
    if enc.shared_prefix:
        prefix_rows = torch.arange(enc.n_questions, device=enc.prefix_ids.device)
        return [(enc.prefix_mask, prefix_rows), (enc.cont_mask, enc.row_question)]
    return [(enc.attention_mask, enc.row_question)]


def recorded_calls(io: dict[str, list], enc) -> list[tuple[str, int]]:
    """``(module key, forward index)`` of every recorded call; checks each module ran once per forward pass."""
    n = len(forward_passes(enc))
    bad = {k: len(v) for k, v in io.items() if len(v) != n}
    if bad:
        raise MethodError(f"Expected every covered LoRA layer to run {n} time(s) per batch, got {bad}: the scorer's "
                           "forward layout is not supported")
    return [(k, i) for k in io for i in range(n)]


@contextlib.contextmanager
def grad_only(model, params: list[torch.nn.Parameter]):
    """Inside: exactly ``params`` require grad (so the backward stops at the covered LoRA); restored after.

    Autograd is on inside, also where the caller runs under ``torch.no_grad()`` or ``torch.inference_mode()``
    (the Jacobians need it; tensors made in inference mode enter as inputs only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def choice_cotangents(B: int, C: int, relative: bool = False, present: torch.Tensor | None = None,
                      device=None, dtype=None) -> torch.Tensor:
    """The ``(K, B, C)`` output cotangents whose vector-Jacobian products :func:`choice_output_grads` takes: per
    choice ``c`` the unit row ``e_c`` (``K = C``), or with ``relative`` the differences ``e_c - e_0`` for ``c >= 1``
    (``K = C - 1``), zero at a question's absent choices (``present (B, C)``)."""
    eye = torch.eye(C, device=device, dtype=dtype)
    if not relative:
        return eye[:, None, :].expand(C, B, C).contiguous()
    rows = (eye[1:] - eye[0])[:, None, :].expand(C - 1, B, C)
    if present is not None:
        rows = rows * present.T[1:, :, None].to(rows.dtype)
    return rows.contiguous()


def choice_output_grads(logits: torch.Tensor, outputs: list[torch.Tensor], relative: bool = False,
                        present: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Per choice ``c``, the gradient of ``sum_b logits[b, c]`` w.r.t. each output: ``(C, *output.shape)``.

    Questions are independent, so row ``r``'s slice is the gradient of its own question's logit. One vectorized
    backward (``is_grads_batched``) where autograd supports it, else one backward per choice.

    ``relative``: the gradients of ``logits[:, c] - logits[:, 0]`` instead (row 0 zero; ``present (B, C)`` zeroes a
    question's absent choices), for ``C - 1`` backwards instead of ``C``. The Gaussian over the choice logits that
    they give has the same ``var(f_i - f_j)`` for every pair, which is all that a link invariant to shifting every
    logit by one amount reads: the mean-field link and softmax samples, not the probit.
    """
    B, C = logits.shape
    relative = relative and C > 1
    cot = choice_cotangents(B, C, relative, present, logits.device, logits.dtype)
    try:
        grads = torch.autograd.grad(logits, outputs, grad_outputs=cot, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one backward per cotangent
        per_k = [torch.autograd.grad((logits * cot[k]).sum(), outputs, retain_graph=True, allow_unused=True)
                 for k in range(cot.shape[0])]
        grads = [None if per_k[0][i] is None else torch.stack([p[i] for p in per_k]) for i in range(len(outputs))]
    grads = [None if g is None else g.detach() for g in grads]
    if relative:
        grads = [None if g is None else torch.cat([torch.zeros_like(g[:1]), g]) for g in grads]
    return grads


def lora_jacobians(model, scorer, enc, modules: dict[str, torch.nn.Module], relative: bool = False):
    """Choice logits ``(B, C)`` (on the CPU, ``-inf`` at absent choices) and, per module of ``modules`` (LoRA
    factors with a ``weight`` (out, in)), the Jacobian ``(C, B, out, in)`` (CPU, float32) of each question's choice
    logits w.r.t. that weight, summed over every position and forward where the module ran. ``relative``: the
    Jacobians of ``f_c - f_0`` (row 0 zero), one backward fewer (:func:`choice_output_grads`): for shift-invariant
    links only."""
    params = [m.weight for m in modules.values()]
    B, C = enc.choice_mask.shape
    with grad_only(model, params), capture_io(modules) as io:
        enc = enc.for_autograd()
        logits = scorer.choice_logits(model, enc)
        calls = recorded_calls(io, enc)
        grads = choice_output_grads(logits.masked_fill(~enc.choice_mask, 0.0), [io[k][i][1] for k, i in calls],
                                    relative=relative, present=enc.choice_mask)
    grad_of = dict(zip(calls, grads, strict=True))
    jacobians = {}
    for k in io:
        m = modules[k]
        J = torch.zeros(C, B, m.out_features, m.in_features, device=logits.device, dtype=torch.float32)
        for i, ((x, _), (_, rows)) in enumerate(zip(io[k], forward_passes(enc), strict=True)):
            g = grad_of[k, i]
            if g is not None:  # (C, rows, T', o) x (rows, T', i), summed over positions into each question
                J.index_add_(1, rows, torch.einsum("crto,rti->croi", g, x).float())
        jacobians[k] = J.cpu()
    return logits.detach().float().cpu(), jacobians


def glm_predictive(mean: torch.Tensor, cov: torch.Tensor, link: str, n_samples: int,
                   generator: torch.Generator | None) -> Predictive:
    """The predictive of choice logits ``N(mean (B, C), cov (B, C, C))`` under ``link`` (a :class:`Link` value),
    with ``n_samples`` logit samples where the link uses them (the mean-field's for its uncertainty split)."""
    if link == Link.MEANFIELD.value:
        samples = sample_logit_gaussian(mean, cov, n_samples, generator).softmax(-1) if n_samples > 0 else None
        return Predictive(probs=meanfield_probs(mean, cov), sample_probs=samples)
    if link == Link.PROBIT.value or n_samples == 0:
        return Predictive(probs=probit_probs(mean, cov))
    return Predictive.from_sample_logits(sample_logit_gaussian(mean, cov, n_samples, generator))
