"""schemas.tinker_wire_pb2 / schemas.wire against the tinker 0.38.0 SDK's own proto code."""

from __future__ import annotations

import ast
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from google.protobuf import descriptor_pb2
from tinker import types
from tinker.lib.chunked_fwdbwd_helpers import combine_fwd_bwd_output_results
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from schemas import tinker_wire_pb2 as our_pb
from schemas.tensors import check_sample_options, decode_target_ids
from schemas.tinker import TensorData as JsonTensorData
from schemas.wire import (
    DatumIn,
    ForwardBackwardCall,
    SampledSequenceOut,
    TopkOut,
    WireError,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


# ---------------------------------------------------------------------------------------------
# Descriptor equivalence
# ---------------------------------------------------------------------------------------------


def _file_proto(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(file_descriptor.serialized_pb)
    return proto


def _messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """All messages, nested map-entry types included, keyed by package-relative name."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(msg: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}{msg.name}"
        found[name] = msg
        for nested in msg.nested_type:
            walk(nested, f"{name}.")

    for msg in proto.message_type:
        walk(msg, "")
    return found


def _field_signature(msg: descriptor_pb2.DescriptorProto, package: str) -> dict[str, tuple]:
    signature = {}
    for field in msg.field:
        oneof = msg.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        type_name = field.type_name.removeprefix(f".{package}.")
        signature[field.name] = (
            field.number,
            field.type,
            field.label,
            field.proto3_optional,
            oneof,
            type_name,
        )
    return signature


def test_descriptor_matches_sdk_field_by_field() -> None:
    sdk, ours = _file_proto(sdk_pb.DESCRIPTOR), _file_proto(our_pb.DESCRIPTOR)
    assert (ours.package, ours.name, ours.syntax) == ("twinkle.tinker_wire", "tinker_wire.proto", "proto3")
    sdk_msgs, our_msgs = _messages(sdk), _messages(ours)
    assert sorted(sdk_msgs) == sorted(our_msgs)
    for name, sdk_msg in sdk_msgs.items():
        our_msg = our_msgs[name]
        assert _field_signature(our_msg, ours.package) == _field_signature(sdk_msg, sdk.package), name
        assert our_msg.options.map_entry == sdk_msg.options.map_entry, name
    sdk_enums = {e.name: [(v.name, v.number) for v in e.value] for e in sdk.enum_type}
    our_enums = {e.name: [(v.name, v.number) for v in e.value] for e in ours.enum_type}
    assert our_enums == sdk_enums


def test_generated_module_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    shutil.copy(SCHEMAS_DIR / "tinker_wire.proto", tmp_path)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={tmp_path}",
         f"--python_out={tmp_path}", "tinker_wire.proto"],
        check=True,
    )
    regenerated = (tmp_path / "tinker_wire_pb2.py").read_text()
    assert regenerated == (SCHEMAS_DIR / "tinker_wire_pb2.py").read_text(), (
        "schemas/tinker_wire_pb2.py is stale: run scripts/gen_proto.sh"
    )


@pytest.mark.parametrize("module", ["wire.py", "tinker.py", "tensors.py", "__init__.py"])
def test_schemas_import_nothing_from_other_packages(module: str) -> None:
    tree = ast.parse((SCHEMAS_DIR / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"gateway", "server", "workers", "torch", "tinker"}


# ---------------------------------------------------------------------------------------------
# Requests built by the SDK -> our decoder
# ---------------------------------------------------------------------------------------------


def _csr_tensor() -> types.TensorData:
    # Dense [[0, 0, 5, 0], [0, 0, 0, 0], [7, 0, 0, 1]] as CSR, the form the SDK sends for sparse
    # 2-D target_tokens / weights.
    return types.TensorData(
        data=[5, 7, 1],
        dtype="int64",
        shape=[3, 4],
        sparse_crow_indices=[0, 1, 1, 3],
        sparse_col_indices=[2, 0, 3],
    )


def _sdk_datums() -> list[types.Datum]:
    plain = types.Datum(
        model_input=types.ModelInput.from_ints([101, 7, 2**31 - 1]),
        loss_fn_inputs={"target_tokens": [7, 8, 9], "weights": [1.0, 0.5, -2.25]},
    )
    multi_chunk = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])]
        ),
        loss_fn_inputs={
            "target_tokens": _csr_tensor(),
            "weights": np.array([[1.0, 0.0, 0.5, 0.0]] * 3, dtype=np.float32),
            "advantages": np.array([0.1, -0.2, float("nan")]),  # float64 -> float32 client-side
            "logprobs": np.array([-1.5, -0.25, float("-inf")], dtype=np.float32),
        },
    )
    return [plain, multi_chunk]


def _sdk_body(
    datums: list[types.Datum],
    *,
    loss_fn: str = "ppo",
    loss_fn_config: dict[str, float | str] | None = None,
    forward_only: bool = False,
    seq_id: int = 5,
) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=datums, loss_fn=loss_fn, loss_fn_config=loss_fn_config
        ),
        model_id="sess-1:train:0",
        seq_id=seq_id,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only  # what resources/training.py does
    return msg.SerializeToString()


def _assert_datum_equal(got: DatumIn, sdk_datum: types.Datum) -> None:
    expected_tokens = [t for chunk in sdk_datum.model_input.chunks for t in chunk.tokens]
    assert got.tokens.dtype == np.int64 and got.tokens.ndim == 1
    assert got.tokens.tolist() == expected_tokens
    assert set(got.loss_fn_inputs) == set(sdk_datum.loss_fn_inputs)
    for name, td in sdk_datum.loss_fn_inputs.items():
        expected = td.to_numpy()  # the SDK's own densification for CSR
        arr = got.loss_fn_inputs[name]
        assert arr.dtype == {"float32": np.float32, "int64": np.int64}[td.dtype], name
        assert arr.shape == expected.shape, name
        np.testing.assert_array_equal(arr, expected, err_msg=name)
        assert arr.flags.writeable and arr.flags.c_contiguous


@pytest.mark.parametrize("compress", [False, True], ids=["identity", "zstd"])
def test_decode_sdk_request_exactly(compress: bool) -> None:
    datums = _sdk_datums()
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, "loss_id": "loss-7"}
    body = _sdk_body(datums, loss_fn_config=config, seq_id=42)
    encoding = None
    if compress:
        body, encoding = zstandard.ZstdCompressor().compress(body), "zstd"

    call = decode_forward_backward_request(body, encoding)

    assert isinstance(call, ForwardBackwardCall)
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == (
        "sess-1:train:0", 42, "ppo", False,
    )
    assert call.loss_fn_config == config
    assert type(call.loss_fn_config["clip_low_threshold"]) is float
    assert len(call.data) == len(datums)
    for got, sdk_datum in zip(call.data, datums, strict=True):
        _assert_datum_equal(got, sdk_datum)


def test_decode_forward_only_and_no_config() -> None:
    body = _sdk_body(_sdk_datums()[:1], loss_fn="cross_entropy", forward_only=True)
    call = decode_forward_backward_request(body, "identity")
    assert call.forward_only is True
    assert call.loss_fn == "cross_entropy"
    assert call.loss_fn_config == {}


def test_loss_fn_config_v2_wins_over_legacy_map() -> None:
    msg = our_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="ppo")
    msg.data.add().model_input.add().encoded_text.tokens = np.array([1], "<i4").tobytes()
    msg.loss_fn_config["beta"] = 1.0
    msg.loss_fn_config["legacy_only"] = 2.0
    msg.loss_fn_config_v2["beta"].number = 3.0
    msg.loss_fn_config_v2["mode"].text = "fast"
    call = decode_forward_backward_request(msg.SerializeToString())
    assert call.loss_fn_config == {"beta": 3.0, "legacy_only": 2.0, "mode": "fast"}


def test_decode_accepts_case_insensitive_zstd_and_multiple_frames() -> None:
    body = _sdk_body(_sdk_datums())
    cctx = zstandard.ZstdCompressor()
    split = len(body) // 2
    two_frames = cctx.compress(body[:split]) + cctx.compress(body[split:])
    call = decode_forward_backward_request(two_frames, " ZSTD ")
    assert [d.tokens.tolist() for d in call.data] == [[101, 7, 2**31 - 1], [1, 2, 3]]


# ---------------------------------------------------------------------------------------------
# Bad input -> WireError with the right field
# ---------------------------------------------------------------------------------------------


def _one_datum_request(tokens: bytes = np.array([1, 2], "<i4").tobytes()) -> our_pb.ForwardBackwardRequest:
    msg = our_pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = tokens
    return msg


def _with_input(tensor: our_pb.Tensor) -> bytes:
    msg = _one_datum_request()
    msg.data[0].loss_fn_inputs["weights"].CopyFrom(tensor)
    return msg.SerializeToString()


def _csr(values: list, crow: list[int], col: list[int], shape: list[int], dtype: int = our_pb.DTYPE_INT64) -> our_pb.Tensor:
    np_dtype = "<i8" if dtype == our_pb.DTYPE_INT64 else "<f4"
    return our_pb.Tensor(
        dtype=dtype,
        shape=shape,
        sparse_csr=our_pb.SparseCsr(
            values=np.array(values, np_dtype).tobytes(),
            crow_indices=np.array(crow, "<i8").tobytes(),
            col_indices=np.array(col, "<i8").tobytes(),
        ),
    )


W = "data[0].loss_fn_inputs.weights"

BAD_BODIES = {
    "garbage": (b"\xff\xff\xff\xff garbage", "body"),
    "truncated": (_sdk_body([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                                         loss_fn_inputs={"target_tokens": [1, 2, 3]})])[:-3], "body"),
    "no_model_id": (our_pb.ForwardBackwardRequest(loss_fn="x").SerializeToString(), "model_id"),
    "no_data": (our_pb.ForwardBackwardRequest(model_id="m", loss_fn="x").SerializeToString(), "data"),
    "odd_token_bytes": (_one_datum_request(b"\x01\x00\x00\x00\x02").SerializeToString(),
                        "data[0].model_input[0].encoded_text.tokens"),
    "no_tokens": (_one_datum_request(b"").SerializeToString(), "data[0].model_input"),
    "wrong_dtype": (_with_input(our_pb.Tensor(dtype=our_pb.DTYPE_BFLOAT16, dense=b"\0\0")), f"{W}.dtype"),
    "unknown_dtype": (_with_input(our_pb.Tensor(dtype=99, dense=b"\0\0\0\0")), f"{W}.dtype"),
    "unspecified_dtype": (_with_input(our_pb.Tensor(dense=b"\0\0\0\0")), f"{W}.dtype"),
    "partial_item": (_with_input(our_pb.Tensor(dtype=our_pb.DTYPE_FLOAT32, dense=b"\0" * 6)), f"{W}.dense"),
    "shape_mismatch": (_with_input(our_pb.Tensor(dtype=our_pb.DTYPE_FLOAT32, shape=[3],
                                                 dense=np.zeros(2, "<f4").tobytes())), f"{W}.shape"),
    "negative_dim": (_with_input(our_pb.Tensor(dtype=our_pb.DTYPE_FLOAT32, shape=[-1, -2],
                                               dense=np.zeros(2, "<f4").tobytes())), f"{W}.shape"),
    "huge_empty_shape": (_with_input(our_pb.Tensor(dtype=our_pb.DTYPE_FLOAT32, shape=[0, 2**62],
                                                   dense=b"")), f"{W}.shape"),
    "csr_not_2d": (_with_input(_csr([1], [0, 1], [0], [4])), f"{W}.shape"),
    "csr_crow_len": (_with_input(_csr([1], [0, 1], [0], [2, 2])), f"{W}.sparse_csr.crow_indices"),
    "csr_crow_start": (_with_input(_csr([1], [1, 1, 1], [0], [2, 2])), f"{W}.sparse_csr.crow_indices"),
    "csr_crow_decreasing": (_with_input(_csr([1, 2], [0, 2, 1], [0, 1], [2, 2])), f"{W}.sparse_csr.crow_indices"),
    "csr_nnz": (_with_input(_csr([1, 2, 3], [0, 1, 2], [0, 1], [2, 2])), f"{W}.sparse_csr"),
    "csr_col_range": (_with_input(_csr([1, 2], [0, 1, 2], [0, 2], [2, 2])), f"{W}.sparse_csr.col_indices"),
    "csr_col_negative": (_with_input(_csr([1], [0, 1, 1], [-1], [2, 2])), f"{W}.sparse_csr.col_indices"),
    "csr_col_duplicate": (_with_input(_csr([1, 2], [0, 2, 2], [1, 1], [2, 2])), f"{W}.sparse_csr.col_indices"),
    "csr_index_bytes": (_with_input(our_pb.Tensor(
        dtype=our_pb.DTYPE_INT64, shape=[1, 1],
        sparse_csr=our_pb.SparseCsr(crow_indices=b"\0" * 12))), f"{W}.sparse_csr.crow_indices"),
    "csr_densify_bomb": (_with_input(_csr([1], [0, 1] + [1] * 2**10, [0], [2**10 + 1, 2**30])), W),
}


@pytest.mark.parametrize("body,field", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_reports_field(body: bytes, field: str) -> None:
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(body)
    assert info.value.field == field
    assert info.value.message
    assert str(info.value) == f"{field}: {info.value.message}"


@pytest.mark.parametrize("kind", ["image", "dmel"])
def test_non_text_chunk_is_rejected(kind: str) -> None:
    msg = _one_datum_request()
    chunk = msg.data[0].model_input.add()
    if kind == "image":
        chunk.image.data, chunk.image.format = b"\x89PNG", "png"
    else:
        chunk.dmel.dmel = b"\0\0"
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(msg.SerializeToString())
    assert info.value.field == "data[0].model_input[1]"
    assert "text-only" in info.value.message


def test_empty_chunk_is_rejected() -> None:
    msg = _one_datum_request()
    msg.data[0].model_input.add()
    with pytest.raises(WireError, match=r"data\[0\]\.model_input\[1\]"):
        decode_forward_backward_request(msg.SerializeToString())


def test_empty_loss_config_value_is_rejected() -> None:
    msg = _one_datum_request()
    msg.loss_fn_config_v2["beta"].SetInParent()
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(msg.SerializeToString())
    assert info.value.field == "loss_fn_config_v2.beta"


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd, gzip"])
def test_unsupported_content_encoding(encoding: str) -> None:
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(_sdk_body(_sdk_datums()), encoding)
    assert info.value.field == "content-encoding"


def test_invalid_zstd_data() -> None:
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(b"definitely not zstd", "zstd")
    assert info.value.field == "body"


def test_zstd_bomb_over_limit() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (8 * 2**20))
    assert len(bomb) < 2**12
    with pytest.raises(WireError) as info:
        decode_forward_backward_request(bomb, "zstd", max_decompressed_bytes=2**20)
    assert info.value.field == "body"
    assert str(2**20) in info.value.message


def test_zstd_without_content_size_is_still_bounded() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    with cctx.stream_writer(sink := _BytesSink(), closefd=False) as writer:
        writer.write(b"\0" * (4 * 2**20))
    with pytest.raises(WireError, match="decompresses to more than"):
        decode_forward_backward_request(sink.data, "zstd", max_decompressed_bytes=2**20)


class _BytesSink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> int:
        self.data += bytes(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass


def test_sparse_tensor_within_budget_is_densified() -> None:
    body = _with_input(_csr([1.5], [0, 0, 1], [3], [2, 4], dtype=our_pb.DTYPE_FLOAT32))
    call = decode_forward_backward_request(body)
    weights = call.data[0].loss_fn_inputs["weights"]
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, [[0, 0, 0, 0], [0, 0, 0, 1.5]])


def test_non_finite_float_inputs_are_passed_through() -> None:
    values = np.array([np.nan, np.inf, -np.inf], "<f4")
    call = decode_forward_backward_request(
        _with_input(our_pb.Tensor(dtype=our_pb.DTYPE_FLOAT32, dense=values.tobytes()))
    )
    np.testing.assert_array_equal(call.data[0].loss_fn_inputs["weights"], values)


def test_random_corruption_only_ever_raises_wire_error() -> None:
    # The decoder promises WireError for every bad body; mutate a valid one many ways.
    body = bytearray(_sdk_body(_sdk_datums(), loss_fn_config={"beta": 0.1, "name": "x"}))
    rng = random.Random(1234)
    for _ in range(400):
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(mutated))
            if op < 0.6:
                mutated[pos] = rng.randrange(256)
            elif op < 0.8:
                del mutated[pos : pos + rng.randint(1, 8)]
            else:
                mutated[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            decode_forward_backward_request(bytes(mutated), max_decompressed_bytes=2**20)
        except WireError:
            pass


# ---------------------------------------------------------------------------------------------
# Our results -> the SDK's decoders
# ---------------------------------------------------------------------------------------------


def test_forward_backward_output_round_trips_through_sdk() -> None:
    rng = np.random.default_rng(0)
    outputs = [
        {
            "logprobs": rng.standard_normal(n).astype(np.float32),
            "elementwise_loss": rng.standard_normal(n),  # float64: sent as float32
            "topk_ids": rng.integers(0, 1000, size=(n, 3)).astype(np.int32),  # [N, K]: int64
        }
        for n in (5, 1, 12)
    ]
    metrics = {"loss:sum": 12.5, "tokens:sum": 18.0, "clipfrac:mean": 0.25}

    body = encode_forward_backward_output(outputs, metrics)
    result = deserialize_forward_backward_output(body)

    assert result.loss_fn_output_type == "ArrayRecord"
    assert result.metrics == metrics
    assert len(result.loss_fn_outputs) == len(outputs)
    for got, sent in zip(result.loss_fn_outputs, outputs, strict=True):
        assert set(got) == set(sent)
        for name, arr in sent.items():
            td = got[name]
            assert td.dtype == ("float32" if arr.dtype.kind == "f" else "int64"), name
            assert td.shape == list(arr.shape), name
            np.testing.assert_array_equal(td.to_numpy(), arr.astype(td.to_numpy().dtype))
    assert len(_records(body)) == 1


def test_ragged_trailing_shapes_become_several_records() -> None:
    outputs = [
        {"logprobs": np.zeros(2, np.float32), "topk": np.arange(4, dtype=np.int64).reshape(2, 2)},
        {"logprobs": np.ones(3, np.float32), "topk": np.arange(9, dtype=np.int64).reshape(3, 3)},
        {"logprobs": np.ones(1, np.float32), "topk": np.arange(3, dtype=np.int64).reshape(1, 3)},
        {"logprobs": np.ones(2, np.float32), "topk": np.arange(2, dtype=np.int64).reshape(2, 1)},
    ]
    body = encode_forward_backward_output(outputs, {"loss:sum": 1.0})

    records = _records(body)
    assert [r.num_datums for r in records] == [1, 2, 1]
    for record in records:
        assert record.type_tag == "ArrayRecord"
        offsets = np.frombuffer(record.fields["topk"].offsets, "<i8")
        assert offsets[0] == 0 and offsets[-1] == len(record.fields["topk"].data)
    result = deserialize_forward_backward_output(body)
    for got, sent in zip(result.loss_fn_outputs, outputs, strict=True):
        for name, arr in sent.items():
            assert got[name].shape == list(arr.shape)
            np.testing.assert_array_equal(got[name].to_numpy(), arr)


def test_output_survives_the_sdk_chunk_merge() -> None:
    # The SDK merges every fwd/bwd result (even a single chunk) by metric suffix.
    first = deserialize_forward_backward_output(
        encode_forward_backward_output([{"logprobs": np.zeros(2)}], {"loss:sum": 1.0, "acc:mean": 0.5})
    )
    second = deserialize_forward_backward_output(
        encode_forward_backward_output(
            [{"logprobs": np.zeros(3)}, {"logprobs": np.zeros(1)}], {"loss:sum": 2.0, "acc:mean": 1.0}
        )
    )
    merged = combine_fwd_bwd_output_results([first, second])
    assert merged.metrics["loss:sum"] == 3.0
    assert math.isclose(merged.metrics["acc:mean"], (0.5 * 1 + 1.0 * 2) / 3)
    assert [o["logprobs"].shape for o in merged.loss_fn_outputs] == [[2], [3], [1]]


def test_datums_without_fields_and_custom_output_type() -> None:
    body = encode_forward_backward_output([{}, {}], {"loss:sum": 0.0}, loss_fn_output_type="TorchLossReturn")
    result = deserialize_forward_backward_output(body)
    assert result.loss_fn_output_type == "TorchLossReturn"
    assert result.loss_fn_outputs == [{}, {}]


def test_empty_output_list() -> None:
    result = deserialize_forward_backward_output(encode_forward_backward_output([], {"loss:sum": 0.0}))
    assert result.loss_fn_outputs == [] and result.metrics == {"loss:sum": 0.0}


def _records(body: bytes) -> list:
    msg = our_pb.ForwardBackwardOutput()
    msg.ParseFromString(body)
    return list(msg.loss_fn_outputs)


@pytest.mark.parametrize(
    "outputs,metrics,match",
    [
        ([{"logprobs": np.zeros(2)}, {"other": np.zeros(2)}], {"loss:sum": 0.0}, "same fields"),
        ([{"logprobs": np.zeros(2, dtype=bool)}], {"loss:sum": 0.0}, "dtype bool"),
        ([{"logprobs": np.zeros(2, dtype=np.uint64)}], {"loss:sum": 0.0}, "dtype uint64"),
        ([{"logprobs": np.zeros(2)}], {"loss": 1.0}, "exactly one ':'"),
        ([{"logprobs": np.zeros(2)}], {"loss:sum:x": 1.0}, "exactly one ':'"),
    ],
)
def test_encode_output_rejects_server_bugs(outputs, metrics, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        encode_forward_backward_output(outputs, metrics)
    assert not isinstance(info.value, WireError)


def test_sample_response_round_trips_through_sdk() -> None:
    sequences = [
        SampledSequenceOut(tokens=[5, 6, 2**31 - 1], logprobs=[-0.5, -1.25, -3.0], stop_reason="stop"),
        SampledSequenceOut(tokens=[9], logprobs=None, stop_reason="length"),
        SampledSequenceOut(tokens=np.array([1, 2], dtype=np.int64), logprobs=np.array([-0.1, -0.2]), stop_reason="length"),
    ]
    prompt_logprobs = [float("nan"), -2.0, -0.75]

    result = deserialize_sample_response(encode_sample_response(sequences, prompt_logprobs))

    assert [s.stop_reason for s in result.sequences] == ["stop", "length", "length"]
    assert [s.tokens for s in result.sequences] == [[5, 6, 2**31 - 1], [9], [1, 2]]
    assert result.sequences[0].logprobs == [-0.5, -1.25, -3.0]
    assert result.sequences[1].logprobs is None
    np.testing.assert_array_equal(result.sequences[2].logprobs_np, np.array([-0.1, -0.2], np.float32))
    assert result.prompt_logprobs == [None, -2.0, -0.75]
    assert result.topk_prompt_logprobs is None and result.prompt_alt_tokens is None


def test_sample_response_without_prompt_logprobs() -> None:
    result = deserialize_sample_response(
        encode_sample_response([SampledSequenceOut(tokens=[1], logprobs=[-1.0], stop_reason="stop")])
    )
    assert result.prompt_logprobs is None
    msg = our_pb.SampleResponse()
    msg.ParseFromString(encode_sample_response([]))
    assert not msg.HasField("prompt_logprobs")


@pytest.mark.parametrize(
    "seq",
    [
        SampledSequenceOut(tokens=[1], logprobs=[-1.0], stop_reason="eos"),  # type: ignore[arg-type]
        SampledSequenceOut(tokens=[1, 2], logprobs=[-1.0], stop_reason="stop"),
    ],
)
def test_encode_sample_rejects_server_bugs(seq: SampledSequenceOut) -> None:
    with pytest.raises(ValueError):
        encode_sample_response([seq])


# ---------------------------------------------------------------------------------------------
# Sample response: every optional field, through the SDK's decoder
# ---------------------------------------------------------------------------------------------


def _topk(ids, lps) -> TopkOut:
    return TopkOut(np.array(ids, dtype=np.int64), np.array(lps, dtype=np.float32))


def test_sample_response_with_every_option_round_trips_through_sdk() -> None:
    seq_topk = _topk([[5, 7], [9, 1]], [[-0.5, -1.0], [-0.25, -3.0]])
    prompt_topk = _topk([[0, 0], [3, 4], [8, 0]], [[-99999.0, -99999.0], [-0.125, -0.25], [-0.375, -99999.0]])
    target = np.array([[-1.5, 0.0], [0.0, -2.25]], dtype=np.float32)
    alt_tokens = np.array([[11, 12, 13], [14, 15, 2**40]], dtype=np.int64)
    alt_lps = np.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=np.float32)
    body = encode_sample_response(
        [SampledSequenceOut([5, 9], [-0.5, -0.25], "stop", topk=seq_topk),
         SampledSequenceOut([], [], "length", topk=_topk(np.empty((0, 2)), np.empty((0, 2))))],
        [float("nan"), -0.125, -0.375],
        topk_prompt_logprobs=prompt_topk,
        target_prompt_logprobs=target,
        prompt_alt_tokens=(alt_tokens, alt_lps),
        prompt_cache_hit_tokens=2,
    )
    res = deserialize_sample_response(body)
    assert res.sequences[0].topk_logprobs == [[(5, -0.5), (7, -1.0)], [(9, -0.25), (1, -3.0)]]
    assert res.sequences[1].topk_logprobs is None  # the SDK reads a 0-row TopkLogprobs as absent
    # Empty cells: a fully empty row is None, trailing empty cells are dropped.
    assert res.topk_prompt_logprobs == [None, [(3, -0.125), (4, -0.25)], [(8, -0.375)]]
    assert res.prompt_logprobs == [None, -0.125, -0.375]
    tp = res.target_prompt_logprobs
    assert tp.dtype == "float32" and tp.shape == [2, 2] and tp.sparse_crow_indices is None
    np.testing.assert_array_equal(tp.to_numpy(), target)
    alt = res.prompt_alt_tokens
    assert alt.tokens.dtype == "int64" and alt.logprobs.dtype == "float32"
    np.testing.assert_array_equal(alt.tokens.to_numpy(), alt_tokens)
    np.testing.assert_array_equal(alt.logprobs.to_numpy(), alt_lps)
    assert res.prompt_cache_hit_tokens == 2


def test_sparse_target_keeps_the_request_layout() -> None:
    import torch

    ids = torch.full((6, 3), -1, dtype=torch.int64)
    ids[1, 2], ids[4, 0], ids[5, 1] = 10, 20, 30
    request = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert request.sparse_crow_indices is not None
    target = decode_target_ids(_json_tensor(request), prompt_len=7, vocab_size=100)
    np.testing.assert_array_equal(target.ids, ids.numpy())
    values = np.zeros((6, 3), dtype=np.float32)
    values[1, 2], values[4, 0], values[5, 1] = -1.5, -2.5, -3.5
    res = deserialize_sample_response(
        encode_sample_response([], target_prompt_logprobs=values, target_prompt_logprobs_csr=target.csr)
    )
    tp = res.target_prompt_logprobs
    assert tp.shape == [6, 3] and tp.dtype == "float32"
    assert tp.sparse_crow_indices == request.sparse_crow_indices
    assert tp.sparse_col_indices == request.sparse_col_indices
    assert tp.data == [-1.5, -2.5, -3.5]
    np.testing.assert_array_equal(tp.to_torch().numpy(), values)  # torch's CSR invariants hold


def test_alt_tokens_of_a_one_token_prompt_are_present_but_empty() -> None:
    from tinker.lib.public_interfaces.sampling_client import _check_prompt_alt_tokens_returned

    res = deserialize_sample_response(
        encode_sample_response([], prompt_alt_tokens=(np.empty((0, 4), np.int64), np.empty((0, 4), np.float32)))
    )
    _check_prompt_alt_tokens_returned(res, 4)
    assert res.prompt_alt_tokens.tokens.to_numpy().shape == (0, 4)
    with pytest.raises(RuntimeError):
        _check_prompt_alt_tokens_returned(deserialize_sample_response(encode_sample_response([])), 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(topk_prompt_logprobs=TopkOut(np.zeros((2, 3)), np.zeros((2, 2)))),
        dict(topk_prompt_logprobs=TopkOut(np.zeros(3), np.zeros(3))),
        dict(target_prompt_logprobs=np.zeros(3)),
        dict(target_prompt_logprobs=np.zeros((2, 2)), target_prompt_logprobs_csr=(np.array([0, 1]), np.array([0]))),
        dict(target_prompt_logprobs=np.zeros((2, 2)), target_prompt_logprobs_csr=(np.array([0, 1, 2]), np.array([0]))),
        dict(target_prompt_logprobs_csr=(np.array([0]), np.array([], np.int64))),
        dict(prompt_alt_tokens=(np.zeros((2, 2), np.int64), np.zeros((2, 3)))),
    ],
)
def test_encode_sample_options_reject_server_bugs(kwargs) -> None:
    with pytest.raises(ValueError) as info:
        encode_sample_response([], **kwargs)
    assert not isinstance(info.value, WireError)


def test_sequence_topk_rows_must_match_its_tokens() -> None:
    with pytest.raises(ValueError, match="topk"):
        encode_sample_response([SampledSequenceOut([1, 2], [-1.0, -1.0], "stop", topk=_topk([[1]], [[-1.0]]))])


# ---------------------------------------------------------------------------------------------
# target_prompt_logprobs (JSON TensorData) -> dense ids + layout; option bounds
# ---------------------------------------------------------------------------------------------


def _json_tensor(td: types.TensorData) -> JsonTensorData:
    """The tensor as the gateway receives it: the SDK's JSON dump, parsed by our model."""
    from tinker.lib.public_interfaces.sampling_client import _tensor_data_to_model

    return JsonTensorData(**_tensor_data_to_model(td).model_dump(mode="json", exclude_none=True))


def test_dense_target_ids_from_the_sdk() -> None:
    ids = np.array([[3, -1], [-1, -1], [0, 99]], dtype=np.int64)
    target = decode_target_ids(_json_tensor(types.TensorData.from_numpy(ids)), prompt_len=4, vocab_size=100)
    assert target.csr is None and target.ids.dtype == np.int64
    np.testing.assert_array_equal(target.ids, ids)


def _tensor(data, shape, crow=None, col=None, dtype="int64") -> JsonTensorData:
    return JsonTensorData(data=data, dtype=dtype, shape=shape, sparse_crow_indices=crow, sparse_col_indices=col)


@pytest.mark.parametrize(
    ("tensor", "field", "match"),
    [
        (_tensor([1.0, 2.0], [2, 1], dtype="float32"), "target_prompt_logprobs.dtype", "int64"),
        (_tensor([1, 2], None), "target_prompt_logprobs.shape", "2-D"),
        (_tensor([1, 2], [2]), "target_prompt_logprobs.shape", "2-D"),
        (_tensor([1, 2, 3], [3, 1]), "target_prompt_logprobs.shape", "len\\(prompt\\) - 1 = 2 rows"),
        (_tensor([1, 2, 3], [2, 1]), "target_prompt_logprobs.data", "needs 2"),
        (_tensor([1, 100], [2, 1]), "target_prompt_logprobs.data", r"cell \[1, 0\] is 100"),
        (_tensor([1, -2], [2, 1]), "target_prompt_logprobs.data", "must be -1"),
        (_tensor([-1, -1], [2, 1]), "target_prompt_logprobs", "names no token id"),
        (_tensor([], [2, 0]), "target_prompt_logprobs", "names no token id"),
        (_tensor([1.5, 2.0], [2, 1]), "target_prompt_logprobs.data", "integers"),
        (_tensor([5], [2, 3], crow=[0, 1], col=[0]), "target_prompt_logprobs.sparse_crow_indices", "rows \\+ 1"),
        (_tensor([5], [2, 3], crow=[1, 1, 1], col=[0]), "target_prompt_logprobs.sparse_crow_indices", "start at 0"),
        (_tensor([5], [2, 3], crow=[0, 2, 1], col=[0]), "target_prompt_logprobs.sparse_crow_indices", "non-decreasing"),
        (_tensor([5], [2, 3], crow=[0, 1, 2], col=[0]), "target_prompt_logprobs", "must agree"),
        (_tensor([5], [2, 3], crow=[0, 1, 1], col=[3]), "target_prompt_logprobs.sparse_col_indices", "outside"),
        (_tensor([5, 6], [2, 3], crow=[0, 2, 2], col=[1, 1]), "target_prompt_logprobs.sparse_col_indices", "twice"),
        (_tensor([5], [2, 3], crow=[0, 1, 1]), "target_prompt_logprobs.sparse_col_indices", "go together"),
        (_tensor([5], [2, 3], crow=[0, 1, 1], col=[0]), None, None),  # valid
        (_tensor([5], [2, 2**40], crow=[0, 1, 1], col=[0]), "target_prompt_logprobs.shape", "limit"),
    ],
)
def test_bad_target_ids_name_the_field(tensor, field, match) -> None:
    if field is None:
        target = decode_target_ids(tensor, prompt_len=3, vocab_size=100)
        assert target.ids.tolist() == [[5, -1, -1], [-1, -1, -1]]
        return
    with pytest.raises(WireError, match=match) as info:
        decode_target_ids(tensor, prompt_len=3, vocab_size=100)
    assert info.value.field == field


def test_a_one_token_prompt_cannot_name_target_ids() -> None:
    with pytest.raises(WireError) as info:
        decode_target_ids(_tensor([], [0, 2]), prompt_len=1, vocab_size=100)
    assert info.value.field == "target_prompt_logprobs"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt_len=0), "prompt"),
        (dict(prompt_logprobs=True, prompt_logprobs_last_n=0), "prompt_logprobs_last_n"),
        (dict(prompt_logprobs=True, prompt_logprobs_last_n=5), "prompt_logprobs_last_n"),
        (dict(prompt_logprobs=False, prompt_logprobs_last_n=2), "prompt_logprobs_last_n"),
        (dict(prompt_len=1, prompt_logprobs=True, prompt_logprobs_last_n=1), "prompt_logprobs_last_n"),
        (dict(topk_prompt_logprobs=101), "topk_prompt_logprobs"),
        (dict(topk_sample_logprobs=101), "topk_sample_logprobs"),
        (dict(prompt_alt_tokens_k=101), "prompt_alt_tokens_k"),
        (dict(prompt_alt_tokens_k=-1), "prompt_alt_tokens_k"),
        (dict(topk_prompt_logprobs=50, max_cells=100), "topk_prompt_logprobs"),
        # top-k of sampled tokens is num_samples x max_tokens rows, not one
        (dict(topk_sample_logprobs=10, num_samples=4, max_tokens=3, max_cells=100), "topk_sample_logprobs"),
        (dict(num_samples=11, max_tokens=10, max_cells=100), "num_samples"),
    ],
)
def test_sample_option_bounds(kwargs, field) -> None:
    with pytest.raises(WireError) as info:
        check_sample_options(**{"prompt_len": 5, "vocab_size": 100, **kwargs})
    assert info.value.field == field


def test_sample_options_at_their_bounds_pass() -> None:
    check_sample_options(prompt_len=5, vocab_size=100, prompt_logprobs=True, prompt_logprobs_last_n=4,
                         topk_prompt_logprobs=100, topk_sample_logprobs=100, prompt_alt_tokens_k=100)
    check_sample_options(prompt_len=5, vocab_size=100, prompt_logprobs=True, prompt_logprobs_last_n=1)
    check_sample_options(prompt_len=1, vocab_size=100, prompt_logprobs=True, prompt_alt_tokens_k=3)
    check_sample_options(prompt_len=5, vocab_size=100, topk_sample_logprobs=10, num_samples=2, max_tokens=5,
                         max_cells=100)
    check_sample_options(prompt_len=5, vocab_size=100, num_samples=10, max_tokens=10, max_cells=100)
