"""Scaled-dot-product attention that keeps cuDNN's kernel out of any pass that will be differentiated.

PyTorch 2.11 and later pick cuDNN's attention kernel by default on H100/H200 in bfloat16 and float16. Its backward
returns NaN gradients for the queries when an explicit attention mask is passed and the padded sequence length is
64 modulo 128, for rows whose logsumexp is very negative, such as the fully masked rows of left padding (PyTorch
issue 196678; the forward is correct). A padded batch of exactly that length then turns the adapter's weights to
NaN at the next optimizer step: the first H100 lease's bfloat16 grid did this at the one training batch of
length 64 in 400 steps, and its Laplace curvature went NaN on the one seed whose fit batches had that length
(docs/FINDINGS.md, finding 29).

:func:`use_safe_attention` gives a model loaded with PyTorch's SDPA an attention function that is SDPA with one
difference: where a backward can follow (gradients enabled, an input that requires grad, a mask) on a device
whose SDPA may pick cuDNN, the kernel is chosen among flash, memory-efficient and math. Inference keeps every
kernel, cuDNN included; on the CPU nothing changes.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SAFE_SDPA = "bayeslora_sdpa"
#: the kernels allowed where a backward can follow: all of SDPA's but cuDNN's
BACKWARD_SAFE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
#: device types whose SDPA can dispatch to cuDNN
CUDNN_DEVICE_TYPES = ("cuda",)


def _differentiated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def sdpa_without_cudnn_backward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with cuDNN's kernel excluded where its backward could return NaN."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is not None and query.device.type in CUDNN_DEVICE_TYPES
            and _differentiated(query, key, value)):
        with sdpa_kernel(BACKWARD_SAFE_BACKENDS):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SAFE_SDPA, sdpa_without_cudnn_backward)
    AttentionMaskInterface.register(SAFE_SDPA, sdpa_mask)  # the masks SDPA gets


def use_safe_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a transformers model that runs PyTorch's SDPA to :func:`sdpa_without_cudnn_backward` (in place;
    returned). A model with another attention implementation (eager, flash-attention, ...) is left as it is."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return model
    _register()
    model.set_attn_implementation(SAFE_SDPA)
    return model
