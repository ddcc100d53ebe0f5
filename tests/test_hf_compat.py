"""The KV-cache argument's name across transformers versions (``past_key_values`` before 5.24, ``cache`` from it)."""

from __future__ import annotations

import inspect

import torch

from bayeslora.hf_compat import cache_kwargs, returned_cache
from bayeslora.scoring import ClozeScorer


class _OldModel(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=False):
        return {"past_key_values": ("kv", input_ids)}


class _NewModel(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=False):
        return {"cache": ("kv", input_ids)}


class _Wrapper:  # like a PeftModel: the base model's forward decides
    def __init__(self, base):
        self.base = base

    def get_base_model(self):
        return self.base


def test_cache_argument_follows_the_forward_signature():
    assert cache_kwargs(_OldModel(), 1) == {"past_key_values": 1}
    assert cache_kwargs(_NewModel(), 1) == {"cache": 1}
    assert cache_kwargs(_Wrapper(_NewModel()), 1) == {"cache": 1}
    assert returned_cache(_OldModel()(input_ids=3)) == ("kv", 3)
    assert returned_cache(_NewModel()(input_ids=3)) == ("kv", 3)


def test_the_installed_transformers_gets_its_own_name(tiny):
    declared = inspect.signature(type(tiny.model).forward).parameters
    name = "cache" if "cache" in declared else "past_key_values"
    assert cache_kwargs(tiny.model, None) == {name: None}


def test_cloze_scorer_passes_the_declared_name(tiny, arith_examples):
    """The shared-prefix cloze pass hands the prefix's KV cache to the continuation pass under the name the model
    declares (the deprecated one logs a warning from transformers 5.24 and goes in 5.40), with the same scores as
    scoring every row in one pass."""
    declared = set(inspect.signature(type(tiny.model).forward).parameters)
    seen = []
    handle = tiny.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)),
                                                  with_kwargs=True)
    scorer = ClozeScorer(tiny.tokenizer)
    enc = scorer.encode(arith_examples)
    try:
        with torch.no_grad():
            shared = scorer.choice_logits(tiny.model, enc)
    finally:
        handle.remove()
    passed = set().union(*seen)
    assert passed <= declared, f"arguments the forward does not declare: {passed - declared}"
    assert {"cache", "past_key_values"} & passed  # the continuation pass did run on the prefix's cache
    with torch.no_grad():
        one = ClozeScorer(tiny.tokenizer, share_prefix=False).choice_logits(tiny.model, enc.one_pass())
    assert torch.allclose(shared, one, atol=1e-5)
