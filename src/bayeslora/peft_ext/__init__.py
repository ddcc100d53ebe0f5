"""The only code that touches PEFT's LoRA layer internals (``LoraLayer.lora_A`` ModuleDicts).

PEFT's vanilla LoRA forward computes ``lora_B(lora_A(dropout(x))) * scaling``; stochastic methods swap the
``lora_A`` Linear of an adapter for a :class:`~bayeslora.peft_ext.stochastic.StochasticLoraA` that keeps the same
``weight`` (the posterior mean, saved in the PEFT adapter file as usual) and adds noise drawn once per *sample
group* (a question: all of its rows share one weight sample) inside a :func:`sample_groups` context. Outside such
a context the layer is deterministic (the posterior mean). Tested against peft 0.21.
"""

from .adapters import HeadLora, activate_adapter, adapter_names, adapter_rows, head_lora
from .stochastic import (
    GaussianLoraA,
    SamplingState,
    StochasticLoraA,
    device_generator,
    lora_layers,
    posterior_state,
    replace_lora_A,
    replace_lora_B,
    row_questions,
    sample_groups,
    stochastic_layers,
)

__all__ = ["HeadLora", "activate_adapter", "adapter_names", "adapter_rows", "head_lora",
           "GaussianLoraA", "SamplingState", "StochasticLoraA", "device_generator", "lora_layers", "posterior_state",
           "peft_quietly", "replace_lora_A", "replace_lora_B", "row_questions", "sample_groups", "stochastic_layers"]

import contextlib
import warnings


@contextlib.contextmanager
def peft_quietly():
    """Inside only (the filters are not process-wide): PEFT's warnings that do not apply to bayeslora. PEFT warns
    on every LoRA of a tied LM head that merging would untie it, and bayeslora never merges adapters; it also
    reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model. Adapter weights it does not
    find are an error in bayeslora (``methods.base.adapter_weights_problem``), not a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*tied layer is part of the adapter.*")
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated.*")
        warnings.filterwarnings("ignore", message=r"Found missing adapter keys while loading the checkpoint.*")
        yield
