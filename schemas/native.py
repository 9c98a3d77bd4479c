"""Bodies of the native Twinkle API's service, management and sampler routes, as ModelScope's
`twinkle_client` (twinkle-kit 0.5.1) sends and parses them (docs/twinkle-native.md; the client's
own models are in `twinkle_client/types/{session,server,training,sampler}.py`).

Requests accept unknown keys (`extra="allow"`): the client forwards a method's **kwargs into the
body. NaN and Infinity are refused in requests, and the client's simplejson refuses them in
answers, so no model here holds one."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

TokenIds = list[StrictInt]  # a bool, a float or a string is not a token id


class NativeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


class NativeResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----- sessions and the server -------------------------------------------------------------------
class CreateSessionRequest(NativeRequest):
    metadata: dict[str, Any] | None = None


class CreateSessionResponse(NativeResponse):
    session_id: str


class SessionHeartbeatRequest(NativeRequest):
    session_id: str


class SupportedModel(NativeResponse):
    model_name: str


class ServerCapabilities(NativeResponse):
    supported_models: list[SupportedModel]


class Health(NativeResponse):
    status: Literal["ok"] = "ok"


class CapacityInfo(NativeResponse):
    """The calling tenant's adapters: its live-model limit, how many it holds, how many are left."""

    max_loras: int
    used_loras: int
    free_loras: int


# ----- training runs and checkpoints -------------------------------------------------------------
class Cursor(NativeResponse):
    limit: int
    offset: int
    total_count: int


class Checkpoint(NativeResponse):
    """twinkle_client's Checkpoint: `size_bytes` must be an int, `twinkle_path` is required."""

    checkpoint_id: str  # "<weights|sampler_weights>/<name>"
    checkpoint_type: str  # training | sampler | external
    time: datetime
    size_bytes: int
    public: bool = False
    twinkle_path: str
    base_model: str | None = None
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    user_metadata: dict[str, Any] | None = None


class TrainingRun(NativeResponse):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, Any] | None = None


class TrainingRunsResponse(NativeResponse):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointsListResponse(NativeResponse):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class CheckpointPath(NativeResponse):
    """`path` is a server filesystem path on Twinkle; here it is always "" (paths on disk are the
    server's own business), and `twinkle_path` is the checkpoint's name."""

    path: str = ""
    twinkle_path: str


class DeleteCheckpointResponse(NativeResponse):
    success: bool
    message: str


class WeightsInfoRequest(NativeRequest):
    twinkle_path: str


class WeightsInfo(NativeResponse):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class WeightsInfoResponse(WeightsInfo):
    """Both shapes the client knows: `TwinkleClient.get_weights_info` parses the fields at the top
    level (types/training.py), the server module's model has them under `weights_info`."""

    weights_info: WeightsInfo


# ----- the sampler -------------------------------------------------------------------------------
class InputFeature(NativeRequest):
    """A tokenized prompt. `labels[i]` is the target predicted at position i (`input_ids[i+1]` or
    -100), the last one -100; optional keys (attention_mask, position_ids, length,
    completion_mask) are accepted and recomputed."""

    input_ids: TokenIds = Field(min_length=1)
    labels: TokenIds | None = None


class ChatMessage(NativeRequest):
    """One turn; tool_calls, tool_call_id and reasoning_content go to the chat template as they are."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class Trajectory(NativeRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class SamplingParams(NativeRequest):
    """The keys Twinkle's `SamplingParams.from_dict` reads; others are ignored, as there."""

    max_tokens: StrictInt | None = Field(None, ge=0)  # None: 16 (vLLM's default); 0: score the prompt only
    max_new_tokens: StrictInt | None = Field(None, ge=0)  # max_tokens' alias
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = -1  # -1: off
    seed: StrictInt | None = None
    stop: str | list[StrictInt | str] | None = None  # strings or token ids, not both
    logprobs: StrictInt | None = Field(None, ge=0)
    prompt_logprobs: StrictInt | None = Field(None, ge=0)
    num_samples: StrictInt | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)


class SampleRequest(NativeRequest):
    inputs: list[dict[str, Any]] | dict[str, Any]  # InputFeature or Trajectory dicts, parsed one by one
    sampling_params: SamplingParams | None = None
    adapter_name: str = ""  # does not select weights (as on Twinkle's vLLM sampler): adapter_uri does
    adapter_uri: str | None = None
    num_samples: StrictInt | None = Field(None, ge=1)  # the client always sends it (default 1)


class SetTemplateRequest(NativeRequest):
    template_cls: str
    adapter_name: str = ""
    model_id: str | None = None  # the client's model id; the served base model's tokenizer is used


class OkResponse(NativeResponse):
    status: Literal["ok"] = "ok"


LogprobPair = tuple[int, float]


class NewInputFeature(NativeResponse):
    """The prompt plus the sampled tokens, ready for forward_backward: labels next-token aligned."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    position_ids: list[int]
    length: int


class SampledSequence(NativeResponse):
    stop_reason: Literal["length", "stop", "abort", "error"]
    tokens: list[int]
    logprobs: list[list[LogprobPair]] | None = None
    decoded: str | None = None
    new_input_feature: NewInputFeature | None = None


class SampleResponse(NativeResponse):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[LogprobPair] | None] | None = None


class SampleResponseList(NativeResponse):
    samples: list[SampleResponse]


# ----- the processor app (server-side datasets and data loaders) ---------------------------------
class ProcessorCreateRequest(NativeRequest):
    """The constructor's kwargs ride along (dataset_meta as a tagged JSON string, objects as "pid:…")."""

    processor_type: str
    class_type: str


class ProcessorCreateResponse(NativeResponse):
    processor_id: str  # "pid:<32 hex>"


class ProcessorCallRequest(NativeRequest):
    """The method's kwargs ride along."""

    processor_id: str
    function: str
