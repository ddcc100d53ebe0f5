"""Differences between the transformers versions bayeslora supports (``transformers>=5`` in ``pyproject.toml``).

transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache``; the old name
still works there with a deprecation warning and is announced for removal in 5.40. Earlier 5.x releases only know
``past_key_values``. The scorer and the server's decoder pass and read the cache through these two helpers, which use
whichever name the loaded model's ``forward`` declares.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_arg(model_class: type) -> str:
    forward = getattr(model_class, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # a forward without a readable signature: the long-standing name
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)``: ``cache`` where the model's forward declares it (transformers 5.24 on),
    else ``past_key_values``. ``model`` may be a PEFT model (its base model's forward decides)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_arg(type(base)): cache}


def returned_cache(output):
    """The KV cache a forward returned with ``use_cache=True``, under either field name."""
    return output["cache"] if "cache" in output else output["past_key_values"]
