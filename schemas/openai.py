"""Bodies of the OpenAI-compatible API (/v1): completions, chat completions, models, errors.

The shapes follow OpenAI's API reference (and what the `openai` Python client parses). Requests
keep unknown fields (``extra="allow"``) so that the server can name each one it does not support
in its 400, instead of silently ignoring a parameter that would change the result
(server/ops/openai_compat.py decides which are harmless). Responses keep their nulls, as OpenAI
sends them (``"logprobs": null``, a chunk's ``"finish_reason": null``), except a stream's
``delta``, which holds only what it carries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (chat) and logprobs (completions: 5)
MAX_STOP = 16  # OpenAI allows 4; more cost nothing here but a decode per step


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())

    model: str = Field(min_length=1, max_length=1000)
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = -1  # an extension (as vLLM's): -1 is no limit
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0  # only 0 is supported
    frequency_penalty: float = 0.0  # only 0 is supported


class CompletionRequest(OpenAIRequest):
    """``POST /v1/completions``. ``prompt``: a string, token ids, or a batch of either."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # only false is supported
    best_of: int | None = None  # only None or n is supported
    suffix: str | None = None  # only None is supported


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


# ----- responses ---------------------------------------------------------------------------------
class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(OpenAIResponse):
    """The legacy completions shape: parallel lists, one entry per returned token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(OpenAIResponse):
    """``text_completion`` (a whole answer, or one chunk of a stream)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(OpenAIResponse):
    content: list[TokenLogprob] | None = None


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIResponse):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(OpenAIResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(OpenAIResponse):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FileObject(OpenAIResponse):
    """An uploaded file (``POST /v1/files``): a dataset the native API's Dataset reads by its id."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # rows are checked before an upload is answered
    status_details: str | None = None


class FileList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(OpenAIResponse):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ErrorDetail(OpenAIResponse):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(OpenAIResponse):
    error: ErrorDetail


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
