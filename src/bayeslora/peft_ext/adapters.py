"""Named-adapter routing and LM-head access: the PEFT internals used by ensembles and cheap predictives.

* :func:`adapter_rows` routes each row of the next forwards to one named adapter, in one batched forward, through
  the ``adapter_names`` keyword of PEFT's LoRA layers (PEFT's "mixed adapter batches"). PEFT refuses that keyword
  at the model level in training mode, but the layer-level mixed-batch forward is plain differentiable torch, so
  injecting it per layer (as PEFT's own pre-forward hook does) also trains K members in one forward.
* :func:`activate_adapter` switches the active adapter without PEFT's ``set_adapter`` side effect of freezing the
  others (their ``requires_grad`` stays as the optimizer expects).
* :func:`head_lora` returns the LoRA factors of the LM head (for predictives that resample only the head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .stochastic import lora_layers


@dataclass
class AdapterRouting:
    """Question ``q`` goes through adapter ``names[q]``; ``rows`` maps the rows of the current forward to questions
    (set by the scorer with :func:`~bayeslora.peft_ext.row_questions`; unset: row ``i`` is question ``i``).

    The rows' names are computed once per ``rows`` tensor, not once per layer: reading ``rows`` from an
    accelerator is a synchronization."""

    names: list[str]
    rows: torch.Tensor | None = None
    _cache: tuple[torch.Tensor, list[str]] | None = field(default=None, repr=False)

    def row_names(self, n_rows: int) -> list[str]:
        if self.rows is None:
            if n_rows != len(self.names):
                raise RuntimeError(f"Adapter routing covers {len(self.names)} questions but the batch has {n_rows} rows")
            return self.names
        if self.rows.shape[0] != n_rows:
            raise RuntimeError(f"The routing maps {self.rows.shape[0]} rows but the batch has {n_rows}")
        if self._cache is None or self._cache[0] is not self.rows:
            self._cache = (self.rows, [self.names[q] for q in self.rows.tolist()])
        return self._cache[1]


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: list[str]) -> Iterator[AdapterRouting]:
    """Within the context, *question* ``q`` of every forward of ``model`` goes through the adapter ``names[q]``.

    Rows are mapped to questions like the stochastic layers' samples (:func:`row_questions`), so the cloze rows of
    a question, its shared prompt and its continuations all use its adapter.
    """
    routing = AdapterRouting(list(names))
    handles, layers = [], [layer for _, layer in lora_layers(model)]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        kwargs["adapter_names"] = routing.row_names(x.shape[0])
        return args, kwargs

    try:
        for layer in layers:
            layer._adapter_routing = routing
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        yield routing
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer._adapter_routing = None


@contextlib.contextmanager
def activate_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``name`` the active adapter of every LoRA layer (without changing any ``requires_grad``)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = [name]
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer._active_adapter = prev


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters present in ``model`` (in insertion order)."""
    names: list[str] = []
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.lora_A.keys() if n not in names)
    return names


@dataclass
class HeadLora:
    """The LM head's LoRA layer for one adapter: ``out = base(x) + scaling * B(A(x))``."""

    layer: nn.Module
    lora_A: nn.Module  # (r, H) weight, maybe a StochasticLoraA
    lora_B: nn.Linear  # (V, r)
    scaling: float


def head_lora(model: nn.Module, adapter_name: str = "default") -> HeadLora:
    """The LoRA layer wrapping the model's output embedding (``lm_head``); a ValueError if it has none."""
    head = model.get_output_embeddings()
    for _, layer in lora_layers(model):
        if layer is head or getattr(layer, "base_layer", None) is head:
            if adapter_name not in layer.lora_A:
                break
            return HeadLora(layer, layer.lora_A[adapter_name], layer.lora_B[adapter_name],
                            float(layer.scaling[adapter_name]))
    raise ValueError("The model has no LoRA on its LM head: add lm_head to --target-modules to use a head predictive")
