"""Pydantic models for the JSON bodies of the Tinker API (tinker SDK 0.38.0).

Requests (SDK -> server) use ``extra="ignore"``: newer SDKs keep adding fields, and rejecting
unknown ones is exactly what breaks old-schema servers
(docs/tinker-protocol-notes.md, "Unknown request fields"). The SDK sends
``model_dump(mode="json", exclude_none=True)``, so ``None`` here always means "absent", and fields
with defaults arrive with their values. Cheap, obviously-correct checks live here so
FastAPI reports the offending field in its 422.

Responses (server -> SDK) use ``extra="forbid"`` to catch typos in server code and must be
serialized with ``model_dump(mode="json", exclude_none=True)``; the SDK validates them with its
own pydantic types (``tinker.types``), which tests/unit/test_schemas.py checks.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

# ============================================================================================
# Bases and shared value types
# ============================================================================================


class RequestModel(BaseModel):
    """Base of every SDK -> server body: unknown fields are ignored, never rejected."""

    # protected_namespaces=(): the API has fields named model_id, model_seq_id, model_path, ...
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ResponseModel(BaseModel):
    """Base of every server -> SDK body; dump with ``model_dump(mode="json", exclude_none=True)``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


TEXT_MAX_LEN = 200  # names, tags, project ids: what the database columns hold
METADATA_MAX_BYTES = 64 * 1024  # a user_metadata object, as JSON


def _no_nul(text: str) -> str:
    # PostgreSQL text cannot hold NUL; refused here for every database alike.
    if "\x00" in text:
        raise ValueError("cannot contain NUL characters")
    return text


def _strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_of(item)


def _check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if metadata is None:
        return None
    size = len(json.dumps(metadata))
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {METADATA_MAX_BYTES}")
    for text in _strings_of(metadata):
        _no_nul(text)
    return metadata


Text = Annotated[str, Field(max_length=TEXT_MAX_LEN), AfterValidator(_no_nul)]
"""Short free text a request names things with (stored, listed, searched)."""
SdkVersion = Annotated[str, Field(max_length=64), AfterValidator(_no_nul)]
Ref = Annotated[str, Field(max_length=700), AfterValidator(_no_nul)]
"""A base model name or a tinker:// path that a request refers to (echoed in its errors)."""
Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata)]
"""``user_metadata``: any JSON object up to METADATA_MAX_BYTES."""
StrMetadata = Annotated[dict[str, str] | None, AfterValidator(_check_metadata)]


CHECKPOINT_NAME_MAX_LEN = 128


def _check_checkpoint_name(name: str) -> str:
    # A name becomes the last segment of tinker://<run>/<weights|sampler_weights>/<name>, and the
    # SDK's path parser needs exactly three '/'-separated parts (types/checkpoint.py:50-71).
    if not name:
        raise ValueError("checkpoint names cannot be empty")
    if len(name) > CHECKPOINT_NAME_MAX_LEN:
        raise ValueError(
            f"checkpoint names are at most {CHECKPOINT_NAME_MAX_LEN} characters, got {len(name)}"
        )
    for sep in ("/", "\\"):
        if sep in name:
            raise ValueError(
                f"checkpoint names cannot contain {sep!r}: they become the last segment of a "
                "tinker:// path"
            )
    if name in (".", ".."):
        raise ValueError(
            f"checkpoint names cannot be {name!r}: it would name a directory, not a checkpoint"
        )
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise ValueError(
            "checkpoint names cannot contain control characters (newlines, tabs, NUL, ...)"
        )
    return name


CheckpointName = Annotated[str, AfterValidator(_check_checkpoint_name)]
"""A user-chosen checkpoint name (the ``path`` of save requests)."""


class OptimizerConfig(BaseModel):
    """Optimizer family fixed at model creation, e.g. ``{"type": "adamw"}`` or
    ``{"type": "dimuon", "version": 1}``. Family-specific fields are kept as extras."""

    model_config = ConfigDict(extra="allow")

    type: str = "adamw"


# ============================================================================================
# Model input (prompt) and tensors
# ============================================================================================


class EncodedTextChunk(RequestModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"


class ImageChunk(RequestModel):
    # Base64 text as sent; kept undecoded because the text-only server only rejects it.
    data: str
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    type: Literal["image"] = "image"


class ImageAssetPointerChunk(RequestModel):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"


class DmelChunk(RequestModel):
    dmel: str  # base64 of a serialized TensorContainer
    type: Literal["dmel"] = "dmel"


def _chunk_tag(value: Any) -> str:
    # The SDK always sends `type`; a chunk without one can only be plain tokens.
    if isinstance(value, dict):
        return value.get("type", "encoded_text")
    return getattr(value, "type", "encoded_text")


ModelInputChunk = Annotated[
    Annotated[EncodedTextChunk, Tag("encoded_text")]
    | Annotated[ImageChunk, Tag("image")]
    | Annotated[ImageAssetPointerChunk, Tag("image_asset_pointer")]
    | Annotated[DmelChunk, Tag("dmel")],
    Discriminator(_chunk_tag),
]


class ModelInput(RequestModel):
    chunks: list[ModelInputChunk]


class TensorData(RequestModel):
    """JSON tensor (only ``SampleRequest.target_prompt_logprobs`` uses it): flat ``data``,
    optional dense ``shape``, or sparse CSR when ``sparse_crow_indices`` is set."""

    data: list[int] | list[float]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


# ============================================================================================
# Client bootstrap, sessions, telemetry
# ============================================================================================


class ClientConfigRequest(RequestModel):
    """``POST /api/v1/client/config``."""

    sdk_version: str


class ClientDynamicConfigRequest(RequestModel):
    """``POST /api/v1/client/dynamic_config``."""

    sdk_version: str


class ClientConfigResponse(ResponseModel):
    """Feature flags for the SDK (docs/tinker-protocol-notes.md, "client/config flags"). The flags that
    choose protocol paths are always sent explicitly (they select the paths this server
    implements); the other knobs are sent only when set, otherwise the SDK's defaults apply."""

    pjwt_auth_enabled: bool = False
    proto_compress_fwdbwd: bool = False
    parallel_fwdbwd_chunks: bool = False
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False
    use_pyqwest_transport: bool = True
    # Read by older SDKs only (0.22 .. 0.30; 0.38 ignores them): protobuf forward_backward bodies,
    # forward() as forward_backward(forward_only), create_training_client_from_state as one
    # load_weights instead of weights_info + create_model + load_weights.
    proto_write_fwdbwd: bool | None = None
    fwd_via_fwdbwd: bool | None = None
    create_model_via_load_weights: bool | None = None

    credential_default_source: str | None = None
    sample_dispatch_bytes_semaphore_size: int | None = None
    inflight_response_bytes_semaphore_size: int | None = None
    fwdbwd_max_chunk_len: int | None = None
    fwdbwd_max_chunk_bytes_count: int | None = None
    fwdbwd_dispatch_bytes_semaphore_size: int | None = None
    billing_exception_max_pause_duration_sec: int | None = None
    sample_no_retries: bool | None = None
    sample_enable_stuck_detection: bool | None = None
    sample_max_concurrent_requests: int | None = None


class ClientDynamicConfigResponse(ResponseModel):
    """Unset fields keep the SDK defaults (300 s refresh, no explicit sample cancel)."""

    refresh_interval_sec: int | None = None
    sample_cancel_enabled: bool | None = None
    sample_cancel_max_batch_size: int | None = None


class CreateSessionRequest(RequestModel):
    """``POST /api/v1/create_session``."""

    tags: list[Text] = Field(default_factory=list, max_length=100)
    user_metadata: Metadata = None
    sdk_version: SdkVersion
    project_id: Text | None = None
    display_name: Text | None = None
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(ResponseModel):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatRequest(RequestModel):
    """``POST /api/v1/session_heartbeat``."""

    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class HeartbeatResponse(ResponseModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionFinishReason(RequestModel):
    type: Literal["success", "errored", "interrupted"]


class SessionFinishRequest(RequestModel):
    """``POST /api/v1/sessions/{session_id}/finish``; the SDK sends ``detail: null`` explicitly."""

    reason: SessionFinishReason
    detail: str | None = None


class TelemetryEvent(RequestModel):
    """One telemetry event. The SDK's four event kinds (``SESSION_START``, ``SESSION_END``,
    ``UNHANDLED_EXCEPTION``, ``GENERIC_EVENT``) share the first five fields; the rest are
    kind-specific. ``event`` is a plain string so new kinds are accepted."""

    event: str
    event_id: str
    event_session_index: int
    severity: str
    timestamp: datetime
    event_name: str | None = None
    event_data: dict[str, Any] | None = None
    duration: str | None = None
    error_message: str | None = None
    error_type: str | None = None
    traceback: str | None = None


class TelemetrySendRequest(RequestModel):
    """``POST /api/v1/telemetry``."""

    events: list[TelemetryEvent]
    platform: str
    sdk_version: str
    session_id: str
    process_uuid: str | None = None  # added in later SDKs; optional for older ones


class TelemetryResponse(ResponseModel):
    status: Literal["accepted"] = "accepted"


class HealthResponse(ResponseModel):
    """``GET /api/v1/healthz``."""

    status: Literal["ok"] = "ok"


class SupportedModel(ResponseModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(ResponseModel):
    """``GET /api/v1/get_server_capabilities``."""

    supported_models: list[SupportedModel]


# ============================================================================================
# Futures
# ============================================================================================


class UntypedAPIFuture(ResponseModel):
    """Answer of every submission endpoint. ``asample`` must also return one
    ``sample_sequence_ids`` entry per requested sample."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class FutureRetrieveRequest(RequestModel):
    """``POST /api/v1/retrieve_future``."""

    request_id: str
    allow_metadata_only: bool = False


class TryAgainResponse(ResponseModel):
    """``retrieve_future`` answer while the request is still pending."""

    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | None = None


class FutureErrorResponse(ResponseModel):
    """``retrieve_future`` answer for a failed request. The SDK raises ``RequestFailedError``;
    the category must be lower-case or it degrades to ``unknown``."""

    error: str
    category: Literal["user", "server", "unknown"]


# ============================================================================================
# Training
# ============================================================================================


class LoraConfig(RequestModel):
    rank: int = Field(ge=1)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(RequestModel):
    """``POST /api/v1/create_model`` -> future of ``CreateModelResponse``."""

    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: Ref
    user_metadata: Metadata = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(ResponseModel):
    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(RequestModel):
    """``POST /api/v1/get_info``."""

    model_id: str
    type: Literal["get_info"] = "get_info"


class ModelData(ResponseModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(ResponseModel):
    type: Literal["get_info"] = "get_info"
    model_data: ModelData
    model_id: str
    optimizer_config: OptimizerConfig | None = None
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class AdamParams(RequestModel):
    """Per-step AdamW hyperparameters (decoupled weight decay, like ``torch.optim.AdamW``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)  # 0 disables clipping


class OptimStepRequest(RequestModel):
    """``POST /api/v1/optim_step`` -> future of ``OptimStepResponse``. The SDK sends exactly one
    of ``adam_params`` (Adam) or ``optimizer_params`` (other families, e.g. dimuon)."""

    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None
    type: Literal["optim_step"] = "optim_step"

    @model_validator(mode="after")
    def _one_param_set(self) -> OptimStepRequest:
        if (self.adam_params is None) == (self.optimizer_params is None):
            raise ValueError("send exactly one of adam_params or optimizer_params")
        return self


class OptimStepResponse(ResponseModel):
    metrics: dict[str, float] | None = None


class SaveWeightsRequest(RequestModel):
    """``POST /api/v1/save_weights`` (``save_state``) -> future of ``SaveWeightsResponse``."""

    model_id: str
    path: CheckpointName | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: StrMetadata = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(ResponseModel):
    path: str  # tinker://<model_id>/weights/<name>
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(RequestModel):
    """``POST /api/v1/save_weights_for_sampler``, two modes: a named checkpoint (``path``,
    answered with ``path``) or an ephemeral sampler (``sampling_session_seq_id``, answered
    with ``sampling_session_id``; ``save_weights_and_get_sampling_client``)."""

    model_id: str
    path: CheckpointName | None = None
    sampling_session_seq_id: int | None = Field(default=None, ge=0)
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: StrMetadata = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    @model_validator(mode="after")
    def _one_mode(self) -> SaveWeightsForSamplerRequest:
        if (self.path is None) == (self.sampling_session_seq_id is None):
            raise ValueError(
                "send exactly one of path (a named sampler checkpoint) or "
                "sampling_session_seq_id (an ephemeral sampler)"
            )
        return self


class SaveWeightsForSamplerResponse(ResponseModel):
    """The SDK's ``SaveWeightsForSamplerResponseInternal``: ``path`` for the named mode,
    ``sampling_session_id`` for the ephemeral mode."""

    path: str | None = None  # tinker://<model_id>/sampler_weights/<name>
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


_LEGACY_LOAD_FIELDS = ("model_id", "seq_id")
_CREATE_VIA_LOAD_FIELDS = ("session_id", "model_seq_id")


class LoadWeightsRequest(RequestModel):
    """``POST /api/v1/load_weights``, two addressing modes:

    * ``load_state`` on an existing model: ``model_id`` + ``seq_id``;
    * create-via-load (``create_training_client_from_state*``): ``session_id`` +
      ``model_seq_id``; the new model's id must be ``f"{session_id}:train:{model_seq_id}"``.
    """

    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: Ref | None = None
    user_metadata: Metadata = None
    path: Ref
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _one_addressing_mode(self) -> LoadWeightsRequest:
        legacy = [name for name in _LEGACY_LOAD_FIELDS if getattr(self, name) is not None]
        create = [name for name in _CREATE_VIA_LOAD_FIELDS if getattr(self, name) is not None]
        if legacy and create:
            raise ValueError(
                f"mixes addressing modes ({', '.join(legacy + create)}): send model_id + seq_id "
                "to load into an existing model, or session_id + model_seq_id to create one"
            )
        if not legacy and not create:
            raise ValueError(
                "names no model: send model_id + seq_id to load into an existing model, or "
                "session_id + model_seq_id to create one"
            )
        fields = _LEGACY_LOAD_FIELDS if legacy else _CREATE_VIA_LOAD_FIELDS
        missing = [name for name in fields if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"missing {' and '.join(missing)}: send model_id + seq_id to load into an "
                "existing model, or session_id + model_seq_id to create one"
            )
        return self

    @property
    def creates_model(self) -> bool:
        """True for the create-via-load mode."""
        return self.session_id is not None


class LoadWeightsResponse(ResponseModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] = "load_weights"


# ============================================================================================
# Sampling
# ============================================================================================


class CreateSamplingSessionRequest(RequestModel):
    """``POST /api/v1/create_sampling_session``; ``model_path`` is a ``tinker://`` sampler
    checkpoint, ``base_model`` samples the bare base model."""

    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: Ref | None = None
    model_path: Ref | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"

    @model_validator(mode="after")
    def _has_target(self) -> CreateSamplingSessionRequest:
        if self.base_model is None and self.model_path is None:
            raise ValueError("send base_model or model_path: there is nothing to sample from")
        return self


class CreateSamplingSessionResponse(ResponseModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(ResponseModel):
    """``GET /api/v1/samplers/{sampling_session_id}``; ``base_model`` is required by the SDK."""

    sampler_id: str
    base_model: str
    model_path: str | None = None


class SamplingParams(RequestModel):
    model_config = ConfigDict(allow_inf_nan=False)

    max_tokens: int | None = Field(default=None, ge=0)  # None: server default
    seed: int | None = None  # may exceed int64; the server folds it into range
    # None: stop at EOS as usual; []: no stop condition at all, not even EOS
    # (docs/tinker-protocol-notes.md, "Stop conditions").
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1  # -1: no limit
    top_p: float = Field(default=1.0, gt=0, le=1)

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("top_k must be -1 (no limit) or at least 1")
        return value


class SampleRequest(RequestModel):
    """``POST /api/v1/asample`` -> future (with ``sample_sequence_ids``) of a protobuf
    ``SampleResponse``. ``compute_logprobs`` is this with ``prompt_logprobs=true``."""

    num_samples: int = Field(default=1, ge=1)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Ref | None = None
    model_path: Ref | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0)
    topk_sample_logprobs: int = Field(default=0, ge=0)
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int = Field(default=0, ge=0)
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1)
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


# ============================================================================================
# REST: training runs and checkpoints
# ============================================================================================


class Cursor(ResponseModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(ResponseModel):
    checkpoint_id: str  # "<weights|sampler_weights|external_weights>/<name>"
    checkpoint_type: Literal["training", "sampler", "external"]
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(ResponseModel):
    """``GET /api/v1/training_runs/{id}/checkpoints`` and ``GET /api/v1/checkpoints``."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(ResponseModel):
    """``GET /api/v1/training_runs/{id}``; ``training_run_id`` is the model id."""

    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(ResponseModel):
    """``GET /api/v1/training_runs``; the SDK requires ``cursor``."""

    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsInfoRequest(RequestModel):
    """``POST /api/v1/weights_info``."""

    tinker_path: str


class WeightsInfoResponse(ResponseModel):
    base_model: str
    optimizer_config: OptimizerConfig | None = None
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


# ============================================================================================
# REST: checkpoint management, copies, signed downloads
# ============================================================================================

TTL_MAX_SECONDS = 10 * 365 * 24 * 3600  # the SDK documents "1 hour to 10 years"


class SetCheckpointTtlRequest(RequestModel):
    """``PUT /api/v1/training_runs/{id}/checkpoints/{checkpoint_id}/ttl``; null clears the expiry."""

    ttl_seconds: int | None


class ExternalWeightsUrlsResponse(ResponseModel):
    """``GET .../checkpoints/{checkpoint_id}/external_weights_urls``: one signed URL per file."""

    urls: dict[str, str]
    expires: datetime


class CopyWeightsRequest(RequestModel):
    """``POST /api/v1/copy_weights``: a destination project, or a session and a model slot in it."""

    source_path: Ref
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    destination_project_id: str | None = Field(default=None, min_length=1, max_length=200)
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class CopyWeightsResponse(ResponseModel):
    tinker_path: str


# ============================================================================================
# REST: sessions
# ============================================================================================


class ListSessionsResponse(ResponseModel):
    """``GET /api/v1/sessions``: session ids, newest first."""

    sessions: list[str]


class GetSessionResponse(ResponseModel):
    """``GET /api/v1/sessions/{id}``."""

    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class AssignSessionProjectRequest(RequestModel):
    """``PUT /api/v1/sessions/{id}/project``."""

    project_id: str = Field(min_length=1, max_length=200)


class TraceExportResponse(ResponseModel):
    """``GET /api/v1/sessions/{id}/trace_export`` (the SDK polls until status is not pending)."""

    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None


class SearchOwner(RequestModel):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(default=None, min_length=1, max_length=10)

    @model_validator(mode="after")
    def _urns_for_user(self) -> SearchOwner:
        if self.type == "user" and not self.owner_urns:
            raise ValueError("owner type 'user' needs owner_urns (1 to 10)")
        return self


class SessionStatusQuery(RequestModel):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[Literal["success", "errored", "interrupted"]] | None = Field(default=None, min_length=1)


class SessionSearchCursor(BaseModel):
    """Both a request part and a response part: the client hands back what it got."""

    model_config = ConfigDict(extra="ignore")

    last_created_at: datetime
    last_session_id: str


class SessionSearchRequest(RequestModel):
    """``POST /api/v1/sessions/search``."""

    session_id: str | None = None
    project_ids: list[Text] | None = Field(default=None, max_length=100)
    user_metadata: Annotated[dict[str, str], AfterValidator(_check_metadata)] = Field(default_factory=dict)
    display_name: Text | None = Field(default=None, min_length=1)
    owner: SearchOwner = Field(default_factory=SearchOwner)
    statuses: list[SessionStatusQuery] | None = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: SessionSearchCursor | None = None


class ClientFinishReason(ResponseModel):
    type: Literal["success", "errored", "interrupted"]


class SessionStatus(ResponseModel):
    """The SDK's SessionActive / ClientSessionFinished (discriminated by ``type``)."""

    type: Literal["active", "client_finished"]
    reason: ClientFinishReason | None = None
    detail: str | None = None


class SessionSummary(ResponseModel):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: SessionStatus | None = None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(ResponseModel):
    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None


# ============================================================================================
# Export and unloading
# ============================================================================================


class SaveWeightsExternalRequest(RequestModel):
    """``POST /api/v1/save_weights_external``: the adapter in a format other tools load (a peft
    folder), optionally age-encrypted, as a ``tinker://<run>/external_weights/<name>`` checkpoint."""

    model_id: str
    path: CheckpointName
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = Field(default=None, max_length=10)
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(ResponseModel):
    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


class UnloadModelRequest(RequestModel):
    """``POST /api/v1/unload_model``: free a model's weights; its checkpoints stay."""

    model_id: str
    type: Literal["unload_model"] = "unload_model"


class UnloadModelResponse(ResponseModel):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


class CheckpointArchiveUrlResponse(ResponseModel):
    """``GET .../checkpoints/{checkpoint_id}/archive`` (SDKs before 0.38): a tar of the folder."""

    url: str
    expires: datetime
