"""schemas.tinker JSON models against the tinker 0.38.0 SDK's own request/response types."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest
from tinker import types
from tinker._compat import model_dump as sdk_model_dump
from tinker.types._pydantic_types.tensor_data import TensorData as SdkTensorDataModel
from tinker.types.generic_event import GenericEvent
from tinker.types.request_error_category import RequestErrorCategory
from tinker.types.try_again_response import TryAgainResponse as SdkTryAgainResponse

from schemas import tinker as s

NOW = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=timezone.utc)


def sdk_body(request: pydantic.BaseModel) -> dict[str, Any]:
    """Exactly what the SDK puts on the wire for a JSON request (resources/*.py)."""
    body = sdk_model_dump(request, exclude_unset=False, exclude_none=True, mode="json")
    return json.loads(json.dumps(body))


def wire(response: pydantic.BaseModel) -> dict[str, Any]:
    """What the server sends for a response model."""
    return json.loads(json.dumps(response.model_dump(mode="json", exclude_none=True)))


# ---------------------------------------------------------------------------------------------
# Requests: SDK-built bodies parse with our models (and dump back identically)
# ---------------------------------------------------------------------------------------------


def _telemetry_request() -> types.TelemetrySendRequest:
    common = {"event_session_index": 0, "timestamp": NOW, "severity": "INFO"}
    return types.TelemetrySendRequest(
        events=[
            types.SessionStartEvent(event="SESSION_START", event_id="e1", **common),
            types.SessionEndEvent(event="SESSION_END", event_id="e2", duration="0:00:01", **common),
            GenericEvent(event="GENERIC_EVENT", event_id="e3", event_name="x",
                               event_data={"k": [1, "v"]}, **common),
            types.UnhandledExceptionEvent(event="UNHANDLED_EXCEPTION", event_id="e4",
                                          error_type="ValueError", error_message="boom",
                                          traceback="Traceback...", **common),
        ],
        platform="Linux",
        sdk_version="0.38.0",
        session_id="sess-1",
        process_uuid="0f5c",
    )


def _sample_request(**overrides: Any) -> types.SampleRequest:
    fields: dict[str, Any] = {
        "num_samples": 2,
        "prompt": types.ModelInput.from_ints([1, 2, 3]),
        "sampling_params": types.SamplingParams(max_tokens=3, stop=["\n"]),
        "sampling_session_id": "sess-1:sample:0",
        "seq_id": 0,
        "prompt_logprobs": False,
        "record_stability_info": False,
    }
    fields.update(overrides)
    return types.SampleRequest(**fields)


SDK_REQUESTS: dict[str, tuple[pydantic.BaseModel, type[pydantic.BaseModel]]] = {
    "client_config": (types.ClientConfigRequest(sdk_version="0.38.0"), s.ClientConfigRequest),
    "create_session": (
        types.CreateSessionRequest(tags=["a"], user_metadata={}, sdk_version="0.38.0"),
        s.CreateSessionRequest,
    ),
    "create_session_full": (
        types.CreateSessionRequest(tags=[], user_metadata={"team": "x", "n": 1}, sdk_version="0.38.0",
                                   project_id="p", display_name="my run"),
        s.CreateSessionRequest,
    ),
    "heartbeat": (types.SessionHeartbeatRequest(session_id="sess-1"), s.SessionHeartbeatRequest),
    "telemetry": (_telemetry_request(), s.TelemetrySendRequest),
    "create_model": (
        types.CreateModelRequest(session_id="sess-1", model_seq_id=0, base_model="Qwen/Qwen3-0.6B",
                                 lora_config=types.LoraConfig(rank=8)),
        s.CreateModelRequest,
    ),
    "create_model_dimuon": (
        types.CreateModelRequest(session_id="sess-1", model_seq_id=3, base_model="b",
                                 user_metadata={"k": "v"},
                                 lora_config=types.LoraConfig(rank=1, seed=2**70, train_mlp=False),
                                 optimizer_config=types.DimuonOptimizerConfig()),
        s.CreateModelRequest,
    ),
    "get_info": (types.GetInfoRequest(model_id="sess-1:train:0"), s.GetInfoRequest),
    "optim_step_adam": (
        types.OptimStepRequest(model_id="m", seq_id=2, optim_params=types.AdamParams(learning_rate=3e-4)),
        s.OptimStepRequest,
    ),
    "optim_step_dimuon": (
        types.OptimStepRequest(model_id="m", seq_id=2, optim_params=types.DimuonParams(learning_rate=0.02)),
        s.OptimStepRequest,
    ),
    "save_weights": (
        types.SaveWeightsRequest(model_id="m", path="ckpt1", seq_id=4), s.SaveWeightsRequest,
    ),
    "save_weights_full": (
        types.SaveWeightsRequest(model_id="m", path="step-0010", seq_id=4, ttl_seconds=3600,
                                 overwrite=True, user_metadata={"k": "v"}),
        s.SaveWeightsRequest,
    ),
    "save_for_sampler_named": (
        types.SaveWeightsForSamplerRequest(model_id="m", path="samp1", seq_id=5),
        s.SaveWeightsForSamplerRequest,
    ),
    "save_for_sampler_ephemeral": (
        types.SaveWeightsForSamplerRequest(model_id="m", sampling_session_seq_id=1, kind="inflight", seq_id=6),
        s.SaveWeightsForSamplerRequest,
    ),
    "load_weights_legacy": (
        types.LoadWeightsRequest(model_id="m", seq_id=7, path="tinker://m/weights/ckpt1", optimizer=True),
        s.LoadWeightsRequest,
    ),
    "load_weights_create": (
        types.LoadWeightsRequest(session_id="sess-1", model_seq_id=1, path="tinker://m/weights/ckpt1",
                                 optimizer=False, base_model="b", user_metadata={"k": "v"},
                                 optimizer_config=types.AdamOptimizerConfig(),
                                 weights_access_token="tok"),
        s.LoadWeightsRequest,
    ),
    "create_sampling_session_path": (
        types.CreateSamplingSessionRequest(session_id="sess-1", sampling_session_seq_id=0,
                                           model_path="tinker://m/sampler_weights/samp1"),
        s.CreateSamplingSessionRequest,
    ),
    "create_sampling_session_base": (
        types.CreateSamplingSessionRequest(session_id="sess-1", sampling_session_seq_id=2, base_model="b"),
        s.CreateSamplingSessionRequest,
    ),
    "sample": (_sample_request(), s.SampleRequest),
    "sample_no_stop": (
        _sample_request(sampling_params=types.SamplingParams(stop=[], seed=2**64 + 5, temperature=0.0)),
        s.SampleRequest,
    ),
    "sample_stop_tokens": (
        _sample_request(sampling_params=types.SamplingParams(stop=[151643, 2], top_k=50, top_p=0.9)),
        s.SampleRequest,
    ),
    "sample_stop_str": (_sample_request(sampling_params=types.SamplingParams(stop="END")), s.SampleRequest),
    "compute_logprobs": (
        _sample_request(num_samples=1, sampling_params=types.SamplingParams(max_tokens=1),
                        prompt_logprobs=True, prompt_logprobs_last_n=2, topk_prompt_logprobs=5,
                        topk_sample_logprobs=1, prompt_alt_tokens_k=3),
        s.SampleRequest,
    ),
    "sample_target_logprobs": (
        _sample_request(target_prompt_logprobs=SdkTensorDataModel(
            data=[5, 7], dtype="int64", shape=[2, 2], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[0, 1])),
        s.SampleRequest,
    ),
    "sample_multimodal_prompt": (
        _sample_request(prompt=types.ModelInput(chunks=[
            types.EncodedTextChunk(tokens=[1]),
            types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
            types.ImageAssetPointerChunk(format="jpeg", location="s3://x.jpg"),
            types.DmelChunk(dmel=b"\x00\x01"),
        ])),
        s.SampleRequest,
    ),
    "retrieve_future": (
        types.FutureRetrieveRequest(request_id="req-1", allow_metadata_only=True), s.FutureRetrieveRequest,
    ),
}


@pytest.mark.parametrize("sdk_request,model", SDK_REQUESTS.values(), ids=SDK_REQUESTS.keys())
def test_sdk_request_parses_and_dumps_back_identically(sdk_request, model) -> None:
    body = sdk_body(sdk_request)
    parsed = model.model_validate(body)
    assert wire(parsed) == body


@pytest.mark.parametrize("sdk_request,model", SDK_REQUESTS.values(), ids=SDK_REQUESTS.keys())
def test_unknown_request_fields_are_ignored(sdk_request, model) -> None:
    body = sdk_body(sdk_request)
    parsed = model.model_validate({**body, "field_from_a_newer_sdk": {"x": 1}})
    assert wire(parsed) == body


# Bodies the SDK builds as plain dicts rather than request models.
@pytest.mark.parametrize(
    "body,model",
    [
        ({"sdk_version": "0.38.0"}, s.ClientDynamicConfigRequest),
        ({"reason": {"type": "success"}, "detail": None}, s.SessionFinishRequest),
        ({"reason": {"type": "errored"}, "detail": "oom"}, s.SessionFinishRequest),
        ({"tinker_path": "tinker://m/weights/c"}, s.WeightsInfoRequest),
    ],
)
def test_dict_bodies_parse(body: dict[str, Any], model) -> None:
    assert wire(model.model_validate(body)) == {k: v for k, v in body.items() if v is not None}


def test_request_specifics() -> None:
    sample = s.SampleRequest.model_validate(sdk_body(SDK_REQUESTS["sample_no_stop"][0]))
    assert sample.sampling_params.stop == []  # [] (no stop at all) is not None (stop at EOS)
    assert sample.sampling_params.seed == 2**64 + 5
    default = s.SampleRequest.model_validate(sdk_body(_sample_request(sampling_params=types.SamplingParams())))
    assert default.sampling_params.stop is None
    assert s.SampleRequest.model_validate(sdk_body(SDK_REQUESTS["sample_stop_tokens"][0])).sampling_params.stop == [151643, 2]
    assert s.SampleRequest.model_validate(sdk_body(SDK_REQUESTS["sample_stop_str"][0])).sampling_params.stop == "END"

    chunks = s.SampleRequest.model_validate(sdk_body(SDK_REQUESTS["sample_multimodal_prompt"][0])).prompt.chunks
    assert [type(c) for c in chunks] == [s.EncodedTextChunk, s.ImageChunk, s.ImageAssetPointerChunk, s.DmelChunk]
    untyped = s.ModelInput.model_validate({"chunks": [{"tokens": [4, 5]}]})
    assert untyped.chunks == [s.EncodedTextChunk(tokens=[4, 5])]

    optim = s.OptimStepRequest.model_validate(sdk_body(SDK_REQUESTS["optim_step_adam"][0]))
    assert optim.adam_params == s.AdamParams(learning_rate=3e-4)
    assert s.OptimStepRequest.model_validate(sdk_body(SDK_REQUESTS["optim_step_dimuon"][0])).optimizer_params == {
        "type": "dimuon", "learning_rate": 0.02, "grad_clip_norm": 0.0, "beta1": 0.9,
    }
    assert s.AdamParams() == s.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12,
                                          weight_decay=0.0, grad_clip_norm=0.0)

    created = s.CreateModelRequest.model_validate(sdk_body(SDK_REQUESTS["create_model_dimuon"][0]))
    assert created.optimizer_config.type == "dimuon"
    assert created.optimizer_config.model_extra == {"version": 1}
    assert s.CreateModelRequest(session_id="s", model_seq_id=0, base_model="b").optimizer_config.type == "adamw"

    legacy = s.LoadWeightsRequest.model_validate(sdk_body(SDK_REQUESTS["load_weights_legacy"][0]))
    create = s.LoadWeightsRequest.model_validate(sdk_body(SDK_REQUESTS["load_weights_create"][0]))
    assert (legacy.creates_model, create.creates_model) == (False, True)


# ---------------------------------------------------------------------------------------------
# Requests: validation rules
# ---------------------------------------------------------------------------------------------

_SAMPLE = sdk_body(_sample_request())
_SAVE = {"model_id": "m", "path": "ckpt", "seq_id": 1, "type": "save_weights"}
_LOAD = {"path": "tinker://m/weights/c", "optimizer": False}


def _with_params(**params: Any) -> dict[str, Any]:
    return {**_SAMPLE, "sampling_params": {**_SAMPLE["sampling_params"], **params}}


def _adam(**params: Any) -> dict[str, Any]:
    return {"model_id": "m", "seq_id": 1, "adam_params": params}


INVALID: dict[str, tuple[type[pydantic.BaseModel], dict[str, Any], tuple, str]] = {
    "lora_rank_0": (s.CreateModelRequest, {"session_id": "s", "model_seq_id": 0, "base_model": "b",
                                           "lora_config": {"rank": 0}}, ("lora_config", "rank"), "1"),
    "name_empty": (s.SaveWeightsRequest, {**_SAVE, "path": ""}, ("path",), "empty"),
    "name_slash": (s.SaveWeightsRequest, {**_SAVE, "path": "a/b"}, ("path",), "tinker:// path"),
    "name_backslash": (s.SaveWeightsRequest, {**_SAVE, "path": "a\\b"}, ("path",), "contain '\\\\'"),
    "name_dot": (s.SaveWeightsRequest, {**_SAVE, "path": "."}, ("path",), "'.'"),
    "name_dotdot": (s.SaveWeightsForSamplerRequest, {"model_id": "m", "path": ".."}, ("path",), "'..'"),
    "name_long": (s.SaveWeightsRequest, {**_SAVE, "path": "x" * 129}, ("path",), "128"),
    "name_newline": (s.SaveWeightsRequest, {**_SAVE, "path": "a\nb"}, ("path",), "control"),
    "name_nul": (s.SaveWeightsForSamplerRequest, {"model_id": "m", "path": "a\x00"}, ("path",), "control"),
    "sampler_both_modes": (s.SaveWeightsForSamplerRequest,
                           {"model_id": "m", "path": "p", "sampling_session_seq_id": 1}, (), "exactly one"),
    "sampler_no_mode": (s.SaveWeightsForSamplerRequest, {"model_id": "m", "kind": "snapshot"}, (), "exactly one"),
    "load_no_mode": (s.LoadWeightsRequest, _LOAD, (), "names no model"),
    "load_half_legacy": (s.LoadWeightsRequest, {**_LOAD, "model_id": "m"}, (), "missing seq_id"),
    "load_half_create": (s.LoadWeightsRequest, {**_LOAD, "session_id": "s"}, (), "missing model_seq_id"),
    "load_mixed": (s.LoadWeightsRequest, {**_LOAD, "model_id": "m", "seq_id": 1, "session_id": "s",
                                          "model_seq_id": 0}, (), "mixes"),
    "num_samples_0": (s.SampleRequest, {**_SAMPLE, "num_samples": 0}, ("num_samples",), "1"),
    "max_tokens_negative": (s.SampleRequest, _with_params(max_tokens=-1), ("sampling_params", "max_tokens"), "0"),
    "temperature_negative": (s.SampleRequest, _with_params(temperature=-0.1), ("sampling_params", "temperature"), "0"),
    "top_p_0": (s.SampleRequest, _with_params(top_p=0.0), ("sampling_params", "top_p"), "0"),
    "top_p_above_1": (s.SampleRequest, _with_params(top_p=1.01), ("sampling_params", "top_p"), "1"),
    "top_k_0": (s.SampleRequest, _with_params(top_k=0), ("sampling_params", "top_k"), "-1"),
    "top_k_minus_2": (s.SampleRequest, _with_params(top_k=-2), ("sampling_params", "top_k"), "-1"),
    "stop_mixed": (s.SampleRequest, _with_params(stop=["a", 1]), ("sampling_params", "stop"), ""),
    "chunk_unknown_type": (s.SampleRequest, {**_SAMPLE, "prompt": {"chunks": [{"type": "video"}]}},
                           ("prompt", "chunks", 0), "video"),
    "optim_no_params": (s.OptimStepRequest, {"model_id": "m", "seq_id": 1}, (), "exactly one"),
    "adam_lr_negative": (s.OptimStepRequest, _adam(learning_rate=-1e-4), ("adam_params", "learning_rate"), "0"),
    "adam_lr_inf": (s.OptimStepRequest, _adam(learning_rate=float("inf")), ("adam_params", "learning_rate"), "finite"),
    "adam_beta1_1": (s.OptimStepRequest, _adam(beta1=1.0), ("adam_params", "beta1"), "1"),
    "adam_beta2_negative": (s.OptimStepRequest, _adam(beta2=-0.1), ("adam_params", "beta2"), "0"),
    "adam_eps_0": (s.OptimStepRequest, _adam(eps=0.0), ("adam_params", "eps"), "0"),
    "adam_wd_negative": (s.OptimStepRequest, _adam(weight_decay=-0.01), ("adam_params", "weight_decay"), "0"),
    "adam_clip_negative": (s.OptimStepRequest, _adam(grad_clip_norm=-1.0), ("adam_params", "grad_clip_norm"), "0"),
    "sampling_session_no_target": (s.CreateSamplingSessionRequest,
                                   {"session_id": "s", "sampling_session_seq_id": 0}, (), "base_model or model_path"),
    "finish_bad_reason": (s.SessionFinishRequest, {"reason": {"type": "done"}}, ("reason", "type"), ""),
    "model_seq_id_negative": (s.CreateModelRequest, {"session_id": "s", "model_seq_id": -1, "base_model": "b"},
                              ("model_seq_id",), "0"),
}


@pytest.mark.parametrize("model,body,loc,text", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_is_rejected_with_its_field(model, body, loc: tuple, text: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(body)
    errors = info.value.errors()
    assert any(tuple(e["loc"][: len(loc)]) == loc for e in errors), errors
    assert text in str(info.value)


def test_checkpoint_name_edge_cases_that_are_fine() -> None:
    for name in ("x" * 128, "step 10", "ckpt.v2", "...", "名前", "a..b"):
        assert s.SaveWeightsRequest.model_validate({**_SAVE, "path": name}).path == name


def test_slash_message_explains_why() -> None:
    with pytest.raises(pydantic.ValidationError, match="last segment of a tinker:// path"):
        s.SaveWeightsRequest.model_validate({**_SAVE, "path": "a/b"})


# ---------------------------------------------------------------------------------------------
# Responses: our dumps validate with the SDK's types
# ---------------------------------------------------------------------------------------------

_CKPT = s.Checkpoint(
    checkpoint_id="weights/ckpt1",
    checkpoint_type="training",
    time=NOW,
    tinker_path="tinker://sess-1:train:0/weights/ckpt1",
    size_bytes=1234,
    user_metadata={"k": "v"},
    expires_at=NOW + timedelta(days=1),
)
_SAMPLER_CKPT = s.Checkpoint(
    checkpoint_id="sampler_weights/s1", checkpoint_type="sampler", time=NOW,
    tinker_path="tinker://sess-1:train:0/sampler_weights/s1",
)
_RUN = s.TrainingRun(
    training_run_id="sess-1:train:0", base_model="b", model_owner="alice", is_lora=True, lora_rank=8,
    last_request_time=NOW, last_checkpoint=_CKPT, last_sampler_checkpoint=_SAMPLER_CKPT,
)
_CURSOR = s.Cursor(offset=0, limit=20, total_count=1)

RESPONSES: dict[str, tuple[pydantic.BaseModel, type]] = {
    "client_config": (s.ClientConfigResponse(), types.ClientConfigResponse),
    "client_config_knobs": (s.ClientConfigResponse(proto_compress_fwdbwd=True, fwdbwd_max_chunk_len=64),
                            types.ClientConfigResponse),
    "dynamic_config": (s.ClientDynamicConfigResponse(), types.ClientDynamicConfigResponse),
    "create_session": (s.CreateSessionResponse(session_id="sess-1", warning_message="w"), types.CreateSessionResponse),
    "heartbeat": (s.HeartbeatResponse(), types.SessionHeartbeatResponse),
    "telemetry": (s.TelemetryResponse(), types.TelemetryResponse),
    "health": (s.HealthResponse(), types.HealthResponse),
    "capabilities": (s.GetServerCapabilitiesResponse(supported_models=[
        s.SupportedModel(model_name="Qwen/Qwen3-0.6B", max_context_length=4096, trainable=True, sampleable=True),
        s.SupportedModel()]), types.GetServerCapabilitiesResponse),
    "future": (s.UntypedAPIFuture(request_id="req-1", model_id="m"), types.UntypedAPIFuture),
    "sample_future": (s.UntypedAPIFuture(request_id="req-2", sample_sequence_ids=["a", "b"]), types.UntypedAPIFuture),
    "try_again": (s.TryAgainResponse(request_id="req-1"), SdkTryAgainResponse),
    "try_again_paused": (s.TryAgainResponse(request_id="req-1", queue_state="paused_capacity",
                                            queue_state_reason="busy"), SdkTryAgainResponse),
    "error": (s.FutureErrorResponse(error="bad datum", category="user"), types.RequestFailedResponse),
    "create_model": (s.CreateModelResponse(model_id="sess-1:train:0"), types.CreateModelResponse),
    "get_info": (s.GetInfoResponse(model_id="sess-1:train:0",
                                   model_data=s.ModelData(arch="qwen3", model_name="b", tokenizer_id="b"),
                                   is_lora=True, lora_rank=8, model_name="b",
                                   optimizer_config=s.OptimizerConfig(type="adamw")), types.GetInfoResponse),
    "get_info_minimal": (s.GetInfoResponse(model_id="m", model_data=s.ModelData()), types.GetInfoResponse),
    "optim_step": (s.OptimStepResponse(metrics={"grad_norm:mean": 0.5}), types.OptimStepResponse),
    "save_weights": (s.SaveWeightsResponse(path="tinker://m/weights/c"), types.SaveWeightsResponse),
    "save_for_sampler_named": (s.SaveWeightsForSamplerResponse(path="tinker://m/sampler_weights/c"),
                               types.SaveWeightsForSamplerResponseInternal),
    "save_for_sampler_ephemeral": (s.SaveWeightsForSamplerResponse(sampling_session_id="sess-1:sample:1"),
                                   types.SaveWeightsForSamplerResponseInternal),
    "load_weights": (s.LoadWeightsResponse(path="tinker://m/weights/c", model_id="m"), types.LoadWeightsResponse),
    "create_sampling_session": (s.CreateSamplingSessionResponse(sampling_session_id="sess-1:sample:0"),
                                types.CreateSamplingSessionResponse),
    "get_sampler": (s.GetSamplerResponse(sampler_id="sess-1:sample:0", base_model="b",
                                         model_path="tinker://m/sampler_weights/c"), types.GetSamplerResponse),
    "checkpoint": (_CKPT, types.Checkpoint),
    "checkpoints": (s.CheckpointsListResponse(checkpoints=[_CKPT, _SAMPLER_CKPT], cursor=_CURSOR),
                    types.CheckpointsListResponse),
    "checkpoints_no_cursor": (s.CheckpointsListResponse(checkpoints=[]), types.CheckpointsListResponse),
    "training_run": (_RUN, types.TrainingRun),
    "training_runs": (s.TrainingRunsResponse(training_runs=[_RUN], cursor=_CURSOR), types.TrainingRunsResponse),
    "weights_info": (s.WeightsInfoResponse(base_model="b", is_lora=True, lora_rank=8, train_unembed=True,
                                           train_mlp=True, train_attn=False), types.WeightsInfoResponse),
}


@pytest.mark.parametrize("ours,sdk_type", RESPONSES.values(), ids=RESPONSES.keys())
def test_response_validates_with_sdk_type(ours: pydantic.BaseModel, sdk_type: type) -> None:
    body = wire(ours)
    parsed = sdk_type.model_validate(body)
    # Everything we sent arrived with the same value (the SDK may add its own defaults).
    sdk_view = json.loads(json.dumps(parsed.model_dump(mode="json", exclude_none=True)))
    for key, value in body.items():
        if key in sdk_type.model_fields:  # e.g. queue_state_reason is read raw, not a field
            assert sdk_view[key] == value, key


def test_response_details_the_sdk_relies_on() -> None:
    config = wire(s.ClientConfigResponse())
    assert config == {
        "pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": False,
        "sample_use_retrieve_futures": False, "custom_loss_server_side": False,
        "sample_join_sampling_session": False, "use_pyqwest_transport": True,
    }
    assert wire(s.ClientDynamicConfigResponse()) == {}
    assert wire(s.TryAgainResponse(request_id="r")) == {"type": "try_again", "request_id": "r", "queue_state": "active"}
    error = types.RequestFailedResponse.model_validate(wire(s.FutureErrorResponse(error="e", category="user")))
    assert error.category is RequestErrorCategory.User
    assert "error" not in wire(s.OptimStepResponse(metrics={}))  # a success must never carry "error"

    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(
        types.Checkpoint.model_validate(wire(_CKPT)).tinker_path
    )
    assert (parsed.checkpoint_type, parsed.checkpoint_id) == ("training", "weights/ckpt1")
    assert types.Checkpoint.model_validate(wire(_CKPT)).time == NOW


def test_responses_reject_typos_in_server_code() -> None:
    with pytest.raises(pydantic.ValidationError):
        s.CreateModelResponse(model_id="m", modle_id="typo")  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        s.FutureErrorResponse(error="e", category="User")  # type: ignore[arg-type]


def test_unknown_nested_fields_are_ignored_too() -> None:
    body = sdk_body(_sample_request())
    body["sampling_params"]["min_p"] = 0.1
    body["prompt"]["chunks"][0]["cache_hint"] = True
    parsed = s.SampleRequest.model_validate(body)
    assert parsed.sampling_params.stop == ["\n"]
    optim = s.OptimStepRequest.model_validate(
        {"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": 0.1, "amsgrad": True}}
    )
    assert optim.adam_params is not None and optim.adam_params.learning_rate == 0.1
