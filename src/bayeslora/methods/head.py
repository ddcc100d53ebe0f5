"""The head predictive: the trunk runs once at the posterior mean and only the LM head's Gaussian LoRA ``A`` is
resampled, ``S`` times, from the captured LM-head input ``h``. Per sample the extra cost is ``scaling * B ((sigma *
eps_s) h)``, ``V x r`` per position, instead of a whole forward.

It is exact MC when the LM head's ``A`` is the only Gaussian factor (TFB with ``subset=last_layer``), and the
head's share of the uncertainty otherwise (BLoB's ``predictive=head``). Used for choices (:func:`head_sample_logits`)
and for generation (:func:`head_sampler`, read by ``bayeslora serve``).
"""

from __future__ import annotations

import torch

from ..peft_ext import GaussianLoraA, HeadLora, device_generator, head_lora
from ..scoring import ChoiceScorer, EncodedBatch
from .base import MethodError


def gaussian_head(model) -> HeadLora:
    """The LM head's LoRA, whose ``A`` must be Gaussian."""
    try:
        head = head_lora(model)
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    if not isinstance(head.lora_A, GaussianLoraA):
        raise MethodError("The head predictive needs a Gaussian LoRA A on the LM head (BLoB, or TFB)")
    return head


def head_delta(head: HeadLora, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The LM head's LoRA output ``scaling * B (A h)`` for an A factor ``A`` (r, H), or S of them (S, r, H) at
    inputs ``h`` (N, H) (then (S, N, V))."""
    return head.lora_B(h.to(A.dtype) @ A.transpose(-1, -2)) * head.scaling


def head_noise(head: HeadLora, n_samples: int, generator: torch.Generator | None,
               antithetic: bool = False) -> torch.Tensor:
    """``S`` noise parts ``sigma * eps`` of the head's ``A``, (S, r, H); with ``antithetic``, sample ``i + ceil(S /
    2)`` is ``-`` sample ``i`` (an odd S leaves its last draw unpaired)."""
    A_std = head.lora_A.std()  # (r, H), or broadcastable to it (TFB: one std per row)
    n_draw = (n_samples + 1) // 2 if antithetic else n_samples
    eps = torch.randn((n_draw, *head.lora_A.weight.shape), generator=device_generator(generator, A_std.device),
                      device=A_std.device, dtype=torch.float32).to(A_std.dtype)
    if antithetic:
        eps = torch.cat([eps, -eps])[:n_samples]
    return A_std * eps


def head_logits(head: HeadLora, scorer: ChoiceScorer, batch: EncodedBatch, vocab: torch.Tensor, h: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Choice logits ``(S, B, C)`` from the posterior-mean vocabulary logits ``vocab`` (R, K, V) and LM-head inputs
    ``h`` (R, K, H) at the scored positions, under the head noise ``noise`` (S, r, H)."""
    return torch.stack([scorer.logits_from_vocab(vocab + head_delta(head, h, A).to(vocab.dtype), batch)
                        for A in noise])


def head_sample_logits(model, scorer: ChoiceScorer, batch: EncodedBatch, n_samples: int,
                       generator: torch.Generator | None = None, antithetic: bool = False) -> torch.Tensor:
    """Choice logits ``(S, B, C)``: trunk at the posterior mean, ``S`` samples of the LM head's Gaussian ``A``."""
    head = gaussian_head(model)
    vocab, h = scorer.forward_vocab(model, batch, capture=head.layer)  # (R, K, V), (R, K, H)
    return head_logits(head, scorer, batch, vocab, h, head_noise(head, n_samples, generator, antithetic))


def head_sampler(model, n_samples: int, generator: torch.Generator | None = None, antithetic: bool = False):
    """The head predictive for generation: ``(head layer, deltas)``, where ``deltas(h)`` maps the LM-head inputs
    ``h`` (N, H) of a posterior-mean forward to the logit offsets (S, N, V) of ``S`` samples of the head's Gaussian
    ``A``, drawn once here, so that sample ``s`` is one model for the whole generated sequence."""
    head = gaussian_head(model)
    A = head_noise(head, n_samples, generator, antithetic)  # the noise part; the mean A is in the forward already
    return head.layer, lambda h: head_delta(head, h, A)
