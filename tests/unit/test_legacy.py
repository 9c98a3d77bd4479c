"""schemas.legacy: old SDKs' JSON forward_backward / forward bodies decode to the very call the
protobuf decoder produces, and our protobuf results transcode to the JSON the old SDKs validate.
The old SDKs' own request serialization and result parsing run in a subprocess per version
(each imports its own `tinker` from .venv-sdk/overlay/VERSION, made by `make install`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from schemas import legacy
from schemas.wire import (
    ForwardBackwardCall,
    SampledSequenceOut,
    TopkOut,
    WireError,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)

OLD_SDKS = ["0.16.1", "0.24.1"]
OVERLAYS = Path(__file__).resolve().parents[2] / ".venv-sdk" / "overlay"


def assert_same_call(a: ForwardBackwardCall, b: ForwardBackwardCall) -> None:
    assert (a.model_id, a.seq_id, a.loss_fn, a.loss_fn_config, a.forward_only) == (
        b.model_id, b.seq_id, b.loss_fn, b.loss_fn_config, b.forward_only
    )
    assert len(a.data) == len(b.data)
    for x, y in zip(a.data, b.data):
        assert x.tokens.dtype == y.tokens.dtype and np.array_equal(x.tokens, y.tokens)
        assert x.loss_fn_inputs.keys() == y.loss_fn_inputs.keys()
        for name in x.loss_fn_inputs:
            u, v = x.loss_fn_inputs[name], y.loss_fn_inputs[name]
            assert (u.dtype, u.shape) == (v.dtype, v.shape) and np.array_equal(u, v), name


def json_datum(tokens, inputs, *, typed: bool) -> dict:
    chunk = {"tokens": tokens, "type": "encoded_text"} if typed else {"tokens": tokens}
    return {"model_input": {"chunks": [chunk]}, "loss_fn_inputs": inputs}


# ----- requests --------------------------------------------------------------------------------


def test_json_request_decodes_to_the_protobuf_call() -> None:
    data = [
        types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 0.5, 0.0]}),
        types.Datum(model_input=types.ModelInput.from_ints([7, 8]),
                    loss_fn_inputs={"target_tokens": [8, 9], "weights": np.array([[0, 1.5], [0, 0]], np.float32)}),
    ]
    proto = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy", loss_fn_config={"beta": 0.5}),
        model_id="sess-1:train:0", seq_id=7,
    ))
    expected = decode_forward_backward_request(proto.SerializeToString())
    inputs = [
        {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]},
         "weights": {"data": [1.0, 0.5, 0.0], "dtype": "float32"}},  # shape absent: 1-D
        {"target_tokens": {"data": [8, 9], "dtype": "int64", "shape": [2], "sparse_crow_indices": None},
         "weights": {"data": [1.5], "dtype": "float32", "shape": [2, 2],  # CSR, as 0.24 sends 2-D tensors
                     "sparse_crow_indices": [0, 1, 1], "sparse_col_indices": [1]}},
    ]
    for typed in (False, True):  # 0.16.1 leaves chunk "type" out, 0.24.1 sends it
        body = {
            "forward_backward_input": {
                "data": [json_datum([1, 2, 3], inputs[0], typed=typed), json_datum([7, 8], inputs[1], typed=typed)],
                "loss_fn": "cross_entropy", "loss_fn_config": {"beta": 0.5}, "future_field": 1,
            },
            "model_id": "sess-1:train:0", "seq_id": 7, "type": "forward_backward",
        }
        assert_same_call(legacy.decode_forward_backward_json(json.dumps(body).encode(), forward_only=False), expected)
        forward = {"forward_input": body["forward_backward_input"], "model_id": "sess-1:train:0", "seq_id": 7}
        call = legacy.decode_forward_backward_json(forward, forward_only=True)
        assert call.forward_only and call.data[1].loss_fn_inputs["weights"].tolist() == [[0, 1.5], [0, 0]]


def test_nulls_are_absent() -> None:
    body = {"forward_backward_input": {"data": [json_datum([5], {}, typed=False)], "loss_fn": "cross_entropy",
                                       "loss_fn_config": None},
            "model_id": "m", "seq_id": None}
    call = legacy.decode_forward_backward_json(body, forward_only=False)
    assert (call.seq_id, call.loss_fn_config, call.data[0].loss_fn_inputs) == (0, {}, {})


@pytest.mark.parametrize("body,field,needle", [
    (b"\xff", "body", "not valid JSON"),
    (b"[1, 2]", "body", "valid dictionary"),
    ({"model_id": "m"}, "forward_backward_input", "Field required"),
    ({"forward_backward_input": {"data": [json_datum([1, "x"], {}, typed=False)], "loss_fn": "l"}, "model_id": "m"},
     "data[0].model_input[0].encoded_text.tokens[1]", "valid integer"),
    ({"forward_backward_input": {"data": [json_datum([1], {"w": {"data": [1.0], "dtype": "bf16"}}, typed=False)],
                                 "loss_fn": "l"}, "model_id": "m"},
     "data[0].loss_fn_inputs.w.dtype", "'int64' or 'float32'"),
    ({"forward_backward_input": {"data": [json_datum([1], {"w": {"data": [2**40], "dtype": "int64"}}, typed=False)],
                                 "loss_fn": "l"}, "model_id": "m", "seq_id": 2**40}, "seq_id", "int32"),
    ({"forward_backward_input": {"data": [json_datum([2**31], {}, typed=False)], "loss_fn": "l"}, "model_id": "m"},
     "data[0].model_input[0].tokens", "int32 range"),
    ({"forward_backward_input": {"data": [json_datum([1], {"t": {"data": [2**63], "dtype": "int64"}}, typed=False)],
                                 "loss_fn": "l"}, "model_id": "m"}, "data[0].loss_fn_inputs.t.data", "int64"),
    ({"forward_backward_input": {"data": [json_datum([1], {"t": {"data": [1, 2], "dtype": "float32", "shape": [2, 2],
                                                                "sparse_crow_indices": [0, 1, 2]}}, typed=False)],
                                 "loss_fn": "l"}, "model_id": "m"}, "data[0].loss_fn_inputs.t", "both"),
    ({"forward_backward_input": {"data": [json_datum([1], {"t": {"data": [1, 2], "dtype": "float32", "shape": [2, 2],
                                                                "sparse_crow_indices": [0, 2, 1],
                                                                "sparse_col_indices": [0, 1]}}, typed=False)],
                                 "loss_fn": "l"}, "model_id": "m"},
     "data[0].loss_fn_inputs.t.sparse_csr.crow_indices", "non-decreasing"),
    ({"forward_backward_input": {"data": [{"model_input": {"chunks": [
        {"type": "image_asset_pointer", "format": "png", "location": "s3://x"}]}}], "loss_fn": "l"}, "model_id": "m"},
     "data[0].model_input[0]", "text-only"),
    ({"forward_backward_input": {"data": [{"model_input": {"chunks": [
        {"type": "image", "format": "png", "data": "aGk="}]}}], "loss_fn": "l"}, "model_id": "m"},
     "data[0].model_input[0]", "text-only"),
])
def test_bad_json_names_the_field(body, field: str, needle: str) -> None:
    with pytest.raises(WireError) as err:
        legacy.decode_forward_backward_json(body, forward_only=False)
    assert err.value.field == field and needle in err.value.message, (err.value.field, err.value.message)


def test_model_and_seq_of() -> None:
    assert legacy.model_and_seq_of(b'{"model_id": "m", "seq_id": 3}') == ("m", 3)
    assert legacy.model_and_seq_of(b"nope") == (None, None)
    assert legacy.model_and_seq_of(b"[1]") == (None, None)


# ----- results ---------------------------------------------------------------------------------

OUTPUTS = [
    {"logprobs": np.array([-1.0, -2.5, float("-inf")], np.float32), "ids": np.array([[1, 2], [3, 4]])},
    {"logprobs": np.array([-0.5], np.float32), "ids": np.array([[5, 6]])},
    {"logprobs": np.array([-3.0, float("nan")], np.float32), "ids": np.array([[7, 8], [9, 10], [11, 12]])},
]
METRICS = {"loss:sum": 12.5, "tokens:sum": 6.0}


def fb_json() -> dict:
    return json.loads(legacy.result_to_json("forward_backward", encode_forward_backward_output(OUTPUTS, METRICS)))


def sample_json() -> dict:
    topk = TopkOut(token_ids=np.array([[0, 0], [4, 9], [7, 0]]),
                   logprobs=np.array([[legacy.MASK_LOGPROB] * 2, [-0.1, -2.0], [-0.3, legacy.MASK_LOGPROB]]))
    raw = encode_sample_response(
        [SampledSequenceOut(tokens=[3, 1], logprobs=[-0.25, -1.5], stop_reason="stop"),
         SampledSequenceOut(tokens=[8], logprobs=None, stop_reason="length")],
        prompt_logprobs=[float("nan"), -1.25, -0.75],
        topk_prompt_logprobs=topk,
        prompt_cache_hit_tokens=2,
    )
    return json.loads(legacy.result_to_json("sample", raw))


def test_forward_backward_output_json() -> None:
    out = fb_json()
    assert out["loss_fn_output_type"] == "ArrayRecord" and out["metrics"] == METRICS
    assert len(out["loss_fn_outputs"]) == len(OUTPUTS)
    for got, want in zip(out["loss_fn_outputs"], OUTPUTS):
        assert set(got) == set(want)
        for name, arr in want.items():
            assert set(got[name]) == {"data", "dtype", "shape"}  # 0.16.1's TensorData forbids more
            assert got[name]["shape"] == list(arr.shape)
            assert got[name]["dtype"] == ("float32" if arr.dtype.kind == "f" else "int64")
            np.testing.assert_array_equal(np.array(got[name]["data"], dtype=arr.dtype).reshape(arr.shape), arr)


def test_sample_response_json() -> None:
    out = sample_json()
    assert out["sequences"] == [{"stop_reason": "stop", "tokens": [3, 1], "logprobs": [-0.25, -1.5]},
                                {"stop_reason": "length", "tokens": [8]}]
    assert out["prompt_logprobs"] == [None, -1.25, -0.75]
    assert out["topk_prompt_logprobs"] == [None, [[4, pytest.approx(-0.1)], [9, -2.0]], [[7, pytest.approx(-0.3)]]]


def test_json_never_carries_nan_where_the_sdk_expects_null() -> None:
    raw = encode_sample_response([SampledSequenceOut(tokens=[1], logprobs=[-1.0], stop_reason="stop")],
                                 prompt_logprobs=[float("nan"), float("nan")])
    text = legacy.result_to_json("sample", raw).decode()
    assert "NaN" not in text and json.loads(text)["prompt_logprobs"] == [None, None]
    # Tensors keep non-finite values as Python's json writes them (the SDKs read them with json.loads).
    assert math.isinf(fb_json()["loss_fn_outputs"][0]["logprobs"]["data"][2])
    assert legacy.result_to_json("optim_step", b"{}") is None


# ----- the old SDKs' own code ------------------------------------------------------------------

OLD_SDK_SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import torch
import tinker
from tinker import types
from tinker._compat import model_dump

payload = json.load(sys.stdin)
new = tuple(int(p) for p in tinker.__version__.split(".")[:2]) >= (0, 24)
if new:
    from tinker.lib._pydantic_conv import deserialize_json_response, to_pydantic_request

def dump(request):  # as the SDK's resources/training.py does
    if new:
        return model_dump(to_pydantic_request(request), exclude_unset=False, exclude_none=True, mode="json")
    return model_dump(request, exclude_unset=True, mode="json")

def parse(body, cls):  # as the SDK's api_future_impl.py does for a JSON answer
    return deserialize_json_response(body, cls) if new else cls.model_validate(body)

weights = torch.zeros(6, 4)
weights[1, 2], weights[4, 0] = 1.5, 2.0
data = [
    types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": np.array([1, 0.5, 0], np.float32)}),
    types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]),
                                                     types.EncodedTextChunk(tokens=[7])]),
                loss_fn_inputs={"target_tokens": torch.tensor([6, 7, 8]), "weights": weights}),
]
fb = types.ForwardBackwardRequest(
    forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy", loss_fn_config=None),
    model_id="sess-1:train:0", seq_id=3)
fwd = types.ForwardRequest(
    forward_input=types.ForwardBackwardInput(data=data, loss_fn="importance_sampling", loss_fn_config={"clip": 0.2}),
    model_id="sess-1:train:0", seq_id=4)

out = parse(payload["fb"], types.ForwardBackwardOutput)
sample = parse(payload["sample"], types.SampleResponse)
print(json.dumps({
    "version": tinker.__version__,
    "forward_backward": dump(fb),
    "forward": dump(fwd),
    "fb": {"type": out.loss_fn_output_type, "metrics": out.metrics,
           "outputs": [{k: {"data": v.to_numpy().reshape(-1).tolist(), "shape": list(v.to_numpy().shape),
                            "dtype": str(v.to_numpy().dtype)} for k, v in o.items()} for o in out.loss_fn_outputs]},
    "sample": {"sequences": [[s.stop_reason, list(s.tokens), s.logprobs] for s in sample.sequences],
               "prompt_logprobs": sample.prompt_logprobs,
               "topk_prompt_logprobs": sample.topk_prompt_logprobs},
}))
'''


@pytest.fixture(scope="module", params=OLD_SDKS)
def old_sdk(request: pytest.FixtureRequest) -> dict:
    overlay = OVERLAYS / request.param
    assert (overlay / "tinker").is_dir(), f"no tinker {request.param} overlay at {overlay}: run `make install`"
    payload = json.dumps({"fb": fb_json(), "sample": sample_json()})
    done = subprocess.run([sys.executable, "-c", OLD_SDK_SCRIPT, str(overlay)], input=payload, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["version"] == request.param
    return result


def test_old_sdk_bodies_decode(old_sdk: dict) -> None:
    fb = legacy.decode_forward_backward_json(old_sdk["forward_backward"], forward_only=False)
    fwd = legacy.decode_forward_backward_json(old_sdk["forward"], forward_only=True)
    assert (fb.seq_id, fb.loss_fn, fb.loss_fn_config, fb.forward_only) == (3, "cross_entropy", {}, False)
    assert (fwd.seq_id, fwd.loss_fn, fwd.loss_fn_config, fwd.forward_only) == (4, "importance_sampling", {"clip": 0.2}, True)
    for call in (fb, fwd):
        first, second = call.data
        assert first.tokens.tolist() == [1, 2, 3] and second.tokens.tolist() == [5, 6, 7]
        assert first.loss_fn_inputs["target_tokens"].dtype == np.int64
        assert first.loss_fn_inputs["weights"].tolist() == [1, 0.5, 0]
        assert second.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8]
        dense = np.zeros((6, 4), np.float32)
        dense[1, 2], dense[4, 0] = 1.5, 2.0
        assert second.loss_fn_inputs["weights"].dtype == np.float32
        np.testing.assert_array_equal(second.loss_fn_inputs["weights"], dense)
    if old_sdk["version"] == "0.24.1":  # it sends chunk types and 2-D weights as CSR
        weights = old_sdk["forward_backward"]["forward_backward_input"]["data"][1]["loss_fn_inputs"]["weights"]
        assert weights["sparse_crow_indices"] and "type" in old_sdk["forward"]["forward_input"]["data"][0]["model_input"]["chunks"][0]


def test_old_sdk_reads_the_json_results(old_sdk: dict) -> None:
    fb = old_sdk["fb"]
    assert fb["type"] == "ArrayRecord" and fb["metrics"] == METRICS
    for got, want in zip(fb["outputs"], OUTPUTS, strict=True):
        for name, arr in want.items():
            assert got[name]["shape"] == list(arr.shape) and got[name]["dtype"] == str(arr.dtype.newbyteorder("="))
            np.testing.assert_array_equal(np.array(got[name]["data"], dtype=arr.dtype).reshape(arr.shape), arr)
    sample = old_sdk["sample"]
    assert sample["sequences"] == [["stop", [3, 1], [-0.25, -1.5]], ["length", [8], None]]
    assert sample["prompt_logprobs"] == [None, -1.25, -0.75]
    assert sample["topk_prompt_logprobs"] == [None, [[4, pytest.approx(-0.1)], [9, -2.0]], [[7, pytest.approx(-0.3)]]]


@pytest.mark.parametrize("accept,proto", [
    (None, True), ("*/*", True), ("application/x-protobuf", True),  # curl, httpx, SDK 0.25+
    ("application/x-protobuf, application/json", True),  # SDK 0.18 .. 0.24
    ("application/json", False),  # SDK 0.16
    ("application/json; q=1, text/plain", False), ("application/*", True),
])
def test_retrieve_future_answers_json_only_to_clients_that_cannot_read_protobuf(accept, proto: bool) -> None:
    from gateway.routes.futures import accepts_protobuf

    assert accepts_protobuf(accept) is proto
