"""Token-by-token decoding with per-token uncertainty, under S posterior samples decoded as one batch.

One decoding step with ``S`` posterior samples (``S = 1``: deterministic):

* the prompt is repeated ``S`` times and decoded inside ``method.sampling(model, groups=None, n_groups=S)``, so row ``s``
  uses weight sample ``s`` for the whole sequence; one batched forward per step, with a KV cache;
* the next-token distributions ``p_s`` (S, V) are averaged into the mean predictive ``p`` (V,);
* the token is chosen from ``p`` (greedy at temperature 0, else sampled from ``p^(1/T)`` restricted to the
  ``top_p`` nucleus) and appended to every row;
* per token: total = ``H[p]``, aleatoric = ``mean_s H[p_s]``, epistemic = total - aleatoric (mutual information).

Sequence confidence (``Confidence.score``): the geometric mean of the emitted tokens' probabilities under the
untempered mean predictive, ``exp(mean_t log p_t(token_t))``, in [0, 1]: 1 when the model was certain of every token,
and the per-token "average surprise" otherwise (it does not shrink with length as the joint probability does).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..predictive import entropy


@dataclass
class DecodeParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n_samples: int = 1  # S posterior samples decoded together (1: deterministic)
    top_logprobs: int = 0
    stop_token_ids: frozenset[int] = frozenset()


@dataclass
class TokenStep:
    """One emitted token and the mean predictive it was drawn from."""

    token_id: int
    logprob: float  # log p(token) under the untempered mean predictive
    entropy: float  # H[p] (nats)
    aleatoric: float  # mean_s H[p_s]
    epistemic: float  # H[p] - mean_s H[p_s], >= 0
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob) best first


def step_stats(logits: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
    """Mean predictive ``(V,)`` and (total, aleatoric, epistemic) from per-sample next-token logits ``(S, V)``."""
    sample_probs = torch.softmax(logits.float(), dim=-1)  # (S, V)
    probs = sample_probs.mean(0)
    total = float(entropy(probs))
    aleatoric = float(entropy(sample_probs).mean())
    return probs, total, aleatoric, max(total - aleatoric, 0.0)


def choose_token(probs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from ``probs ** (1 / temperature)``; ``probs`` is (V,)."""
    if temperature <= 0.0:
        return int(probs.argmax())
    weights = torch.exp(torch.log(probs.clamp_min(1e-30)) / temperature)
    weights = weights / weights.sum()
    if top_p < 1.0:
        sorted_w, order = weights.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        keep = (sorted_w.cumsum(0) - sorted_w) < top_p
        keep[0] = True  # a top_p below float32's smallest number compares as 0 and would keep nothing
        weights = torch.zeros_like(weights).scatter_(0, order[keep], sorted_w[keep])
    return int(torch.multinomial(weights.cpu(), 1, generator=generator))


def sequence_confidence(logprobs: list[float]) -> float:
    """Geometric mean of the token probabilities: ``exp(mean(logprobs))`` (1.0 for an empty sequence)."""
    if not logprobs:
        return 1.0
    return float(min(max(math.exp(sum(logprobs) / len(logprobs)), 0.0), 1.0))


@torch.no_grad()
def decode(model, method, input_ids: list[int], params: DecodeParams, generator: torch.Generator | None,
           should_stop: Callable[[], bool] = lambda: False) -> Iterator[TokenStep]:
    """Yield up to ``params.max_tokens`` tokens continuing ``input_ids`` (stops after a stop token).

    The caller may stop consuming at any time (stop strings); ``should_stop`` is polled before every step.
    """
    S = max(1, params.n_samples)
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device).expand(S, -1).contiguous()  # (S, T)
    mask = torch.ones_like(ids)
    sampling = (method.sampling(model, groups=None, n_groups=S, generator=generator)
                if params.n_samples > 1 else contextlib.nullcontext())
    with sampling:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        for i in range(params.max_tokens):
            if should_stop():
                return
            probs, total, aleatoric, epistemic = step_stats(out.logits[:, -1, :])
            token = choose_token(probs, params.temperature, params.top_p, generator)
            logp = torch.log(probs.clamp_min(1e-45))
            top = []
            if params.top_logprobs:
                values, indices = logp.topk(params.top_logprobs)
                top = [(int(i), float(v)) for i, v in zip(indices, values)]
            yield TokenStep(token, float(logp[token]), total, aleatoric, epistemic, top)
            if token in params.stop_token_ids or i + 1 == params.max_tokens:
                return
            mask = torch.cat([mask, mask.new_ones((S, 1))], dim=1)
            step = torch.full((S, 1), token, dtype=torch.long, device=device)
            out = model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                        logits_to_keep=1)


class StopMatcher:
    """Incremental detokenization with stop strings: releases text that can no longer be part of a stop string.

    ``push(token_id)`` returns ``(new_text, stopped)``; text is decoded from all ids so far (byte-level tokens that
    split a UTF-8 character are held back until complete).
    """

    def __init__(self, tokenizer, stops: list[str], skip_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.released = 0  # characters of the text already released
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode([i for i in self.ids if i not in self.skip_ids], skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self._decode()
        for stop in self.stops:
            at = text.find(stop, max(0, self.released - len(stop)))
            if at != -1:
                self.text = text[:at]
                return self._release(len(self.text)), True
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for stop in self.stops:  # hold back a suffix that could start a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-k:]):
                    safe = min(safe, len(text) - k)
                    break
        return self._release(safe), False

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released:upto]
        self.released = upto
        return out
