"""Token-by-token decoding with per-token uncertainty, under S posterior samples decoded as one batch.

One decoding step with ``S`` posterior samples (``S = 1``: deterministic):

* the prompt is repeated ``S`` times and decoded inside ``method.sampling(model, groups=None, n_groups=S)``, so row ``s``
  uses weight sample ``s`` for the whole sequence; one batched forward per step, with a KV cache (the run's
  prediction options can draw the samples in mirrored pairs, in chunks of rows, or after one shared prompt pass
  at the posterior mean: see :func:`decode`);
* the next-token distributions ``p_s`` (S, V) are averaged into the mean predictive ``p`` (V,);
* the token is chosen from ``p`` (greedy at temperature 0, else sampled from ``p^(1/T)`` restricted to the
  ``top_p`` nucleus) and appended to every row;
* the linearized predictive (TFB ``predictive=glm``) differs in two ways: its S samples are the posterior mean's
  logits plus or minus central differences (:func:`linearized_logits`), and the token is chosen from the posterior
  mean's own distribution, not from ``p``, so the text is the adapter's and the posterior only measures it (the
  choice predictive likewise keeps the adapter's answers). Over a 49k-token vocabulary a wide posterior's mixture
  is flat enough that choosing from ``p`` rewrote the text (docs/FINDINGS.md, finding 22);
* per token: total = ``H[p]``, aleatoric = ``mean_s H[p_s]``, epistemic = total - aleatoric (mutual information).

Sequence confidence (``Confidence.score``): the geometric mean of the emitted tokens' probabilities under the
untempered mean predictive, ``exp(mean_t log p_t(token_t))``, in [0, 1]: 1 when the model was certain of every token,
and the per-token "average surprise" otherwise (it does not shrink with length as the joint probability does).
The stop token that ends an answer is not counted: its probability says where the answer ends, not how sure the
model is of it (for a short answer it would dominate the mean).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..hf_compat import cache_kwargs, returned_cache
from ..methods import SamplePlan
from ..peft_ext import row_questions
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


def linearized_logits(logits: torch.Tensor) -> torch.Tensor:
    """The linearized predictive's S logit samples ``(S, V)`` from the logits of S mirrored weight samples and the
    posterior mean, ``(S + 1, V)`` (rows ``i`` and ``i + S/2`` mirrored, the mean last): ``f(mean) +- d_i`` with
    ``d_i = (f(mean + eps_i) - f(mean - eps_i)) / 2``, the central difference, which is ``J eps_i`` up to third-order
    terms. Their mean is the posterior mean's logits: the even-order shift that weight samples add is dropped."""
    center = logits[-1:].float()
    half = (logits.shape[0] - 1) // 2
    d = (logits[:half].float() - logits[half:2 * half].float()) / 2
    return torch.cat([center + d, center - d])


def choose_token(probs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from ``probs ** (1 / temperature)``; ``probs`` is (V,)."""
    if temperature <= 0.0:
        return int(probs.argmax())
    # softmax(log p / T) in float64: subtracting the largest log-weight keeps a small T from underflowing every
    # weight to 0 (T = 0.01 did on SmolLM2: a 500)
    weights = torch.softmax(torch.log(probs.double().clamp_min(1e-300)) / temperature, dim=0)
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


class _Streams:
    """The S decoded rows of one request, as chunks of rows with a KV cache each, stepped in lockstep.

    Every chunk's forward runs inside the one sampling context of all S samples, with its rows mapped to their
    samples (:func:`~bayeslora.peft_ext.row_questions`), so row ``s`` keeps weight sample ``s`` whatever the
    chunking, and a chunked decode equals the unchunked one.
    """

    def __init__(self, model, S: int, chunk: int, device):
        self.model = model
        bounds = [(start, min(start + chunk, S)) for start in range(0, S, chunk)]
        self.sizes = [b - a for a, b in bounds]
        # one chunk: row s is sample s, no map needed (and none built)
        self.rows = [torch.arange(a, b, device=device) for a, b in bounds] if len(bounds) > 1 else [None]
        self.caches: list = [None] * len(bounds)
        self.length = 0  # tokens already in every row's cache

    def start(self, prompt_cache, prompt_length: int) -> None:
        """Begin every row from ``prompt_cache``: the KV cache of the first ``prompt_length`` tokens, one row."""
        for c, size in enumerate(self.sizes):
            cache = copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(size)
            self.caches[c] = cache
        self.length = prompt_length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (1, T) to every row; the next-token logits (S, V)."""
        out = []
        for c, (size, rows) in enumerate(zip(self.sizes, self.rows, strict=True)):
            mask = torch.ones((size, self.length + ids.shape[1]), dtype=torch.long, device=ids.device)
            with row_questions(self.model, rows) if rows is not None else contextlib.nullcontext():
                result = self.model(input_ids=ids.expand(size, -1), attention_mask=mask,
                                    **cache_kwargs(self.model, self.caches[c]), use_cache=True, logits_to_keep=1)
            self.caches[c] = returned_cache(result)
            out.append(result.logits[:, -1, :])
        self.length += ids.shape[1]
        return out[0] if len(out) == 1 else torch.cat(out)


class _HeadStream:
    """The head predictive: one row decoded at the posterior mean, whose S samples differ only in the LM head's
    LoRA (``head_sampler``: logit offsets of S head samples, drawn once per request, at the head's input)."""

    def __init__(self, model, layer, deltas: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.layer, self.deltas = model, layer, deltas
        self.cache = None
        self.h: torch.Tensor | None = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Keep the LM head's input at the last position of every forward."""
        handle = self.layer.register_forward_hook(lambda mod, args, out: setattr(self, "h", args[0][:, -1, :]))
        try:
            yield
        finally:
            handle.remove()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, **cache_kwargs(self.model, self.cache), use_cache=True, logits_to_keep=1)
        self.cache = returned_cache(out)
        return out.logits[:, -1, :].float() + self.deltas(self.h)[:, 0].float()  # (S, V)


@torch.no_grad()
def decode(model, method, input_ids: list[int], params: DecodeParams, generator: torch.Generator | None,
           should_stop: Callable[[], bool] = lambda: False) -> Iterator[TokenStep]:
    """Yield up to ``params.max_tokens`` tokens continuing ``input_ids`` (stops after a stop token).

    With S > 1 samples, the method's :meth:`~bayeslora.methods.MethodConfig.sample_plan` (its prediction options,
    ``bayeslora serve --option``) decides how they are drawn, as for the choice predictive: mirrored pairs
    (``antithetic``), ``sample_chunk`` rows per forward (each chunk keeps its own KV cache; the S rows still
    share one weight sample each), ``prompt=mean``: every prompt token but the last runs once at the
    posterior mean, its KV cache is copied to the S rows, and only the last prompt token and the generated ones
    see the samples (one prompt pass instead of S); the head predictive (BLoB ``predictive=head``): one row at
    the posterior mean, S samples of the LM head's LoRA only (about the cost of a plain decode); and the linearized
    predictive (TFB ``predictive=glm``): S/2 mirrored pairs and the posterior mean as S + 1 rows of one forward,
    whose logits become the S samples ``f(mean) +- (f(mean + eps) - f(mean - eps)) / 2``
    (:func:`linearized_logits`), the tokens chosen from the mean's distribution. A posterior with finitely many
    samples (an ensemble's K members) decodes at most K rows; one without weight samples (Laplace:
    ``SamplePlan.decodes`` false) decodes the adapter alone.

    The caller may stop consuming at any time (stop strings); ``should_stop`` is polled before every step.
    """
    S = max(1, params.n_samples)
    plan = method.config.sample_plan() if S > 1 else SamplePlan()
    if not plan.decodes:  # no weight samples to decode (Laplace): the adapter's own decode
        S, plan = 1, SamplePlan()
    S = plan.samples(S)
    if S > 1:
        plan.check(S, generation=True)
    linearized = plan.linearized and S > 1
    rows = S + 1 if linearized else S  # linearized: the posterior mean is the last row
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)  # (1, T)
    if plan.head:
        streams = _HeadStream(model, *method.head_sampler(model, S, generator))
        sampling = streams.capturing()
    else:
        streams = _Streams(model, rows, min(plan.chunk or rows, rows), device)
        if plan.mean_prompt and ids.shape[1] > 1:  # outside the sampling context: the posterior mean
            streams.start(returned_cache(model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)),
                          ids.shape[1] - 1)
            ids = ids[:, -1:]
        sampling = (method.sampling(model, groups=None, n_groups=rows, generator=generator,
                                    antithetic=plan.antithetic or linearized, center=linearized)
                    if S > 1 else contextlib.nullcontext())
    with sampling:
        logits = streams.forward(ids)
        for i in range(params.max_tokens):
            if should_stop():
                return
            probs, total, aleatoric, epistemic = step_stats(linearized_logits(logits) if linearized else logits)
            chosen_from = torch.softmax(logits[-1].float(), dim=-1) if linearized else probs  # the mean's, see above
            token = choose_token(chosen_from, params.temperature, params.top_p, generator)
            logp = torch.log(probs.clamp_min(1e-45))
            top = []
            if params.top_logprobs:
                values, indices = logp.topk(params.top_logprobs)
                top = [(int(i), float(v)) for i, v in zip(indices, values)]
            yield TokenStep(token, float(logp[token]), total, aleatoric, epistemic, top)
            if token in params.stop_token_ids or i + 1 == params.max_tokens:
                return
            logits = streams.forward(torch.full((1, 1), token, dtype=torch.long, device=device))


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
