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
from dataclasses import dataclass

import torch
from torch import nn

from .stochastic import lora_layers


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within the context, row ``i`` of every forward of ``model`` goes through the adapter ``names[i]``.

    ``names`` must have one entry per row of the batch (``len(names) == input_ids.shape[0]``); PEFT checks it.
    """
    handles = []

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    try:
        for _, layer in lora_layers(model):
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def capture_input(module: nn.Module) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    """Register a forward hook storing ``module``'s first input (``store["x"]``); remove the handle after use."""
    store: dict = {}

    def hook(mod, args, output):
        store["x"] = args[0]

    return store, module.register_forward_hook(hook)
