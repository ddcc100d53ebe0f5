"""The SDPA attention that keeps cuDNN's kernel out of differentiated passes (bayeslora.attention)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend

from bayeslora import attention
from bayeslora.models import load_model


def _batch():
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: rows 0 and 1 have fully masked query positions
    mask[1, :2] = 0
    return ids, mask


def _forward_backward(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits[mask.bool()].pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[mask.bool()], grads


@pytest.fixture
def kernels_entered(monkeypatch):
    """Pretend the CPU is a device whose SDPA may pick cuDNN, and record the kernels each restriction allows."""
    entered = []
    real = attention.sdpa_kernel

    @contextlib.contextmanager
    def recording(backends, *args, **kwargs):
        entered.append(list(backends))
        with real(backends, *args, **kwargs):
            yield

    monkeypatch.setattr(attention, "CUDNN_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(attention, "sdpa_kernel", recording)
    return entered


def test_loaded_models_use_it():
    assert load_model("tiny-random-llama").model.config._attn_implementation == attention.SAFE_SDPA


def test_differentiated_masked_pass_excludes_cudnn_with_the_same_result(kernels_entered):
    model = load_model("tiny-random-llama").model
    model.set_attn_implementation("sdpa")
    ids, mask = _batch()
    plain_logits, plain_grads = _forward_backward(model, ids, mask)
    assert not kernels_entered
    attention.use_safe_attention(model)
    logits, grads = _forward_backward(model, ids, mask)
    n_layers = model.config.num_hidden_layers
    assert len(kernels_entered) == n_layers  # every layer's attention, in the one forward
    assert all(SDPBackend.CUDNN_ATTENTION not in k and SDPBackend.MATH in k for k in kernels_entered)
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name


def test_inference_and_unmasked_passes_keep_every_kernel(kernels_entered):
    model = load_model("tiny-random-llama").model
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for p in model.parameters():
        p.requires_grad_(False)
    model(input_ids=ids, attention_mask=mask)  # grad mode on, but nothing to differentiate
    assert not kernels_entered


def test_other_implementations_are_left_alone():
    model = load_model("tiny-random-llama").model
    model.set_attn_implementation("eager")
    assert attention.use_safe_attention(model).config._attn_implementation == "eager"
