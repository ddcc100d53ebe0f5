"""Shared base of post-hoc methods: they start from a trained adapter and are fitted by ``bayeslora.posthoc``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import ClassVar, TypeVar

import torch

from .base import BayesianMethod

T = TypeVar("T")
#: whether the passes of a fit show progress bars: off unless a caller (bayesianize for the CLI) turns it on
_PROGRESS: ContextVar[bool] = ContextVar("bayeslora_fit_progress", default=False)


class PosthocMethod(BayesianMethod):
    """A method fitted after training (``bayeslora bayesianize`` / ``calibrate``), never by the training loop.

    ``fit_split`` is the split :func:`bayeslora.posthoc.bayesianize` fits on by default; ``tune_split`` (None or a
    split) is a second split passed to :meth:`fit` as ``validation=`` (e.g. a prior tuned on validation NLL).
    """

    posthoc: ClassVar[bool] = True
    fit_split: ClassVar[str] = "train"

    @property
    def tune_split(self) -> str | None:
        return None


@contextlib.contextmanager
def in_float32(model: torch.nn.Module):
    """Run the block with ``model``'s half-precision (bfloat16 / float16) parameters and buffers in float32, then
    give each tensor back its own dtype (a bf16 value survives the round trip exactly; float32 adapters stay as they
    are). Costs a float32 copy of the half-precision weights while the block runs."""
    half = (torch.bfloat16, torch.float16)
    changed = [(t, t.dtype) for t in (*model.parameters(), *model.buffers()) if t.dtype in half]
    try:
        for t, _ in changed:
            t.data = t.data.float()
        yield model
    finally:
        for t, dtype in changed:
            t.data = t.data.to(dtype)


@contextlib.contextmanager
def show_progress(enabled: bool = True):
    """Within the block, the passes of a post-hoc fit (:func:`progress`) show tqdm bars on stderr."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress(items: Iterable[T], desc: str) -> Iterable[T]:
    """``items``, with a progress bar named ``desc`` inside :func:`show_progress` (a fit's pass over its batches:
    a Laplace fit on the CPU runs for minutes)."""
    if not _PROGRESS.get():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def batches(examples: list, batch_size: int, desc: str | None = None) -> Iterator[list]:
    """``examples`` in chunks of ``batch_size``; with ``desc``, a progress bar in :func:`show_progress`."""
    starts = range(0, len(examples), batch_size)
    for start in (starts if desc is None else progress(starts, desc)):
        yield examples[start:start + batch_size]


@torch.no_grad()
def collect_logits(model, scorer, examples: list, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic choice logits ``(N, C)`` (``-inf`` at absent choices) and labels ``(N,)`` of ``examples``."""
    n_choices = max(ex.n_choices for ex in examples)
    device = next(model.parameters()).device
    logits, labels = [], []
    for chunk in batches(examples, batch_size, desc="logits"):
        enc = scorer.encode(chunk, n_choices=n_choices).to(device)
        logits.append(scorer.choice_logits(model, enc).float().cpu())
        labels.append(enc.labels.cpu())
    return torch.cat(logits), torch.cat(labels)


