"""The math of Bayesian-LoRA's inducing-weight posterior (arXiv 2601.21003; Ritter et al., 2021): pure functions.

A weight matrix ``W`` (d_out, d_in) is generated from a small inducing matrix ``U`` (m_r, m_c). Jointly Gaussian
prior (before the prior scale)::

    vec(W) ~ N(0, I),   U = Z_r W Z_cᵀ + ε_U,   so   cov(vec U) = K_c ⊗ K_r,
    K_r = Z_r Z_rᵀ + D_r²  (m_r, m_r),   K_c = Z_c Z_cᵀ + D_c²  (m_c, m_c).

Hence ``E[W | U] = T_r U T_c`` with ``T_r = Z_rᵀ K_r⁻¹`` and ``T_c = K_c⁻¹ Z_c``, and a conditional sample follows
Matheron's rule ``W = T_r U T_c + (W̃ - T_r Ũ T_c)`` with ``(W̃, Ũ)`` a joint prior sample.

Everything here works in *whitened* coordinates ``U = L_r u L_cᵀ`` (``L = chol(K)``, prior ``u ~ N(0, I)``), which
turns the transforms into well-conditioned semi-orthogonal maps::

    Q_r = (L_r⁻¹ Z_r)ᵀ (d_out, m_r),  P_r = L_r⁻¹ D_r (m_r, m_r),  Q_rᵀ Q_r + P_r P_rᵀ = I   (same for columns)
    T_r U T_c = Q_r u Q_cᵀ
    L_r⁻¹ Ũ L_c⁻ᵀ = Q_rᵀ W̃ Q_c + Q_rᵀ E₂ P_cᵀ + P_r E₃ Q_c + P_r E₄ P_cᵀ     (E₂ (d_out, m_c), E₃ (m_r, d_in), E₄)

so no ``chol(Z Zᵀ)`` of a possibly rank-deficient matrix is ever needed (the LoRA ``A`` factor has ``d_out = r``,
often smaller than ``m_r``). With the noise scale ``λ``: ``W / prior_sd = Q_r (u - λ ū) Q_cᵀ + λ W̃``, where
``ū = L_r⁻¹ Ũ L_c⁻ᵀ``. ``λ → 0`` and a point posterior on ``u`` give a deterministic LoRA factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class CholeskyError(ValueError):
    """A prior covariance is not positive definite even after adding jitter."""


def jittered_cholesky(K: torch.Tensor, name: str = "K", jitter: float = 1e-6, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric matrix ``K`` (m, m), adding ``jitter * mean(diag) * 10^k`` on failure.

    Raises :class:`CholeskyError` naming ``name`` when ``K`` is not finite or every try fails.
    """
    if not torch.isfinite(K).all():
        raise CholeskyError(f"The prior covariance {name} has non-finite entries; lower the learning rate")
    L, info = torch.linalg.cholesky_ex(K)
    if not info.any():
        return L
    scale = K.detach().diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-12)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    for k in range(tries):
        added = jitter * scale * 10.0**k
        L, info = torch.linalg.cholesky_ex(K + added * eye)
        if not info.any():
            return L
    raise CholeskyError(f"The prior covariance {name} ({K.shape[-1]}x{K.shape[-1]}) is not positive definite even "
                        f"with jitter {added.item():.3g} added to its diagonal")


@dataclass
class WhitenedPrior:
    """Whitened transforms of one side (rows or columns): ``Q`` (d, m) and ``P`` (m, m); see the module docstring."""

    Q: torch.Tensor
    P: torch.Tensor


def whitened_prior(Z: torch.Tensor, d: torch.Tensor, name: str = "K") -> WhitenedPrior:
    """From inducing inputs ``Z`` (m, d) and a positive diagonal ``d`` (m,): ``Q = (L⁻¹ Z)ᵀ``, ``P = L⁻¹ diag(d)``."""
    K = Z @ Z.T + torch.diag(d.pow(2))
    L = jittered_cholesky(K, name)
    QT = torch.linalg.solve_triangular(L, Z, upper=False)  # (m, d)
    P = torch.linalg.solve_triangular(L, torch.diag(d), upper=False)  # (m, m)
    return WhitenedPrior(Q=QT.T, P=P)


def kronecker_prior_cov(Z_r: torch.Tensor, d_r: torch.Tensor, Z_c: torch.Tensor, d_c: torch.Tensor) -> torch.Tensor:
    """Dense ``K_U = K_c ⊗ K_r`` of ``vec(U)`` (column-major vec), for tests and small sizes only."""
    K_r = Z_r @ Z_r.T + torch.diag(d_r.pow(2))
    K_c = Z_c @ Z_c.T + torch.diag(d_c.pow(2))
    return torch.kron(K_c, K_r)


def whitened_inducing_noise(rows: WhitenedPrior, cols: WhitenedPrior, e1: torch.Tensor, e2: torch.Tensor,
                            e3: torch.Tensor, e4: torch.Tensor) -> torch.Tensor:
    """``ū = L_r⁻¹ Ũ L_c⁻ᵀ`` (G, m_r, m_c) of the joint prior sample whose weight part is ``e1`` (G, d_out, d_in).

    ``e2`` (G, d_out, m_c), ``e3`` (G, m_r, d_in), ``e4`` (G, m_r, m_c) are standard normal.
    """
    Qr, Pr, Qc, Pc = rows.Q, rows.P, cols.Q, cols.P
    return (Qr.T @ e1 @ Qc) + (Qr.T @ e2 @ Pc.T) + (Pr @ e3 @ Qc) + (Pr @ e4 @ Pc.T)


def conditional_weight(u: torch.Tensor, lam: torch.Tensor, rows: WhitenedPrior, cols: WhitenedPrior,
                       noise: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Dense ``W / prior_sd`` (G, d_out, d_in) for whitened inducing weights ``u`` (G, m_r, m_c).

    ``noise = (e1, e2, e3, e4)`` (see :func:`whitened_inducing_noise`); ``None`` gives the conditional mean.
    """
    if noise is None:
        return rows.Q @ u @ cols.Q.T
    u_bar = whitened_inducing_noise(rows, cols, *noise)
    return rows.Q @ (u - lam * u_bar) @ cols.Q.T + lam * noise[0]


def conditional_kl(lam: torch.Tensor, n_weights: int) -> torch.Tensor:
    """KL of ``q(W|U)`` to ``p(W|U)`` when ``q`` scales the conditional noise by ``λ``: ``n (λ²/2 - log λ - 1/2)``."""
    return n_weights * (0.5 * lam.pow(2) - lam.log() - 0.5)


def standard_normal_logpdf(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``log N(x; 0, 1)`` over the last two dims: (G, m_r, m_c) -> (G,)."""
    return (-0.5 * x.pow(2) - 0.5 * math.log(2 * math.pi)).sum(dim=(-2, -1))


def diag_normal_logpdf(x: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """Sum of ``log N(x; mean, sd²)`` over the last two dims: (G, m_r, m_c) -> (G,)."""
    z = (x - mean) / sd
    return (-0.5 * z.pow(2) - sd.log() - 0.5 * math.log(2 * math.pi)).sum(dim=(-2, -1))


class MaskedLinear(nn.Linear):
    """A Linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al., 2015)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MaskedAffineFlow(nn.Module):
    """One masked affine autoregressive transform (MAF, Papamakarios et al., 2017) over the last dim.

    ``y_i = x_i * exp(s_i(x_<i)) + m_i(x_<i)``; a one-hidden-layer MADE gives ``(m, s)``. The output layer starts at
    zero, so the flow starts as the identity. ``s`` is soft-clamped to ``(-clamp, clamp)`` for stability.
    """

    def __init__(self, features: int, hidden: int = 16, clamp: float = 3.0):
        super().__init__()
        self.features, self.clamp = features, clamp
        in_deg = torch.arange(1, features + 1)
        hid_deg = torch.arange(hidden) % max(features - 1, 1) + 1
        self.hidden = MaskedLinear(features, hidden, (hid_deg[:, None] >= in_deg[None, :]).float())
        out_mask = (in_deg[:, None] > hid_deg[None, :]).float()  # (features, hidden)
        self.out = MaskedLinear(hidden, 2 * features, torch.cat([out_mask, out_mask]))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (..., D) -> ``(y (..., D), log|det dy/dx| (...,))``."""
        shift, raw = self.out(torch.tanh(self.hidden(x))).chunk(2, dim=-1)
        log_scale = self.clamp * torch.tanh(raw / self.clamp)
        return x * log_scale.exp() + shift, log_scale.sum(-1)
