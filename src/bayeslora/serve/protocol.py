"""Pydantic request/response models mirroring the OpenAI API (chat completions, completions, models, errors).

Every field that is not in the OpenAI specification is grouped under a ``# --- bayeslora extension`` comment.
Requests ignore unknown fields (as OpenAI-compatible servers do, so newer clients keep working) but validate the
ranges of every field they use; a failed validation becomes a 400 in OpenAI's error shape (see :mod:`.app`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..tasks.base import LETTERS

# Hard caps of the schema itself; the server's configured limits (ServeSettings) are usually lower.
MAX_TEXT_CHARS = 100_000
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


# ------------------------------------------------------------------------------------------ shared sampling
class _SamplingRequest(_Request):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, description="default: the server's --default-max-tokens")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0: greedy; default 1")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="accepted; only 0 supported")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="accepted; only 0 supported")
    user: str | None = None
    # OpenAI features this server does not implement: refused (400) unless absent or at their no-op value
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    # --- bayeslora extension (not in the OpenAI spec) ---
    samples: int | None = Field(default=None, ge=0, description="posterior samples S decoded together "
                                "(default: the server's --samples, else the method's); 0 or 1: deterministic")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class StreamOptions(_Request):
    include_usage: bool | None = False


# ----------------------------------------------------------------------------------------------------- chat
class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None


class ContentPart(_Request):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] = Field(description="a prompt or a list of prompts")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="number of top logprobs per token")
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, description="accepted; only 1 supported")


# ------------------------------------------------------------------------------------------------ responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    # --- bayeslora extension (not in the OpenAI spec) ---
    entropy: float = Field(description="entropy (nats) of the mean predictive next-token distribution")
    epistemic: float = Field(description="mutual information (nats) across posterior samples; 0 if deterministic")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class Confidence(BaseModel):
    """bayeslora extension: how much to trust a generated sequence.

    ``score`` is the geometric mean of the emitted tokens' probabilities under the mean predictive
    (``exp(mean_t log p(token_t))``), in [0, 1]; an ending stop token is not one of them. Entropies in nats.
    """

    score: float = Field(ge=0.0, le=1.0)
    mean_entropy: float
    max_entropy: float
    mean_epistemic: float
    mean_aleatoric: float
    method: str
    n_samples: int
    n_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChoiceLogprobs | None = None
    # --- bayeslora extension (not in the OpenAI spec) ---
    confidence: Confidence


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None
    # --- bayeslora extension (not in the OpenAI spec): only on a choice's last chunk ---
    confidence: Confidence | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)
    # --- bayeslora extension (not in the OpenAI spec) ---
    token_entropy: list[float] = Field(default_factory=list)
    token_epistemic: list[float] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None
    # --- bayeslora extension (not in the OpenAI spec); absent from intermediate stream chunks ---
    confidence: Confidence | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "bayeslora"
    # --- bayeslora extension (not in the OpenAI spec) ---
    method: str
    n_samples: int
    format: str
    #: the run's prediction options in effect (``bayeslora serve --option``), but ``n_samples``
    prediction_options: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------- POST /v1/choices (bayeslora endpoint, not OpenAI's)
class ChoicesRequest(_Request):
    """A multiple-choice question, scored like ``bayeslora eval`` does."""

    model: str | None = Field(default=None, max_length=512, description="default: the served model")
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    choices: list[str] = Field(min_length=2, max_length=len(LETTERS))  # the limits a data file has
    context: str | None = Field(default=None, max_length=MAX_TEXT_CHARS,
                                description="a preamble put before the question (e.g. a passage)")
    samples: int | None = Field(default=None, ge=0, description="posterior samples (default: the server's); as in "
                                "`bayeslora eval`, 0 is the posterior mean and 1 one posterior draw")
    abstain_threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                            description="abstain when confidence is below it (default: server's)")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class Uncertainty(BaseModel):
    """Entropies in nats: total = aleatoric + epistemic."""

    total: float
    aleatoric: float
    epistemic: float


class ChoicesResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("mcq"))
    object: Literal["choices.prediction"] = "choices.prediction"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    method: str
    n_samples: int
    probs: list[float]
    prediction: int
    prediction_text: str
    confidence: float
    uncertainty: Uncertainty
    abstain: bool
    abstain_threshold: float


# ----------------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    method: str
    queued: int
    queue_size: int


for _model in (_SamplingRequest, ChatMessage, ChatCompletionRequest, CompletionRequest):
    _model.model_rebuild()
