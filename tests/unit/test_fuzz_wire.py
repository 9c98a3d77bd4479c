"""Property-based fuzzing (hypothesis) of everything that decodes what a client sends: the
forward_backward protobuf (raw bytes, mutated real bodies, random well-typed messages, zstd frames),
its JSON form, and the sampler's target-id tensors. Each input either decodes or is refused with
the codec's own error naming a field; nothing else is raised, and every example ends within its
deadline (no hang, no blow-up)."""

from __future__ import annotations

import json

import numpy as np
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import legacy
from schemas import tinker_wire_pb2 as pb
from schemas.tensors import decode_target_ids
from schemas.wire import MAX_DATUMS, ForwardBackwardCall, WireError, _parse_request, decode_forward_backward_request
from tests.support.data import fwdbwd_proto

# The same examples on every run (CI stays deterministic); explore further with
# `pytest tests/unit/test_fuzz_wire.py --hypothesis-seed=random` or more max_examples.
FUZZ = settings(max_examples=300, deadline=1000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20  # a small decompression budget, so a blow-up shows as a refusal here


def decodes_or_refuses(body: bytes, encoding: str | None = None) -> ForwardBackwardCall | None:
    try:
        call = decode_forward_backward_request(body, encoding, max_decompressed_bytes=LIMIT)
    except WireError as exc:
        assert exc.field and str(exc)
        return None
    assert call.model_id and call.loss_fn and call.data
    return call


def valid_body() -> bytes:
    from tinker import types

    rows = [[1, 2, 3, 4], [5, 6, 7]]
    data = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                        loss_fn_inputs={"target_tokens": r[1:], "weights": np.ones(len(r) - 1, dtype=np.float32)})
            for r in rows]
    return fwdbwd_proto("sess-x:train:0", data, seq_id=3)


VALID = valid_body()


# ----- raw and mutated bytes -----------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(body) - 1))
        match draw(st.sampled_from(["flip", "cut", "insert", "delete"])):
            case "flip":
                body[at] ^= draw(st.integers(1, 255))
            case "cut":
                del body[at:]
            case "insert":
                body[at:at] = draw(st.binary(min_size=1, max_size=16))
            case "delete":
                del body[at:at + draw(st.integers(1, 16))]
        if not body:
            break
    return bytes(body)


@FUZZ
@given(mutated())
def test_mutated_real_bodies_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)


# ----- well-typed messages with hostile contents ---------------------------------------------------
DTYPES = st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_INT64, pb.DTYPE_INT32, pb.DTYPE_BFLOAT16])
SHAPES = st.lists(st.integers(-3, 1 << 40), max_size=3)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    tensor = pb.Tensor(dtype=draw(DTYPES), shape=draw(SHAPES))
    if draw(st.booleans()):
        tensor.dense = draw(st.binary(max_size=256))
    else:
        index = st.binary(max_size=64).map(lambda b: b[: len(b) // 8 * 8])
        tensor.sparse_csr.values = draw(st.binary(max_size=128))
        tensor.sparse_csr.crow_indices = draw(index)
        tensor.sparse_csr.col_indices = draw(index)
    return tensor


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=draw(st.text(max_size=40)), seq_id=draw(st.integers(-(2**31), 2**31 - 1)),
                                    loss_fn=draw(st.sampled_from(["", "cross_entropy", "ppo", "x" * 300])),
                                    forward_only=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        datum = msg.data.add()
        for _ in range(draw(st.integers(0, 2))):
            datum.model_input.add().encoded_text.tokens = draw(st.binary(max_size=64))
        for name in draw(st.lists(st.sampled_from(["target_tokens", "weights", "advantages", "logprobs", "?"]),
                                  max_size=3, unique=True)):
            datum.loss_fn_inputs[name].CopyFrom(draw(tensors()))
    for key in draw(st.lists(st.text(max_size=8), max_size=3)):
        msg.loss_fn_config[key] = draw(st.floats(allow_nan=True, allow_infinity=True))
    return msg.SerializeToString()


@FUZZ
@given(requests())
def test_random_well_typed_requests_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body)  # values (NaN, ids out of range) are server/ops/validation.py's to refuse


@FUZZ
@given(requests())
def test_parsing_datum_by_datum_is_parsing_the_whole_message(body: bytes) -> None:
    whole = pb.ForwardBackwardRequest()
    whole.ParseFromString(body)
    assert _parse_request(body, MAX_DATUMS) == whole


# ----- zstd ----------------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(st.binary(max_size=512), requests().map(zstandard.ZstdCompressor().compress)))
def test_zstd_frames_decode_or_are_refused(body: bytes) -> None:
    decodes_or_refuses(body, "zstd")


def test_a_zstd_bomb_is_refused_within_the_budget() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * LIMIT))
    assert len(bomb) < 64 * 1024
    try:
        decode_forward_backward_request(bomb, "zstd", max_decompressed_bytes=LIMIT)
    except WireError as exc:
        assert "content-encoding" in exc.field or "body" in exc.field
    else:
        raise AssertionError("a bomb decoded")


# ----- the JSON form -------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=30)


@st.composite
def json_requests(draw: st.DrawFn) -> bytes:
    body = {"model_id": draw(st.text(max_size=20)), "seq_id": draw(JSON),
            "forward_backward_input": {"loss_fn": draw(st.sampled_from(["cross_entropy", "", "nope"])),
                                       "data": draw(st.lists(JSON, max_size=3))}}
    if draw(st.booleans()):
        body = draw(JSON)
    return json.dumps(body).encode()


@FUZZ
@given(json_requests())
def test_json_bodies_decode_or_are_refused(body: bytes) -> None:
    try:
        call = legacy.decode_forward_backward_json(body, forward_only=False)
    except WireError as exc:
        assert exc.field
    else:
        assert call.data


# ----- target ids (sampling) -----------------------------------------------------------------------
@st.composite
def target_tensors(draw: st.DrawFn):  # noqa: ANN201 - a TensorData
    from schemas.tinker import TensorData

    return TensorData(data=draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=24)),
                      dtype=draw(st.sampled_from(["int64", "float32"])),
                      shape=draw(st.none() | st.lists(st.integers(-2, 8), max_size=3)),
                      sparse_crow_indices=draw(st.none() | st.lists(st.integers(-2, 30), max_size=8)),
                      sparse_col_indices=draw(st.none() | st.lists(st.integers(-2, 30), max_size=8)))


@FUZZ
@given(target_tensors(), st.integers(0, 8))
def test_target_id_tensors_decode_or_are_refused(tensor, prompt_len: int) -> None:
    try:
        target = decode_target_ids(tensor, prompt_len=prompt_len, vocab_size=32)
    except (ValueError, WireError) as exc:
        assert str(exc)
    else:
        assert target.ids.shape[0] == prompt_len - 1 and ((target.ids == -1) | ((0 <= target.ids) & (target.ids < 32))).all()
