"""JSON codecs for the request and result shapes of older tinker SDKs (0.16.1 .. 0.24.x).

Those SDKs send ``forward_backward`` and ``forward`` as JSON (``POST /api/v1/forward_backward``
with ``Content-Type: application/json``, ``POST /api/v1/forward``) and 0.16.1 reads every result
as JSON (its ``retrieve_future`` sends ``Accept: application/json``). This module only converts:

* ``decode_forward_backward_json``: a JSON ``ForwardBackwardRequest`` / ``ForwardRequest`` into the
  very ``ForwardBackwardCall`` that ``schemas.wire.decode_forward_backward_request`` produces. The
  JSON is rebuilt as the equivalent protobuf message and handed to that decoder, so every check
  (dtypes, shapes, CSR, size budget) and every error field path is the protobuf path's.
* ``forward_backward_output_to_json`` / ``sample_response_to_json`` (and ``result_to_json``): our
  protobuf results as the JSON bodies the old SDKs validate (their ``ForwardBackwardOutput`` and
  ``SampleResponse``).

Old request shapes: 0.16.1 dumps with ``exclude_unset=True`` (no ``type`` on chunks, explicit
``null`` where the user passed ``None``); 0.18-0.24 with ``exclude_none=True`` (chunks carry
``type``; ``TensorData`` may be CSR). ``null`` always means absent. Bad input raises
``WireError(field, message)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import tinker_wire_pb2 as pb
from schemas.tinker import EncodedTextChunk, ImageChunk, ModelInput
from schemas.wire import (
    MAX_DATUMS,
    ForwardBackwardCall,
    WireError,
    check_datum_count,
    decode_forward_backward_request,
)

__all__ = [
    "decode_forward_backward_json",
    "forward_backward_output_to_json",
    "model_and_seq_of",
    "result_to_json",
    "sample_response_to_json",
    "MASK_LOGPROB",
]

MASK_LOGPROB = -99999.0  # an empty top-k cell is (token 0, MASK_LOGPROB), as the SDK expects

_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (pb.DTYPE_FLOAT32, np.dtype("<f4")),
    "int64": (pb.DTYPE_INT64, np.dtype("<i8")),
}
_DTYPE_NAMES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_INT64: "int64"}
_STOP_REASONS = {pb.STOP_REASON_STOP: "stop", pb.STOP_REASON_LENGTH: "length"}


# --------------------------------------------------------------------------------------------
# forward_backward / forward request (JSON, SDK -> server)
# --------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TensorDataJSON(_Body):
    """Flat ``data`` in ``dtype``; ``shape`` absent: 1-D; CSR when the two index lists are set
    (0.24 sends 2-D torch tensors that way). The whole-number and range checks of int64 data
    are made when the numbers are packed."""

    data: list[float | int]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


class DatumJSON(_Body):
    model_input: ModelInput  # chunks with or without "type"
    loss_fn_inputs: dict[str, TensorDataJSON] = Field(default_factory=dict)


class ForwardBackwardInputJSON(_Body):
    data: list[DatumJSON]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None = None  # null: none


class ForwardBackwardRequestJSON(_Body):
    """``POST /api/v1/forward_backward`` with a JSON body."""

    forward_backward_input: ForwardBackwardInputJSON
    model_id: str
    seq_id: int | None = None  # absent: 0, as in an unset protobuf field


class ForwardRequestJSON(_Body):
    """``POST /api/v1/forward``: the same input under ``forward_input``; runs forward only."""

    forward_input: ForwardBackwardInputJSON
    model_id: str
    seq_id: int | None = None


def decode_forward_backward_json(
    body: bytes | str | Mapping[str, Any],
    *,
    forward_only: bool,
    max_decompressed_bytes: int = 256 * 2**20,
    max_datums: int = MAX_DATUMS,
) -> ForwardBackwardCall:
    """Decode a JSON ``ForwardBackwardRequest`` (``forward_only=False``) or ``ForwardRequest``
    (``forward_only=True``) into a ``ForwardBackwardCall``. Raises ``WireError``."""
    raw = _load(body) if isinstance(body, (bytes, bytearray, str)) else body
    model = ForwardRequestJSON if forward_only else ForwardBackwardRequestJSON
    try:
        req = model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise WireError(_field_path(err["loc"]), f"{err['msg']} (JSON {model.__name__[:-4]} body)") from None
    inp = req.forward_input if isinstance(req, ForwardRequestJSON) else req.forward_backward_input
    msg = pb.ForwardBackwardRequest(
        model_id=req.model_id, seq_id=_int32(req.seq_id or 0, "seq_id"), loss_fn=inp.loss_fn,
        forward_only=forward_only,
    )
    for key, value in (inp.loss_fn_config or {}).items():
        if isinstance(value, str):
            msg.loss_fn_config_v2[key].text = value
        else:
            msg.loss_fn_config_v2[key].number = value
    check_datum_count(len(inp.data) or 1, max_datums)  # none at all: decoding says so, after model_id
    for i, datum in enumerate(inp.data):
        _datum_to_proto(datum, msg.data.add(), f"data[{i}]")
    return decode_forward_backward_request(msg.SerializeToString(), max_decompressed_bytes=max_decompressed_bytes,
                                           max_datums=max_datums)


def model_and_seq_of(body: bytes, content_encoding: str | None = None) -> tuple[object, object]:
    """``(model_id, seq_id)`` as a JSON body names them, for releasing the seq_id of a refused
    request; ``(None, None)`` when the body is not a JSON object."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None, None
    return (raw.get("model_id"), raw.get("seq_id")) if isinstance(raw, dict) else (None, None)


def _load(body: bytes | bytearray | str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise WireError("body", f"not valid JSON ({exc})") from None


_UNION_MEMBER_NAMES = {"int", "float", "str", "bool"}  # pydantic names the union member it tried


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location in the protobuf decoder's notation:
    ``("forward_backward_input", "data", 3, "loss_fn_inputs", "weights", "dtype")`` ->
    ``data[3].loss_fn_inputs.weights.dtype``; ``model_input.chunks[j]`` -> ``model_input[j]``."""
    parts = list(loc)
    if parts and parts[0] in ("forward_backward_input", "forward_input") and len(parts) > 1:
        parts = parts[1:]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "chunks" and i and parts[i - 1] == "model_input":
            continue
        elif part not in _UNION_MEMBER_NAMES and not str(part).startswith(("list[", "dict[", "function-")):
            out += f".{part}" if out else str(part)
    return out or "body"


def _int32(value: int, field: str) -> int:
    if not -(2**31) <= value < 2**31:
        raise WireError(field, f"{value} does not fit in int32")
    return value


def _datum_to_proto(datum: DatumJSON, out: pb.Datum, path: str) -> None:
    for j, chunk in enumerate(datum.model_input.chunks):
        where = f"{path}.model_input[{j}]"
        if isinstance(chunk, EncodedTextChunk):
            out.model_input.add().encoded_text.tokens = _array(chunk.tokens, np.dtype("<i4"), f"{where}.tokens")
        elif isinstance(chunk, ImageChunk):
            out.model_input.add().image.format = chunk.format  # the decoder refuses it with its reason
        else:
            raise WireError(where, f"{chunk.type} chunks are not supported: this server's base models are text-only")
    for name, tensor in datum.loss_fn_inputs.items():
        _tensor_to_proto(tensor, out.loss_fn_inputs[name], f"{path}.loss_fn_inputs.{name}")


def _tensor_to_proto(tensor: TensorDataJSON, out: pb.Tensor, path: str) -> None:
    enum, dtype = _DTYPES[tensor.dtype]
    out.dtype = enum
    out.shape.extend(tensor.shape or [])
    values = _array(tensor.data, dtype, f"{path}.data")
    if tensor.sparse_crow_indices is None and tensor.sparse_col_indices is None:
        out.dense = values
        return
    if tensor.sparse_crow_indices is None or tensor.sparse_col_indices is None:
        raise WireError(path, "a sparse tensor needs both sparse_crow_indices and sparse_col_indices")
    out.sparse_csr.values = values
    out.sparse_csr.crow_indices = _array(tensor.sparse_crow_indices, np.dtype("<i8"), f"{path}.sparse_crow_indices")
    out.sparse_csr.col_indices = _array(tensor.sparse_col_indices, np.dtype("<i8"), f"{path}.sparse_col_indices")


def _array(values: list[float | int] | list[int], dtype: np.dtype, path: str) -> bytes:
    """JSON numbers as little-endian bytes of ``dtype``; integers must be whole and in range."""
    try:
        arr = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    except (OverflowError, ValueError) as exc:
        raise WireError(path, f"not a list of numbers ({exc})") from None
    if arr.size and dtype.kind == "i":
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise WireError(path, f"{dtype.name} data must be whole numbers")
        elif arr.dtype.kind not in "iu":
            raise WireError(path, f"not a list of {dtype.name} numbers")
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise WireError(path, f"a value is outside the {dtype.name} range")
    return arr.astype(dtype).tobytes()


# --------------------------------------------------------------------------------------------
# results (protobuf, as stored -> JSON, server -> SDK)
# --------------------------------------------------------------------------------------------


def result_to_json(kind: str, raw: bytes) -> bytes | None:
    """The JSON body for a stored protobuf result of a future of this ``kind``
    (``forward_backward``, ``forward``, ``sample``); ``None`` if the kind has no JSON shape.

    Numbers are written as Python's ``json`` writes them: a non-finite float in a tensor goes out
    as ``NaN`` / ``Infinity``, which ``json.loads`` (and so every tinker SDK) reads back. Prompt
    logprobs that were not scored (NaN) go out as ``null``, as the SDK's type declares them."""
    if kind in ("forward_backward", "forward"):
        out: dict[str, Any] = forward_backward_output_to_json(raw)
    elif kind == "sample":
        out = sample_response_to_json(raw)
    else:
        return None
    return json.dumps(out, separators=(",", ":")).encode()


def forward_backward_output_to_json(raw: bytes) -> dict[str, Any]:
    """A ``ForwardBackwardOutput`` protobuf as the old SDKs' JSON ``ForwardBackwardOutput``:
    ``{"loss_fn_output_type", "loss_fn_outputs": [{name: {data, dtype, shape}}, ...], "metrics"}``.
    ``TensorData`` carries exactly ``data``/``dtype``/``shape`` (0.16.1 forbids other keys)."""
    msg = pb.ForwardBackwardOutput.FromString(raw)
    outputs: list[dict[str, Any]] = []
    for record in msg.loss_fn_outputs:
        datums: list[dict[str, Any]] = [{} for _ in range(record.num_datums)]
        for name, tensor in record.fields.items():
            dtype_name = _DTYPE_NAMES[tensor.dtype]
            values = np.frombuffer(tensor.data, dtype=_DTYPES[dtype_name][1])
            offsets = np.frombuffer(tensor.offsets, dtype="<i8") // values.itemsize
            trailing = list(tensor.trailing_shape)
            per_row = math.prod(trailing)
            for i, datum in enumerate(datums):
                flat = values[offsets[i]: offsets[i + 1]]
                shape = [flat.size // per_row if per_row else 0, *trailing]
                datum[name] = {"data": flat.tolist(), "dtype": dtype_name, "shape": shape}
        outputs.extend(datums)
    return {
        "loss_fn_output_type": msg.loss_fn_output_type,
        "loss_fn_outputs": outputs,
        "metrics": {key: float(value) for key, value in msg.metrics.items()},
    }


def sample_response_to_json(raw: bytes) -> dict[str, Any]:
    """A ``SampleResponse`` protobuf as the old SDKs' JSON ``SampleResponse``: sequences with
    ``stop_reason``/``tokens``/``logprobs``, ``prompt_logprobs`` (``null`` where not scored) and
    ``topk_prompt_logprobs`` (per position a list of ``[token_id, logprob]`` or ``null``). Fields
    no old SDK can ask for (sampled top-k, target logprobs, alternative tokens) are left out."""
    msg = pb.SampleResponse.FromString(raw)
    sequences = []
    for seq in msg.sequences:
        out: dict[str, Any] = {
            "stop_reason": _STOP_REASONS[seq.stop_reason],
            "tokens": np.frombuffer(seq.tokens, dtype="<i4").tolist(),
        }
        if seq.HasField("logprobs"):
            out["logprobs"] = np.frombuffer(seq.logprobs, dtype="<f4").tolist()
        sequences.append(out)
    body: dict[str, Any] = {"type": "sample", "sequences": sequences}
    if msg.HasField("prompt_logprobs"):
        body["prompt_logprobs"] = [
            None if math.isnan(x) else x for x in np.frombuffer(msg.prompt_logprobs, dtype="<f4").tolist()
        ]
    if msg.HasField("topk_prompt_logprobs"):
        body["topk_prompt_logprobs"] = _topk_rows(msg.topk_prompt_logprobs)
    return body


def _topk_rows(topk: pb.TopkLogprobs) -> list[list[list[int | float]] | None]:
    n, k = topk.length, topk.k
    ids = np.frombuffer(topk.token_ids, dtype="<i4").reshape(n, k).tolist()
    lps = np.frombuffer(topk.logprobs, dtype="<f4").reshape(n, k).tolist()
    rows: list[list[list[int | float]] | None] = []
    for row_ids, row_lps in zip(ids, lps):
        cells = [[t, lp] for t, lp in zip(row_ids, row_lps) if not (t == 0 and lp == MASK_LOGPROB)]
        rows.append(cells or None)
    return rows

