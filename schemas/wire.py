"""Protobuf codecs for the two binary bodies of the Tinker API.

* ``decode_forward_backward_request``: the body of ``POST /api/v1/forward_backward`` (a
  ``ForwardBackwardRequest``, optionally zstd-compressed) into plain numpy arrays.
* ``encode_forward_backward_output`` / ``encode_sample_response``: the protobuf results that
  ``retrieve_future`` must return for forward(-backward) and sample futures.

The SDK packs every array with ``numpy.tobytes()`` in native byte order; all supported clients
are little-endian, so this module reads and writes explicitly little-endian buffers
(docs/tinker-protocol-notes.md, "Little-endian arrays"). Anything a client can get wrong is reported as a
``WireError`` naming the offending field, so the gateway can turn it into a 400 the user can act
on. Misuse by server
code (e.g. ragged field names in outputs) raises a plain ``ValueError``: that is a bug, not
bad input.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from schemas import tinker_wire_pb2 as pb

__all__ = [
    "WireError",
    "DatumIn",
    "ForwardBackwardCall",
    "SampledSequenceOut",
    "TopkArrays",
    "TopkOut",
    "decode_forward_backward_request",
    "encode_forward_backward_output",
    "encode_sample_response",
]

MAX_DATUMS = 1 << 16  # per request, by default; the server passes its max_datums_per_request
_TOKEN_DTYPE = np.dtype("<i4")
_INDEX_DTYPE = np.dtype("<i8")
_LOGPROB_DTYPE = np.dtype("<f4")

# Wire dtypes accepted for loss_fn_inputs: the SDK's public TensorDtype is float32 | int64 only.
_INPUT_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}

_STOP_REASONS: dict[str, int] = {
    "stop": pb.STOP_REASON_STOP,
    "length": pb.STOP_REASON_LENGTH,
}


class WireError(ValueError):
    """Bad client input on the wire.

    ``field`` names the offending field as a dotted/indexed path
    (e.g. ``data[3].loss_fn_inputs.weights``); ``message`` says what is wrong.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------
# forward_backward request
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make `==` ambiguous
class DatumIn:
    # int64, 1-D: all encoded_text chunks of model_input concatenated in order
    tokens: np.ndarray
    # dense arrays with the wire `shape` (1-D of all elements if shape absent);
    # dtype float32 or int64
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    # merged view: loss_fn_config_v2 entries win; legacy map<string,double> fills the rest
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[DatumIn]


def decode_forward_backward_request(
    body: bytes,
    content_encoding: str | None = None,
    *,
    max_decompressed_bytes: int = 256 * 2**20,
    max_datums: int = MAX_DATUMS,
) -> ForwardBackwardCall:
    """Decode a ``POST /api/v1/forward_backward`` body. Raises ``WireError`` on bad input.

    ``max_decompressed_bytes`` bounds both the zstd output and the extra memory that
    densifying sparse CSR tensors may take, so a small body cannot blow up the server;
    ``max_datums`` bounds the datums, checked before any is decoded (a body of millions of
    one-token datums would cost far more memory decoded than its bytes).
    """
    raw = _decompress(body, content_encoding, max_decompressed_bytes)
    msg = _parse_request(raw, max_datums)
    if not msg.model_id:
        raise WireError("model_id", "missing: the request names no model")
    if not msg.loss_fn:
        raise WireError("loss_fn", "missing: the request names no loss function")
    check_datum_count(len(msg.data), max_datums)
    budget = _DensifyBudget(max_decompressed_bytes)
    data = [_decode_datum(datum, f"data[{i}]", budget) for i, datum in enumerate(msg.data)]
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_fn_config=_merge_loss_fn_config(msg),
        forward_only=bool(msg.forward_only),
        data=data,
    )


def check_datum_count(count: int, max_datums: int) -> None:
    if count == 0:
        raise WireError("data", "the request has no datums; send at least one")
    if count > max_datums:
        raise WireError("data", f"{count} datums in one request; at most {max_datums} are taken "
                                "(the SDK sends at most 1024 per request: send fewer at a time)")


def model_and_seq_of(body: bytes, content_encoding: str | None = None,
                     max_decompressed_bytes: int = 256 * 2**20) -> tuple[str | None, int | None]:
    """``(model_id, seq_id)`` as a refused protobuf body names them, for releasing its seq_id;
    ``(None, None)`` when not even its envelope parses."""
    msg = pb.ForwardBackwardRequest()
    try:  # the envelope alone: a damaged datum or too many of them must not hide the seq_id
        msg.ParseFromString(_split_data(memoryview(_decompress(body, content_encoding, max_decompressed_bytes)))[0])
    except (WireError, DecodeError, RuntimeError, ValueError):
        return None, None
    return (msg.model_id, int(msg.seq_id)) if msg.model_id else (None, None)


def _decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    # Content-coding names are case-insensitive (RFC 9110 §8.4.1).
    encoding = (content_encoding or "identity").strip().lower() or "identity"
    if encoding == "identity":
        return bytes(body)
    if encoding != "zstd":
        raise WireError(
            "content-encoding",
            f"unsupported Content-Encoding {content_encoding!r}; this endpoint accepts "
            "'zstd' or no encoding",
        )
    return _zstd_decompress_bounded(body, limit)


def _zstd_decompress_bounded(body: bytes, limit: int) -> bytes:
    # A streaming reader, not ZstdDecompressor.decompress(): the frame header's content size is
    # attacker-controlled (or absent), so stop reading as soon as the limit is crossed.
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(body), read_across_frames=True
        ) as reader:
            while True:
                chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > limit:
                    raise WireError(
                        "body",
                        f"zstd body decompresses to more than {limit} bytes, the server's "
                        "limit; send smaller batches",
                    )
    except zstandard.ZstdError as exc:
        raise WireError("body", f"not valid zstd data ({exc})") from None
    return bytes(out)


_DATA_FIELD = pb.ForwardBackwardRequest.DESCRIPTOR.fields_by_name["data"].number


def _parse_request(raw: bytes, max_datums: int) -> pb.ForwardBackwardRequest:
    """The request, parsed datum by datum: one ParseFromString of a 64 MiB body holds the GIL for
    ~50 ms, and the event loop with it; between datums, other threads run. The envelope (every
    field but `data`) is parsed as one small message, then each datum is appended in order: the
    same message one ParseFromString would give."""
    try:
        envelope, datums = _split_data(memoryview(raw))
    except ValueError as exc:
        raise _not_a_request(exc) from None
    if len(datums) > max_datums:  # before any is parsed
        check_datum_count(len(datums), max_datums)
    try:
        msg = pb.ForwardBackwardRequest()
        msg.ParseFromString(envelope)
        for datum in datums:
            msg.data.add().ParseFromString(datum)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise _not_a_request(exc) from None
    return msg


def _not_a_request(exc: Exception) -> WireError:
    return WireError("body", f"not a valid ForwardBackwardRequest protobuf ({exc or type(exc).__name__}); "
                             "send the SDK's Content-Type: application/x-protobuf body")


def _split_data(view: memoryview) -> tuple[bytes, list[memoryview]]:
    """(the top-level fields but `data`, as bytes; each `data` entry's bytes), by the wire format."""
    envelope, datums, pos = bytearray(), [], 0
    while pos < len(view):
        start = pos
        tag, pos = _varint(view, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:  # length-delimited
            length, pos = _varint(view, pos)
            if pos + length > len(view):
                raise ValueError("truncated field")
            if field == _DATA_FIELD:
                datums.append(view[pos:pos + length])
                pos += length
                continue
            pos += length
        elif wire_type == 0:
            pos = _varint(view, pos)[1]
        elif wire_type in (1, 5):  # 64-bit, 32-bit
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"wire type {wire_type} at byte {start}")
        if pos > len(view):
            raise ValueError("truncated field")
        envelope += view[start:pos]
    return bytes(envelope), datums


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view):
            raise ValueError("truncated varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ValueError("varint longer than 64 bits")


def _merge_loss_fn_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    # The SDK dual-writes numbers into both maps and strings only into v2; v2 is authoritative.
    merged: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            merged[key] = float(value.number)
        elif kind == "text":
            merged[key] = value.text
        else:
            raise WireError(
                f"loss_fn_config_v2.{key}",
                "value has neither 'number' nor 'text' set (a newer SDK value kind?)",
            )
    return merged


def _decode_datum(datum: pb.Datum, path: str, budget: _DensifyBudget) -> DatumIn:
    tokens = _decode_model_input(datum, path)
    inputs = {
        name: _decode_tensor(tensor, f"{path}.loss_fn_inputs.{name}", budget)
        for name, tensor in datum.loss_fn_inputs.items()
    }
    # Provenance spans (model_input_spans / loss_fn_input_spans) are not used yet.
    return DatumIn(tokens=tokens, loss_fn_inputs=inputs)


def _decode_model_input(datum: pb.Datum, path: str) -> np.ndarray:
    parts: list[np.ndarray] = []
    for j, chunk in enumerate(datum.model_input):
        chunk_path = f"{path}.model_input[{j}]"
        kind = chunk.WhichOneof("chunk")
        if kind in ("image", "dmel"):
            raise WireError(
                chunk_path,
                f"{kind} chunks are not supported: this server's base models are text-only",
            )
        if kind != "encoded_text":
            raise WireError(
                chunk_path, "chunk has no encoded_text (empty, or a chunk kind this server "
                "does not know)"
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % _TOKEN_DTYPE.itemsize:
            raise WireError(
                f"{chunk_path}.encoded_text.tokens",
                f"{len(raw)} bytes is not a whole number of int32 token ids (4 bytes each)",
            )
        parts.append(np.frombuffer(raw, dtype=_TOKEN_DTYPE))
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
    if tokens.size == 0:
        raise WireError(f"{path}.model_input", "the datum has no tokens")
    return tokens


class _DensifyBudget:
    """Bytes that densifying sparse tensors may still allocate for one request."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, nbytes: int, path: str) -> None:
        if nbytes > self.left:
            raise WireError(
                path,
                f"sparse_csr tensor densifies to {nbytes} bytes, over what is left of the "
                f"server's {self.limit}-byte limit on decoded data per request; send smaller "
                "batches",
            )
        self.left -= nbytes


def _decode_tensor(tensor: pb.Tensor, path: str, budget: _DensifyBudget) -> np.ndarray:
    dtype = _INPUT_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(
            f"{path}.dtype",
            f"unsupported dtype {_dtype_name(tensor.dtype)}; loss_fn_inputs must be "
            "DTYPE_FLOAT32 or DTYPE_INT64",
        )
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise WireError(f"{path}.shape", f"shape {shape} has a negative dimension")
    if tensor.WhichOneof("encoding") == "sparse_csr":
        return _decode_csr(tensor.sparse_csr, dtype, shape, path, budget)
    # An unset encoding is an empty dense tensor (proto3 default), checked against shape below.
    return _decode_dense(tensor.dense, dtype, shape, path)


def _dtype_name(value: int) -> str:
    try:
        return pb.DType.Name(value)
    except ValueError:
        return f"<unknown enum value {value}>"


def _frombuffer(raw: bytes, dtype: np.dtype, path: str, what: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise WireError(
            path,
            f"{len(raw)} bytes is not a whole number of {what} elements "
            f"({dtype.itemsize} bytes each)",
        )
    # astype copies into a writable, native-order array the server may hand to torch.
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))


def _decode_dense(raw: bytes, dtype: np.dtype, shape: list[int], path: str) -> np.ndarray:
    flat = _frombuffer(raw, dtype, f"{path}.dense", dtype.name)
    if not shape:
        return flat
    expected = math.prod(shape)
    if expected != flat.size:
        raise WireError(
            f"{path}.shape",
            f"shape {shape} needs {expected} elements but the dense data holds {flat.size}",
        )
    _check_representable(shape, dtype, path)
    return flat.reshape(shape)


def _check_representable(shape: list[int], dtype: np.dtype, path: str) -> None:
    # numpy refuses shapes whose non-zero dims overflow its size type even when a zero dim
    # makes the array empty (e.g. [0, 2**62]); report that as bad input, not a crash.
    if math.prod(dim for dim in shape if dim) * dtype.itemsize >= 2**62:
        raise WireError(f"{path}.shape", f"shape {shape} is too large to represent")


def _decode_csr(
    csr: pb.SparseCsr, dtype: np.dtype, shape: list[int], path: str, budget: _DensifyBudget
) -> np.ndarray:
    if len(shape) != 2:
        raise WireError(
            f"{path}.shape",
            f"a sparse_csr tensor needs its dense 2-D shape [rows, cols], got {shape}",
        )
    rows, cols = shape
    _check_representable(shape, dtype, path)
    # Charge the dense size before touching the data: it bounds every allocation below.
    budget.take(rows * cols * dtype.itemsize, path)
    csr_path = f"{path}.sparse_csr"
    values = _frombuffer(csr.values, dtype, f"{csr_path}.values", dtype.name)
    crow = _frombuffer(csr.crow_indices, _INDEX_DTYPE, f"{csr_path}.crow_indices", "int64")
    col = _frombuffer(csr.col_indices, _INDEX_DTYPE, f"{csr_path}.col_indices", "int64")
    check_csr(values, crow, col, rows, cols, csr_path)
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


def check_csr(
    values: np.ndarray,
    crow: np.ndarray,
    col: np.ndarray,
    rows: int,
    cols: int,
    field: str,
    *,
    crow_name: str = "crow_indices",
    col_name: str = "col_indices",
) -> None:
    """A CSR layout of a [rows, cols] tensor is well-formed (the JSON form of the SDK names the
    index arrays sparse_crow_indices / sparse_col_indices, the protobuf one crow/col_indices)."""
    crow_field, col_field = f"{field}.{crow_name}", f"{field}.{col_name}"
    if crow.size != rows + 1:
        raise WireError(crow_field, f"has {crow.size} entries but a {rows}-row tensor needs rows + 1 = {rows + 1}")
    if crow[0] != 0:
        raise WireError(crow_field, f"must start at 0, starts at {int(crow[0])}")
    if np.any(np.diff(crow) < 0):
        raise WireError(crow_field, "must be non-decreasing")
    nnz = int(crow[-1])
    if col.size != nnz or values.size != nnz:
        raise WireError(
            field,
            f"{crow_name} end at {nnz} entries but there are {col.size} {col_name} and "
            f"{values.size} values; all three must agree",
        )
    if nnz and (col.min() < 0 or col.max() >= cols):
        raise WireError(col_field, f"has a column outside [0, {cols}) for shape [{rows}, {cols}]")
    flat_positions = np.repeat(np.arange(rows, dtype=np.int64), np.diff(crow)) * cols + col
    if np.unique(flat_positions).size != nnz:
        raise WireError(col_field, "lists the same column twice within a row")


# --------------------------------------------------------------------------------------------
# forward_backward result
# --------------------------------------------------------------------------------------------


def encode_forward_backward_output(
    outputs: Sequence[Mapping[str, np.ndarray]],
    metrics: Mapping[str, float],
    loss_fn_output_type: str = "ArrayRecord",
) -> bytes:
    """Serialize per-datum outputs and metrics as a ``ForwardBackwardOutput`` protobuf.

    ``outputs[i]`` maps field names (e.g. ``"logprobs"``) to datum *i*'s array; every datum
    must have the same field names. Float arrays go out as float32, integer arrays as int64.
    Datums whose per-field trailing shapes (or dtypes) differ are emitted as several
    consecutive ``ArrayRecord``s, which the SDK concatenates.
    """
    datums = [_normalize_outputs(out, i) for i, out in enumerate(outputs)]
    _check_same_field_names(datums)
    _check_metric_keys(metrics)
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=loss_fn_output_type)
    for group in _rectangular_groups(datums):
        _append_record(msg, group)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


def _normalize_outputs(out: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    normalized: dict[str, np.ndarray] = {}
    for name, value in out.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        elif arr.dtype.kind in "iu" and np.can_cast(arr.dtype, np.int64):
            arr = arr.astype(np.int64, copy=False)
        else:
            raise ValueError(
                f"outputs[{index}][{name!r}] has dtype {arr.dtype}; the wire carries only "
                "float32 and int64"
            )
        # The SDK rebuilds each datum's shape as [n / prod(trailing), *trailing], which has at
        # least one dimension: a 0-d output comes back as shape [1] either way.
        normalized[name] = np.atleast_1d(arr)
    return normalized


def _check_same_field_names(datums: list[dict[str, np.ndarray]]) -> None:
    if not datums:
        return
    expected = set(datums[0])
    for i, datum in enumerate(datums[1:], start=1):
        if set(datum) != expected:
            raise ValueError(
                f"outputs[{i}] has fields {sorted(datum)} but outputs[0] has "
                f"{sorted(expected)}; every datum must return the same fields"
            )


def _check_metric_keys(metrics: Mapping[str, float]) -> None:
    # The SDK merges chunk metrics with `name, reduction = key.split(":")` and crashes otherwise.
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(
                f"metric key {key!r} must look like '<name>:<reduction>' with exactly one ':' "
                "(the SDK's metric merge crashes on anything else)"
            )


def _layout(datum: dict[str, np.ndarray]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {name: (arr.dtype, arr.shape[1:]) for name, arr in datum.items()}


def _rectangular_groups(
    datums: list[dict[str, np.ndarray]],
) -> list[list[dict[str, np.ndarray]]]:
    """Split datums into maximal consecutive runs with identical per-field dtype/trailing shape."""
    groups: list[list[dict[str, np.ndarray]]] = []
    for datum in datums:
        if groups and _layout(groups[-1][0]) == _layout(datum):
            groups[-1].append(datum)
        else:
            groups.append([datum])
    return groups


def _append_record(msg: pb.ForwardBackwardOutput, group: list[dict[str, np.ndarray]]) -> None:
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
    for name, (dtype, trailing) in _layout(group[0]).items():
        wire_dtype = np.dtype("<f4") if dtype == np.float32 else np.dtype("<i8")
        blobs = [datum[name].astype(wire_dtype, copy=False).tobytes() for datum in group]
        offsets = np.zeros(len(blobs) + 1, dtype=_INDEX_DTYPE)
        offsets[1:] = np.cumsum([len(blob) for blob in blobs])
        tensor = record.fields[name]
        tensor.data = b"".join(blobs)
        tensor.offsets = offsets.tobytes()
        tensor.dtype = pb.DTYPE_FLOAT32 if dtype == np.float32 else pb.DTYPE_INT64
        tensor.trailing_shape.extend(trailing)


# --------------------------------------------------------------------------------------------
# sample result
# --------------------------------------------------------------------------------------------


class TopkArrays(Protocol):
    """Top-k ids and logprobs at n positions (``workers.types.TopK`` is one)."""

    token_ids: np.ndarray  # [n, k] integer ids
    logprobs: np.ndarray  # [n, k]; (0, -99999.0) marks an empty cell, as the SDK expects


@dataclass(frozen=True, eq=False)
class TopkOut:
    token_ids: np.ndarray
    logprobs: np.ndarray


@dataclass(frozen=True)
class SampledSequenceOut:
    tokens: Sequence[int]
    logprobs: Sequence[float] | None
    stop_reason: Literal["stop", "length"]
    topk: TopkArrays | None = None  # topk_sampled_logprobs, [len(tokens), k]


def encode_sample_response(
    sequences: Sequence[SampledSequenceOut],
    prompt_logprobs: Sequence[float] | None = None,
    *,
    topk_prompt_logprobs: TopkArrays | None = None,
    target_prompt_logprobs: np.ndarray | None = None,
    target_prompt_logprobs_csr: tuple[np.ndarray, np.ndarray] | None = None,
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None,
    prompt_cache_hit_tokens: int = 0,
) -> bytes:
    """Serialize sampled sequences as a ``SampleResponse`` protobuf.

    ``prompt_logprobs`` (one per prompt token) may hold NaN where nothing was scored, e.g.
    position 0; the SDK shows NaN as ``None``. Fields left as ``None`` are omitted.

    * ``topk_prompt_logprobs``: ``[len(prompt), k]`` ids and logprobs (``TopkLogprobs``).
    * ``target_prompt_logprobs``: the dense float32 ``[len(prompt) - 1, K]`` logprobs. With
      ``target_prompt_logprobs_csr=(crow_indices, col_indices)`` (the request's CSR layout) it
      goes out as a CSR tensor with exactly those indices, otherwise dense: the response has the
      request's shape and layout.
    * ``prompt_alt_tokens``: ``(tokens, logprobs)``, both ``[len(prompt) - 1, k]``; sent as an
      int64 and a float32 dense tensor. Present even with zero rows (a 1-token prompt): the SDK
      raises if it asked for alt tokens and the field is absent.
    """
    msg = pb.SampleResponse()
    for i, seq in enumerate(sequences):
        _append_sequence(msg, seq, i)
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype=_LOGPROB_DTYPE).tobytes()
    if topk_prompt_logprobs is not None:
        _fill_topk(msg.topk_prompt_logprobs, topk_prompt_logprobs, "topk_prompt_logprobs")
    if target_prompt_logprobs is not None:
        _fill_target(msg.target_prompt_logprobs, target_prompt_logprobs, target_prompt_logprobs_csr)
    elif target_prompt_logprobs_csr is not None:
        raise ValueError("target_prompt_logprobs_csr without target_prompt_logprobs")
    if prompt_alt_tokens is not None:
        _fill_alt_tokens(msg.prompt_alt_tokens, prompt_alt_tokens)
    if prompt_cache_hit_tokens:
        msg.prompt_cache_hit_tokens = int(prompt_cache_hit_tokens)
    return msg.SerializeToString()


def _append_sequence(msg: pb.SampleResponse, seq: SampledSequenceOut, index: int) -> None:
    stop_reason = _STOP_REASONS.get(seq.stop_reason)
    if stop_reason is None:
        raise ValueError(
            f"sequences[{index}].stop_reason is {seq.stop_reason!r}; expected 'stop' or 'length'"
        )
    out = msg.sequences.add(stop_reason=stop_reason)
    out.tokens = np.asarray(seq.tokens, dtype=_TOKEN_DTYPE).tobytes()
    if seq.logprobs is not None:
        if len(seq.logprobs) != len(seq.tokens):
            raise ValueError(
                f"sequences[{index}] has {len(seq.tokens)} tokens but {len(seq.logprobs)} "
                "logprobs; they must align one to one"
            )
        out.logprobs = np.asarray(seq.logprobs, dtype=_LOGPROB_DTYPE).tobytes()
    if seq.topk is not None:
        where = f"sequences[{index}].topk"
        _fill_topk(out.topk_sampled_logprobs, seq.topk, where)
        if np.shape(seq.topk.token_ids)[0] != len(seq.tokens):
            raise ValueError(f"{where} has {np.shape(seq.topk.token_ids)[0]} rows for {len(seq.tokens)} tokens")


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: ids and logprobs must be 2-D of one shape, got {a.shape} and {b.shape}")
    return a, b


def _fill_topk(out: pb.TopkLogprobs, topk: TopkArrays, what: str) -> None:
    ids, logprobs = _pair(topk.token_ids, topk.logprobs, what)
    out.SetInParent()
    out.length, out.k = ids.shape
    out.token_ids = np.ascontiguousarray(ids, dtype=_TOKEN_DTYPE).tobytes()
    out.logprobs = np.ascontiguousarray(logprobs, dtype=_LOGPROB_DTYPE).tobytes()


def _fill_target(
    out: pb.Tensor, values: np.ndarray, csr: tuple[np.ndarray, np.ndarray] | None
) -> None:
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"target_prompt_logprobs must be 2-D, got shape {values.shape}")
    rows, cols = values.shape
    out.dtype = pb.DTYPE_FLOAT32
    out.shape.extend([rows, cols])
    if csr is None:
        out.dense = np.ascontiguousarray(values, dtype=_LOGPROB_DTYPE).tobytes()
        return
    crow, col = (np.asarray(x, dtype=np.int64) for x in csr)
    if crow.shape != (rows + 1,) or col.shape != (int(crow[-1]),) or np.any(np.diff(crow) < 0) or crow[0]:
        raise ValueError(
            f"target_prompt_logprobs_csr does not fit a [{rows}, {cols}] tensor "
            f"({crow.size} row pointers, {col.size} columns)"
        )
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(crow))
    out.sparse_csr.values = values[row_of, col].astype(_LOGPROB_DTYPE).tobytes()
    out.sparse_csr.crow_indices = crow.astype(_INDEX_DTYPE).tobytes()
    out.sparse_csr.col_indices = col.astype(_INDEX_DTYPE).tobytes()


def _fill_alt_tokens(out: pb.PromptAltTokens, alt: tuple[np.ndarray, np.ndarray]) -> None:
    tokens, logprobs = _pair(alt[0], alt[1], "prompt_alt_tokens")
    out.SetInParent()
    out.tokens.dtype = pb.DTYPE_INT64
    out.tokens.shape.extend(tokens.shape)
    out.tokens.dense = np.ascontiguousarray(tokens, dtype=_INDEX_DTYPE).tobytes()
    out.logprobs.dtype = pb.DTYPE_FLOAT32
    out.logprobs.shape.extend(logprobs.shape)
    out.logprobs.dense = np.ascontiguousarray(logprobs, dtype=_LOGPROB_DTYPE).tobytes()
