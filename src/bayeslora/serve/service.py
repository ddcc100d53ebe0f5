"""The inference service behind ``bayeslora serve`` (no web framework here: :mod:`.app` is a thin layer over it).

:class:`InferenceService` holds the loaded run (model + method + tokenizer + scorer) and runs every request on
ONE worker thread fed by a bounded queue, so requests never interleave their state (KV caches, sampling contexts,
the method's modules); a full queue raises :class:`ServiceBusy` (HTTP 503). Requests are validated against the
server's limits (:class:`ServeSettings`) and raise :class:`InvalidRequest` (HTTP 400) with the offending parameter.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..methods import MethodError
from ..runs import Run
from . import protocol as P
from .generation import DecodeParams, StopMatcher, TokenStep, decode, sequence_confidence

Emit = Callable[[object], None]


# ---------------------------------------------------------------------------------------------------- errors
class ServiceError(ValueError):
    """A request the service refuses; ``status``/``type``/``code`` follow OpenAI's error conventions."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code or self.code


class InvalidRequest(ServiceError):
    pass


class ModelNotFound(ServiceError):
    status = 404
    code = "model_not_found"


class ServiceBusy(ServiceError):
    status = 503
    type = "server_error"
    code = "queue_full"


class ServiceClosed(ServiceError):
    status = 503
    type = "server_error"
    code = "shutting_down"


# -------------------------------------------------------------------------------------------------- settings
@dataclass
class ServeSettings:
    """Server options (``bayeslora serve --help``); the limits bound the cost of any single request."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    model_name: str | None = None  # id served in /v1/models (default: the run directory's name or the model spec)
    samples: int | None = None  # default posterior samples (None: the method's own default)
    max_samples: int = 32
    max_tokens: int = 512  # upper limit of a request's max_tokens
    default_max_tokens: int = 128  # capped at max_tokens
    max_n: int = 4
    max_context: int | None = None  # prompt + max_tokens limit (default: the model's max_position_embeddings)
    queue_size: int = 32  # requests waiting behind the one being served; more are answered 503
    abstain_threshold: float = 0.5  # /v1/choices abstains below this confidence

    def __post_init__(self):
        positive = {"port": self.port, "max_samples": self.max_samples, "max_tokens": self.max_tokens,
                    "default_max_tokens": self.default_max_tokens, "max_n": self.max_n,
                    "queue_size": self.queue_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}")
        if self.port > 65535:
            raise ValueError(f"Expected `port` in [1, 65535], but got {self.port}")
        if self.max_n > P.MAX_N:
            raise ValueError(f"Expected `max_n` <= {P.MAX_N} (the largest `n` the API accepts), but got {self.max_n}")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        if self.samples is not None and not 0 <= self.samples <= self.max_samples:
            raise ValueError(f"Expected `samples` in [0, {self.max_samples}], but got {self.samples!r}")
        if not 0.0 <= self.abstain_threshold <= 1.0:
            raise ValueError(f"Expected `abstain_threshold` in [0, 1], but got {self.abstain_threshold!r}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"Expected `max_context` >= 2, but got {self.max_context!r}")


def base_run(model_spec: str | None = None, max_length: int = 512) -> Run:
    """The base model with no adapter, served with the ``mle`` method's deterministic predictive."""
    from ..config import resolve_format
    from ..methods import build_method
    from ..models import load_model
    from ..scoring import make_scorer

    loaded = load_model(model_spec)
    fmt = resolve_format("auto", loaded.spec, loaded.model)
    scorer = make_scorer(fmt, loaded.tokenizer, max_length=max_length)
    info = {"model": loaded.spec, "method": "mle", "format": fmt, "adapter": None}
    return Run(model=loaded.model, tokenizer=loaded.tokenizer, method=build_method("mle", {}), scorer=scorer,
               info=info)


@dataclass
class _Generated:
    text: str
    finish_reason: str
    steps: list[TokenStep]  # the tokens of the text (an ending stop token is not one of them)
    confidence: P.Confidence
    n_generated: int  # tokens the model generated, an ending stop token included (the usage's completion tokens)


# ----------------------------------------------------------------------------------------------------- service
class InferenceService:
    """A loaded run served one request at a time from a bounded queue (see module docstring)."""

    def __init__(self, run: Run, settings: ServeSettings | None = None, model_id: str | None = None):
        self.run = run
        self.settings = settings or ServeSettings()
        spec = str(run.info.get("model", "model"))
        self.model_id = settings.model_name if settings and settings.model_name else (
            model_id or (Path(run.path).name if run.path else spec))
        self.aliases = {self.model_id, spec}
        self.tokenizer = run.tokenizer
        config = getattr(run.model, "config", None)
        self.max_context = self.settings.max_context or int(getattr(config, "max_position_embeddings", 2048))
        self.stop_ids = self._stop_token_ids()
        self._check_defaults()
        self._queue: queue.Queue = queue.Queue(maxsize=self.settings.queue_size)
        self._worker: threading.Thread | None = None
        self._closing = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: str | Path | None, model_spec: str | None = None,
             settings: ServeSettings | None = None, options: dict | None = None) -> InferenceService:
        """Serve ``run_dir`` (any saved method) or, without it, the base model ``model_spec``; ``options``:
        prediction-time method options over the run's (:func:`bayeslora.runs.load_run`)."""
        if run_dir is None:
            if options:
                raise ValueError(f"--option {sorted(options)} applies to a run's method: pass RUN_DIR")
            return cls(base_run(model_spec), settings)
        from ..runs import load_run

        return cls(load_run(run_dir, model_spec=model_spec, options=options), settings)

    # -- queue ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._worker is None:
                self._closing = False
                self._worker = threading.Thread(target=self._work, name="bayeslora-serve-worker", daemon=True)
                self._worker.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._lock:
            self._closing = True
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(None)  # after every queued job: blocks only while the queue is full
            worker.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` for the worker; raises :class:`ServiceBusy` when the queue is full."""
        if self._closing or self._worker is None:
            raise ServiceClosed("The server is shutting down; retry on another instance")
        future: Future = Future()
        try:
            self._queue.put_nowait((future, fn, args))
        except queue.Full:
            raise ServiceBusy(f"The request queue is full ({self.settings.queue_size} waiting); retry later") from None
        return future

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
                future.set_exception(exc)

    # -- info -----------------------------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return self.run.method.name

    def models(self) -> P.ModelList:
        return P.ModelList(data=[self.model_card()])

    def model_card(self, name: str | None = None) -> P.ModelCard:
        """``GET /v1/models/{name}`` (the served model under any of its names) or, without ``name``, its card."""
        self.check_model(name)
        config = self.run.method.config
        options = {k: getattr(config, k) for k in type(config).PREDICTION_OPTIONS if k != "n_samples"}
        return P.ModelCard(id=self.model_id, method=self.method_name, n_samples=self._samples(None, None),
                           format=str(self.run.info.get("format", "")), prediction_options=options)

    def health(self) -> P.Health:
        return P.Health(status="draining" if self._closing else "ok", model=self.model_id, method=self.method_name,
                        queued=self.queued, queue_size=self.settings.queue_size)

    # -- validation -----------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases:
            raise ModelNotFound(f"The model {name!r} does not exist; this server serves {self.model_id!r}",
                                param="model")

    def _samples(self, requested: int | None, param: str | None = "samples") -> int:
        n = requested if requested is not None else self.settings.samples
        if n is None:  # the method's own default, within the server's limit (Laplace's is 50 logit samples)
            n = min(self.run.method.resolve_samples(None), self.settings.max_samples)
        if n > self.settings.max_samples:
            raise InvalidRequest(f"Expected `samples` <= {self.settings.max_samples} (the server's --max-samples), "
                                 f"but got {n}", param=param)
        return self.run.method.config.sample_plan().samples(n)  # an ensemble has K members to draw, no more

    def _check_plan(self, n: int, generation: bool) -> None:
        """Samples the run's sample plan cannot draw (an odd S for antithetic pairs) are the request's error.
        Generation with S = 1 is deterministic, so only S > 1 is checked there; a choice predictive samples S >= 1."""
        if n > (1 if generation else 0):
            try:
                self.run.method.config.sample_plan().check(n, generation=generation)
            except MethodError as exc:
                raise InvalidRequest(str(exc), param="samples") from None

    def _check_defaults(self) -> None:
        """The server's default number of samples must be one this run can draw, for generation and for
        ``/v1/choices``; otherwise every request that does not set ``samples`` would fail (a :class:`ValueError`
        at start-up instead)."""
        n = self._samples(None, param=None)
        try:
            self._check_plan(self._decoded_samples(n), generation=True)
            self._check_plan(n, generation=False)
        except InvalidRequest as exc:
            raise ValueError(f"The server's default number of samples ({n}) does not suit this run: {exc}; pass "
                             "--samples with a count it can draw") from None

    def _decoded_samples(self, n: int) -> int:
        """Rows decoded for ``n`` samples: 1 where there are no weight samples to decode (a point estimate, or
        Laplace; the confidence then says 0)."""
        return n if self.run.method.weight_samples and self.run.method.config.sample_plan().decodes else 1

    @staticmethod
    def _refuse_unsupported(req: P._SamplingRequest) -> None:
        """OpenAI features that would change the answer and that this server does not implement: a 400 naming
        them, not a plain-text reply that ignores them."""
        unsupported = {
            "tools": bool(req.tools) or bool(req.functions),
            "tool_choice": req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none",
                                                                                                       "auto"),
            "response_format": req.response_format is not None and req.response_format.get("type", "text") != "text",
            "logit_bias": bool(req.logit_bias),
        }
        for name, used in unsupported.items():
            if used:
                raise InvalidRequest(f"`{name}` is not supported by this server (no tool calls, JSON mode or logit "
                                     "bias; plain text generation only)", param=name)

    def _decode_params(self, req: P._SamplingRequest, max_tokens: int | None, top_logprobs: int) -> DecodeParams:
        s = self.settings
        self._refuse_unsupported(req)
        max_tokens = s.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > s.max_tokens:
            raise InvalidRequest(f"Expected `max_tokens` <= {s.max_tokens} (the server's limit), but got {max_tokens}",
                                 param="max_tokens")
        if (req.n or 1) > s.max_n:
            raise InvalidRequest(f"Expected `n` <= {s.max_n} (the server's limit), but got {req.n}", param="n")
        stops = req.stop_list()
        if len(stops) > P.MAX_STOP or any(len(x) > 256 for x in stops):
            raise InvalidRequest(f"Expected at most {P.MAX_STOP} stop strings of at most 256 characters", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise InvalidRequest(f"`{name}` is not supported by this server (only 0)", param=name)
        n_samples = self._decoded_samples(self._samples(req.samples))
        self._check_plan(n_samples, generation=True)
        return DecodeParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, n_samples=n_samples,
                            top_logprobs=top_logprobs, stop_token_ids=self.stop_ids)

    def _check_length(self, prompt_ids: list[int], params: DecodeParams, param: str) -> None:
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty after tokenization", param=param)
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise InvalidRequest(f"This model's context is {self.max_context} tokens, but the prompt has "
                                 f"{len(prompt_ids)} tokens and max_tokens is {params.max_tokens}", param=param,
                                 code="context_length_exceeded")

    # -- tokenization ---------------------------------------------------------------------------------------
    def _stop_token_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id,
                       getattr(getattr(self.run.model, "generation_config", None), "eos_token_id", None)):
            ids.update(source if isinstance(source, list | tuple | set) else [source])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in self.tokenizer.get_vocab() \
            else None
        ids.add(im_end)
        return frozenset(int(i) for i in ids if i is not None)

    def chat_prompt(self, messages: list[P.ChatMessage]) -> list[int]:
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                 for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        return self._ids(text)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- generation -----------------------------------------------------------------------------------------
    def _generator(self, seed: int | None) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(seed if seed is not None else secrets.randbits(63))

    def _generate(self, prompt_ids: list[int], params: DecodeParams, stops: list[str], generator: torch.Generator,
                  on_delta: Callable[[str, TokenStep], None] | None = None,
                  cancelled: threading.Event | None = None) -> _Generated:
        matcher = StopMatcher(self.tokenizer, stops, skip_ids=params.stop_token_ids)
        steps: list[TokenStep] = []
        finish = "length"
        should_stop = cancelled.is_set if cancelled is not None else (lambda: False)
        ended = 0
        for step in decode(self.run.model, self.run.method, prompt_ids, params, generator, should_stop):
            if step.token_id in params.stop_token_ids:
                # the end-of-turn token is no part of the answer: not in its logprobs (as in a stream) or confidence
                finish, ended = "stop", 1
                break
            steps.append(step)
            delta, stopped = matcher.push(step.token_id)
            if on_delta is not None:
                on_delta(delta, step)
            if stopped:
                finish = "stop"
                break
        tail = matcher.flush()
        if tail and on_delta is not None:
            on_delta(tail, None)
        return _Generated(matcher.text, finish, steps, self._confidence(steps, params), len(steps) + ended)

    def _confidence(self, steps: list[TokenStep], params: DecodeParams) -> P.Confidence:
        n = len(steps)

        def mean(xs: list[float]) -> float:
            return sum(xs) / n if n else 0.0

        return P.Confidence(score=sequence_confidence([s.logprob for s in steps]),
                            mean_entropy=mean([s.entropy for s in steps]),
                            max_entropy=max((s.entropy for s in steps), default=0.0),
                            mean_epistemic=mean([s.epistemic for s in steps]),
                            mean_aleatoric=mean([s.aleatoric for s in steps]),
                            method=self.method_name, n_samples=params.n_samples if params.n_samples > 1 else 0,
                            n_tokens=n)

    def _token_logprob(self, step: TokenStep) -> P.TokenLogprob:
        text = self._token_text(step.token_id)
        top = [P.TopLogprob(token=self._token_text(i), logprob=lp, bytes=list(self._token_text(i).encode()))
               for i, lp in step.top]
        return P.TokenLogprob(token=text, logprob=step.logprob, bytes=list(text.encode()), top_logprobs=top,
                              entropy=step.entropy, epistemic=step.epistemic)

    # -- endpoints (run on the worker) ----------------------------------------------------------------------
    def chat_completion(self, req: P.ChatCompletionRequest, emit: Emit | None = None,
                        cancelled: threading.Event | None = None) -> P.ChatCompletionResponse:
        """``POST /v1/chat/completions``; with ``emit``, streams :class:`~.protocol.ChatCompletionChunk` s to it."""
        self.check_model(req.model)
        want_logprobs = bool(req.logprobs)
        if req.top_logprobs and not want_logprobs:
            raise InvalidRequest("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        params = self._decode_params(req, req.max_completion_tokens or req.max_tokens,
                                     (req.top_logprobs or 0) if want_logprobs else 0)
        prompt = self.chat_prompt(req.messages)
        self._check_length(prompt, params, "messages")
        generator = self._generator(req.seed)
        response = P.ChatCompletionResponse(model=self.model_id, choices=[], usage=P.Usage(
            prompt_tokens=len(prompt), completion_tokens=0, total_tokens=len(prompt)))
        def chunk(choice: P.ChatChunkChoice | None, usage: P.Usage | None = None) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(id=response.id, created=response.created, model=self.model_id,
                                         choices=[choice] if choice else [], usage=usage)

        for index in range(req.n or 1):
            on_delta = None
            if emit is not None:
                emit(chunk(P.ChatChunkChoice(index=index, delta=P.DeltaMessage(role="assistant", content=""))))

                def on_delta(text, step, index=index):
                    lp = P.ChoiceLogprobs(content=[self._token_logprob(step)]) if want_logprobs and step else None
                    if text or lp:
                        emit(chunk(P.ChatChunkChoice(index=index, delta=P.DeltaMessage(content=text), logprobs=lp)))
            out = self._generate(prompt, params, req.stop_list(), generator, on_delta, cancelled)
            logprobs = P.ChoiceLogprobs(content=[self._token_logprob(s) for s in out.steps]) if want_logprobs else None
            response.choices.append(P.ChatChoice(index=index, message=P.ResponseMessage(content=out.text),
                                                 finish_reason=out.finish_reason, logprobs=logprobs,
                                                 confidence=out.confidence))
            response.usage.completion_tokens += out.n_generated
            if emit is not None:
                emit(chunk(P.ChatChunkChoice(index=index, delta=P.DeltaMessage(), finish_reason=out.finish_reason,
                                             confidence=out.confidence)))
        response.usage.total_tokens = response.usage.prompt_tokens + response.usage.completion_tokens
        if emit is not None and req.stream_options is not None and req.stream_options.include_usage:
            emit(chunk(None, response.usage))
        return response

    def completion(self, req: P.CompletionRequest, emit: Emit | None = None,
                   cancelled: threading.Event | None = None) -> P.CompletionResponse:
        """``POST /v1/completions`` (a list of prompts gives ``n`` choices per prompt, prompt-major)."""
        self.check_model(req.model)
        if req.suffix:
            raise InvalidRequest("`suffix` is not supported by this server", param="suffix")
        if req.echo and req.logprobs is not None:
            raise InvalidRequest("`echo` together with `logprobs` is not supported by this server", param="echo")
        if (req.best_of or 1) > 1:
            raise InvalidRequest("`best_of` is not supported by this server (only 1)", param="best_of")
        params = self._decode_params(req, req.max_tokens, req.logprobs or 0)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not 1 <= len(prompts) <= self.settings.max_n:
            raise InvalidRequest(f"Expected 1 to {self.settings.max_n} prompts, but got {len(prompts)}",
                                 param="prompt")
        if len(prompts) * (req.n or 1) > self.settings.max_n:
            raise InvalidRequest(f"Expected prompts x n <= {self.settings.max_n}, but got "
                                 f"{len(prompts) * (req.n or 1)}", param="n")
        encoded = [self._ids(p) for p in prompts]
        for ids in encoded:
            self._check_length(ids, params, "prompt")
        generator = self._generator(req.seed)
        response = P.CompletionResponse(model=self.model_id, choices=[])
        usage = P.Usage(prompt_tokens=sum(len(i) for i in encoded), completion_tokens=0,  # each prompt once
                        total_tokens=0)
        def chunk(choice: P.CompletionChoice | None, usage: P.Usage | None = None) -> P.CompletionResponse:
            return P.CompletionResponse(id=response.id, created=response.created, model=self.model_id,
                                        choices=[choice] if choice else [], usage=usage)

        for p, (text, ids) in enumerate(zip(prompts, encoded)):
            for j in range(req.n or 1):
                index = p * (req.n or 1) + j
                on_delta = None
                if emit is not None:
                    if req.echo:
                        emit(chunk(P.CompletionChoice(index=index, text=text, finish_reason=None)))

                    offset = [len(text) if req.echo else 0]  # text_offset of the next streamed token

                    def on_delta(delta, step, index=index, offset=offset):
                        lp = None
                        if req.logprobs is not None and step is not None:
                            lp = self._completion_logprobs([step], offset[0])
                            offset[0] += len(lp.tokens[0])
                        if delta or lp:
                            emit(chunk(P.CompletionChoice(index=index, text=delta, finish_reason=None, logprobs=lp)))
                out = self._generate(ids, params, req.stop_list(), generator, on_delta, cancelled)
                usage.completion_tokens += out.n_generated
                response.choices.append(P.CompletionChoice(
                    index=index, text=(text if req.echo else "") + out.text, finish_reason=out.finish_reason,
                    logprobs=self._completion_logprobs(out.steps) if req.logprobs is not None else None,
                    confidence=out.confidence))
                if emit is not None:
                    emit(chunk(P.CompletionChoice(index=index, text="", finish_reason=out.finish_reason,
                                                  confidence=out.confidence)))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        response.usage = usage
        if emit is not None and req.stream_options is not None and req.stream_options.include_usage:
            emit(chunk(None, usage))
        return response

    def _completion_logprobs(self, steps: list[TokenStep], offset: int = 0) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for step in steps:
            text = self._token_text(step.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(step.logprob)
            out.top_logprobs.append({self._token_text(i): lp for i, lp in step.top})
            out.text_offset.append(offset)
            out.token_entropy.append(step.entropy)
            out.token_epistemic.append(step.epistemic)
            offset += len(text)
        return out

    def choose(self, req: P.ChoicesRequest) -> P.ChoicesResponse:
        """``POST /v1/choices``: the multiple-choice predictive of ``bayeslora eval`` for one question."""
        from ..tasks.base import qa_example

        self.check_model(req.model)
        if not req.question.strip():
            raise InvalidRequest("The question must not be blank", param="question")
        for i, choice in enumerate(req.choices):
            if not choice.strip() or len(choice) > P.MAX_TEXT_CHARS // 10:
                raise InvalidRequest(f"Choice {i} must be a non-empty string of at most {P.MAX_TEXT_CHARS // 10} "
                                     "characters", param="choices")
        n_samples = self._samples(req.samples)
        self._check_plan(n_samples, generation=False)
        threshold = self.settings.abstain_threshold if req.abstain_threshold is None else req.abstain_threshold
        example = qa_example("request", req.question, list(req.choices), 0, preamble=req.context or "")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        pred = self.run.predict([example], n_samples=n_samples, batch_size=1, seed=seed)
        confidence = float(pred.confidence[0])
        prediction = int(pred.prediction[0])
        return P.ChoicesResponse(
            model=self.model_id, method=self.method_name, n_samples=pred.n_samples,
            probs=[float(p) for p in pred.probs[0, : len(req.choices)]], prediction=prediction,
            prediction_text=req.choices[prediction], confidence=confidence,
            uncertainty=P.Uncertainty(total=float(pred.total[0]), aleatoric=float(pred.aleatoric[0]),
                                      epistemic=float(pred.epistemic[0])),
            abstain=confidence < threshold, abstain_threshold=threshold)


def _content_text(content: str | list[P.ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)
