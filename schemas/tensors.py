"""Checks and conversions for the options of a ``SampleRequest`` (numpy only, no torch).

* ``decode_target_ids``: the JSON ``TensorData`` of ``target_prompt_logprobs`` (int64, dense or
  sparse CSR) into the dense id array the sampler needs, plus the request's CSR layout, which the
  response must repeat (``encode_sample_response(target_prompt_logprobs_csr=...)``).
* ``check_sample_options``: the bounds that need the prompt length or the vocabulary size.

Everything a client can get wrong raises ``WireError(field, message)`` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from schemas.wire import WireError, check_csr

__all__ = [
    "DEFAULT_MAX_CELLS",
    "NO_TARGET",
    "TargetIds",
    "TensorDataLike",
    "check_sample_options",
    "decode_target_ids",
]

NO_TARGET = -1  # a target_prompt_logprobs cell that requests nothing
# Bound on len(prompt) * k for every per-position option (top-k width, alt draws, target ids):
# the dense arrays the server builds for one request stay within a few tens of MB.
DEFAULT_MAX_CELLS = 1 << 22


class TensorDataLike(Protocol):
    """``schemas.tinker.TensorData`` (the JSON form), or anything shaped like it."""

    data: Sequence[int] | Sequence[float]
    dtype: str
    shape: Sequence[int] | None
    sparse_crow_indices: Sequence[int] | None
    sparse_col_indices: Sequence[int] | None


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make `==` ambiguous
class TargetIds:
    # int64 [len(prompt) - 1, K]; NO_TARGET (-1) where nothing is requested, including every
    # cell a CSR request leaves out
    ids: np.ndarray
    # The request's CSR layout (crow_indices int64 [rows + 1], col_indices int64 [nnz]);
    # None when the request was dense. The response must use the same layout.
    csr: tuple[np.ndarray, np.ndarray] | None = None


def decode_target_ids(
    tensor: TensorDataLike,
    *,
    prompt_len: int,
    vocab_size: int,
    field: str = "target_prompt_logprobs",
    max_cells: int = DEFAULT_MAX_CELLS,
) -> TargetIds:
    """Validate ``SampleRequest.target_prompt_logprobs`` and densify it.

    It must be int64 with shape ``[prompt_len - 1, K]``; each cell is -1 or a token id in
    ``[0, vocab_size)``, and at least one cell names an id. A CSR tensor must be well formed
    (rows + 1 non-decreasing row pointers from 0, columns in range and distinct within a row).
    """
    if tensor.dtype != "int64":
        raise WireError(f"{field}.dtype", f"must be int64 token ids, got {tensor.dtype}")
    shape = list(tensor.shape) if tensor.shape is not None else None
    rows = prompt_len - 1
    if shape is None or len(shape) != 2:
        raise WireError(
            f"{field}.shape", f"must be 2-D [len(prompt) - 1, K] = [{rows}, K], got {shape}"
        )
    if shape[0] != rows:
        raise WireError(
            f"{field}.shape",
            f"has {shape[0]} rows but the prompt has {prompt_len} tokens; row i scores prompt "
            f"position i + 1, so it needs len(prompt) - 1 = {rows} rows",
        )
    cols = shape[1]
    if cols < 0:
        raise WireError(f"{field}.shape", f"shape {shape} has a negative dimension")
    if rows * cols > max_cells:
        raise WireError(
            f"{field}.shape",
            f"{rows} x {cols} = {rows * cols} cells is over the server's limit of {max_cells}",
        )
    values = _int_array(tensor.data, f"{field}.data")
    csr = None
    if tensor.sparse_crow_indices is not None or tensor.sparse_col_indices is not None:
        crow = _int_array(tensor.sparse_crow_indices, f"{field}.sparse_crow_indices")
        col = _int_array(tensor.sparse_col_indices, f"{field}.sparse_col_indices")
        check_csr(values, crow, col, rows, cols, field, crow_name="sparse_crow_indices", col_name="sparse_col_indices")
        ids = np.full((rows, cols), NO_TARGET, dtype=np.int64)
        ids[_csr_rows(crow), col] = values
        csr = (crow, col)
    else:
        if values.size != rows * cols:
            raise WireError(
                f"{field}.data",
                f"holds {values.size} values but shape {shape} needs {rows * cols}",
            )
        ids = values.reshape(rows, cols)
    bad = (ids != NO_TARGET) & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, col_index = (int(x) for x in np.argwhere(bad)[0])
        raise WireError(
            f"{field}.data",
            f"cell [{row}, {col_index}] is {int(ids[row, col_index])}: ids must be -1 (nothing "
            f"requested) or in [0, {vocab_size}), the model's vocabulary",
        )
    if not (ids != NO_TARGET).any():
        raise WireError(field, "names no token id (every cell is -1); request at least one")
    return TargetIds(ids=ids, csr=csr)


def check_sample_options(
    *,
    prompt_len: int,
    vocab_size: int,
    prompt_logprobs: bool = False,
    prompt_logprobs_last_n: int | None = None,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
    prompt_alt_tokens_k: int = 0,
    num_samples: int = 1,
    max_tokens: int = 1,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> None:
    """The bounds of the SampleRequest options that depend on the prompt or the model. Every
    bound is on the real size of what would be computed and sent back: top-k of sampled tokens is
    num_samples x max_tokens rows of k cells, and the samples themselves num_samples x max_tokens
    tokens.

    (``target_prompt_logprobs`` is checked by ``decode_target_ids``.)
    """
    if num_samples * max(max_tokens, 1) > max_cells:
        raise WireError(
            "num_samples",
            f"num_samples x max_tokens = {num_samples} x {max_tokens} = {num_samples * max_tokens} tokens is over "
            f"the server's limit of {max_cells}",
        )
    if prompt_len < 1:
        raise WireError("prompt", "the prompt has no tokens")
    if prompt_logprobs_last_n is not None:
        if not prompt_logprobs:
            raise WireError(
                "prompt_logprobs_last_n", "applies to prompt logprobs; set prompt_logprobs"
            )
        if not 1 <= prompt_logprobs_last_n <= prompt_len - 1:
            raise WireError(
                "prompt_logprobs_last_n",
                f"must be between 1 and len(prompt) - 1 = {prompt_len - 1}, got "
                f"{prompt_logprobs_last_n}",
            )
    sampled = num_samples * max(max_tokens, 1)
    for name, k, rows, what in (
        ("topk_prompt_logprobs", topk_prompt_logprobs, prompt_len, "len(prompt)"),
        ("topk_sample_logprobs", topk_sample_logprobs, sampled, "num_samples x max_tokens"),
        ("prompt_alt_tokens_k", prompt_alt_tokens_k, prompt_len - 1, "len(prompt) - 1"),
    ):
        if k < 0:
            raise WireError(name, f"must be 0 or greater, got {k}")
        if k > vocab_size:
            raise WireError(name, f"{k} is larger than the model's vocabulary ({vocab_size} tokens)")
        if rows * k > max_cells:
            raise WireError(
                name, f"{what} x {k} = {rows * k} is over the server's limit of {max_cells}"
            )


def _int_array(values: Sequence[int] | Sequence[float] | None, field: str) -> np.ndarray:
    if values is None:
        raise WireError(field, "missing: sparse_crow_indices and sparse_col_indices go together")
    try:
        arr = np.asarray(values)
    except (OverflowError, ValueError):
        raise WireError(field, "must be a flat list of int64 integers") from None
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise WireError(field, "must be a flat list of int64 integers")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(np.abs(arr) >= 2**63):
            raise WireError(field, "must hold int64 integers")
    elif arr.dtype.kind == "u":
        if np.any(arr >= 2**63):
            raise WireError(field, "has a value outside int64")
    elif arr.dtype.kind != "i":  # e.g. object: a Python int beyond 64 bits
        raise WireError(field, "must hold int64 integers")
    return arr.astype(np.int64)


def _csr_rows(crow: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(crow.size - 1, dtype=np.int64), np.diff(crow))
