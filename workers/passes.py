"""A forward(_backward) request as passes of bounded size, and target logprobs in bounded memory.

A pass is a group of whole datums whose padded size (datums × longest datum) is at most the pass
budget; a datum longer than the budget is a pass of its own (it is bounded by the model's context
length). Datums are sorted longest first before packing, which keeps padding low. Every loss is a
sum over datums, so the passes' gradients add up to the one-pass gradient.

Target logprobs are `logit[target] - logsumexp(logits)` over at most `logit_elements` logits at a
time, each chunk under activation checkpointing when gradients are wanted: the backward recomputes
a chunk's logits instead of keeping them, so no [tokens, vocab] tensor of a whole pass, let alone
a whole request, is ever alive. They are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from schemas.wire import DatumIn
from workers.peft_host import Runs


def plan_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Datum indices per pass: longest first, each pass's padded size at most `budget`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the pass's first datum sets its padded width.
        if passes and (len(passes[-1]) + 1) * lengths[passes[-1][0]] <= budget:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None  # None when every datum has the same length
    targets: torch.Tensor  # [B, T] long
    inputs: dict[str, torch.Tensor]  # per-token float inputs, [B, T], zero padded
    mask: torch.Tensor  # [B, T] float, 1 on real positions
    lengths: list[int]

    @classmethod
    def build(
        cls, data: list[DatumIn], float_inputs: dict[str, float], pad_token_id: int, device: torch.device
    ) -> Batch:
        """`float_inputs`: the per-token float inputs to pad, each with the value that fills it for
        a datum that left it out."""
        lengths = [len(d.tokens) for d in data]
        width = max(lengths)
        mask = torch.zeros(len(data), width)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1.0
        return cls(
            input_ids=_pad([d.tokens for d in data], lengths, width, pad_token_id, torch.long).to(device),
            attention_mask=None if len(set(lengths)) == 1 else mask.long().to(device),
            targets=_pad([d.loss_fn_inputs["target_tokens"] for d in data], lengths, width, 0, torch.long).to(device),
            inputs=padded_inputs(data, float_inputs, width, device),
            mask=mask.to(device),
            lengths=lengths,
        )


def padded_inputs(
    data: list[DatumIn], float_inputs: dict[str, float], width: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The per-token float inputs of `data`, [B, width] each, zero padded; `float_inputs` as in
    Batch.build. (A packed pass builds them per part: each part's loss has its own.)"""
    lengths = [len(d.tokens) for d in data]
    return {
        key: _pad([d.loss_fn_inputs.get(key) for d in data], lengths, width, 0, torch.float32, missing=fill).to(device)
        for key, fill in float_inputs.items()
    }


def _pad(
    rows: list[np.ndarray | None],
    lengths: list[int],
    width: int,
    pad: float,
    dtype: torch.dtype,
    missing: float = 0.0,
) -> torch.Tensor:
    """Right-pad rows to `width`; a missing row (an optional input the client left out) is filled
    with `missing` over its datum's length."""
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row is None:
            out[i, :n] = missing
        else:
            out[i, :n] = torch.from_numpy(np.ascontiguousarray(row).reshape(-1)[:n]).to(dtype)
    return out


Head = Callable[..., torch.Tensor]  # hidden states [N, H] (and, routed, their runs of adapters) -> logits [N, V]


def target_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: Head, vocab: int, logit_elements: int,
    runs: Runs | None = None,
) -> torch.Tensor:
    """log p(target) for hidden states [..., H] and targets [...], in float32, never holding more
    than about `logit_elements` logits at once (plus the same again for their gradient).
    `runs`: in a packed pass, which adapter takes how many rows of a [B, T, H] `hidden`; the head
    is then called as head(states, routes=runs of those states), since a chunk of flattened
    states no longer says which row each came from."""
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    step = max(1, logit_elements // max(vocab, 1))
    chunked = torch.is_grad_enabled() and flat_h.requires_grad and flat_h.shape[0] > step
    pieces = []
    for start in range(0, flat_h.shape[0], step):
        h, t = flat_h[start : start + step], flat_t[start : start + step]
        routes = None if runs is None else _state_runs(runs, shape[-1], start, start + h.shape[0])
        args = (head, h, t, routes)
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if chunked else _chunk_logprobs(*args))
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(shape)


def _state_runs(runs: Runs, width: int, start: int, stop: int) -> Runs:
    """The runs of flattened states [start, stop) of rows `width` long, from the runs of rows."""
    out: Runs = []
    first = 0  # the first flattened state of the current run of rows
    for name, rows in runs:
        lo, hi = max(first, start), min(first + rows * width, stop)
        if lo < hi:
            out.append((name, hi - lo))
        first += rows * width
    return out


def _chunk_logprobs(head: Head, hidden: torch.Tensor, targets: torch.Tensor, routes: Runs | None) -> torch.Tensor:
    logits = (head(hidden) if routes is None else head(hidden, routes=routes)).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class ActivationCost:
    """Bytes of activations one token keeps for the backward pass: with every decoder layer's
    intermediates kept (`full`), or with the layers checkpointed (`checkpointed`: each layer's
    input, plus one layer's intermediates and their gradients while it is recomputed; measured
    on tiny-qwen3: 93 KB a token, against 220 KB unchecked)."""

    full: int
    checkpointed: int


# Per decoder layer and token, in float32 values: about 28 of the hidden size and 8 of the MLP's
# (measured on tiny-qwen3: 220 KB a token over 4 layers of 256 / 768, attention by SDPA).
_HIDDEN_FACTOR, _MLP_FACTOR = 28, 8
MIN_TOKENS_PER_PASS, MAX_TOKENS_PER_PASS = 256, 1 << 16


def activation_cost(config: object) -> ActivationCost:
    hidden = int(getattr(config, "hidden_size", 1024))
    mlp = int(getattr(config, "intermediate_size", 4 * hidden))
    layers = int(getattr(config, "num_hidden_layers", 12))
    layer = 4 * (_HIDDEN_FACTOR * hidden + _MLP_FACTOR * mlp)
    return ActivationCost(full=layers * layer, checkpointed=layers * 4 * hidden + 2 * layer)


def tokens_per_pass(cost: ActivationCost, memory_bytes: int, *, checkpointing: bool) -> int:
    """How many tokens one pass may hold to keep its activations within `memory_bytes`."""
    per_token = cost.checkpointed if checkpointing else cost.full
    return max(MIN_TOKENS_PER_PASS, min(MAX_TOKENS_PER_PASS, memory_bytes // per_token))


@contextmanager
def checkpointed(layers: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Run each layer under activation checkpointing: the forward keeps only the layer's inputs,
    and the backward recomputes the rest, one layer at a time. Computes bit-identical values and
    gradients; costs one more forward of the layers."""
    wrapped = list(layers)
    originals = [layer.forward for layer in wrapped]
    for layer, forward in zip(wrapped, originals):
        layer.forward = functools.partial(_checkpointed_call, forward)
    try:
        yield
    finally:
        for layer, forward in zip(wrapped, originals):
            layer.forward = forward


def _checkpointed_call(forward: Callable[..., object], *args: object, **kwargs: object) -> object:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
