"""Checks on client data that need to know the served model (vocabulary, context length) or the
losses. They run at submission, so a bad request fails at once with a 400 naming the field,
before it takes a place in the model's queue."""

from __future__ import annotations

import numpy as np

from schemas.wire import DatumIn, ForwardBackwardCall
from server.errors import InvalidRequest
from workers.losses import LOSSES, LossFn, get_loss
from workers.types import BaseModelInfo, CustomLossSpec

INT_INPUTS = {"target_tokens"}
# Loss names the SDK can send that this server does not offer, and why.
UNOFFERED = {
    "stable_reinforce": "its objective and the sampler-side stability records it reads are not publicly "
    "documented, so it cannot be reproduced faithfully; use importance_sampling, ppo or cispo",
}


def check_forward_backward(call: ForwardBackwardCall, base: BaseModelInfo) -> LossFn:
    """Checks a call to a built-in loss (custom losses: check_custom_loss_data)."""
    loss = get_loss(call.loss_fn)
    if call.loss_fn in UNOFFERED:
        raise InvalidRequest(f"loss_fn {call.loss_fn!r} is not offered: {UNOFFERED[call.loss_fn]}", field="loss_fn")
    if loss is None:
        raise InvalidRequest(
            f"unknown loss_fn {call.loss_fn!r}; this server implements {', '.join(sorted(LOSSES))} "
            "and custom (a loss uploaded with create_custom_loss)",
            field="loss_fn",
        )
    for key, value in call.loss_fn_config.items():
        if key not in loss.config_defaults:
            known = ", ".join(sorted(loss.config_defaults)) or "none"
            raise InvalidRequest(
                f"{call.loss_fn} takes no config key {key!r} (known keys: {known})", field=f"loss_fn_config.{key}"
            )
        if isinstance(value, str):
            raise InvalidRequest(f"{key} must be a number, got {value!r}", field=f"loss_fn_config.{key}")
    if not call.data:
        raise InvalidRequest("no datums: send at least one", field="data")
    for i, datum in enumerate(call.data):
        _check_datum(datum, loss, base, f"data[{i}]")
    return loss


def _check_datum(datum: DatumIn, loss: LossFn, base: BaseModelInfo, path: str) -> None:
    n = len(datum.tokens)
    if n > base.max_context_length:
        raise InvalidRequest(
            f"{n} tokens exceed the base model's context length {base.max_context_length}", field=f"{path}.model_input"
        )
    check_token_ids(datum.tokens, base, f"{path}.model_input")
    for key in loss.required_inputs:
        if key not in datum.loss_fn_inputs:
            raise InvalidRequest(f"{loss.name} needs loss_fn_inputs[{key!r}]", field=f"{path}.loss_fn_inputs.{key}")
    for key in (*loss.required_inputs, *loss.optional_inputs):
        if (value := datum.loss_fn_inputs.get(key)) is not None:
            _check_input(key, value, n, base, f"{path}.loss_fn_inputs.{key}")


def _check_input(key: str, value: np.ndarray, n: int, base: BaseModelInfo, field: str) -> None:
    if value.ndim != 1:
        raise InvalidRequest(f"must be 1-D with one entry per input token, got shape {list(value.shape)}", field=field)
    if value.shape[0] != n:
        raise InvalidRequest(
            f"has {value.shape[0]} entries but model_input has {n} tokens (one entry per input token)", field=field
        )
    if key in INT_INPUTS:
        if not np.issubdtype(value.dtype, np.integer):
            raise InvalidRequest(f"must hold integer token ids, got {value.dtype}", field=field)
        check_token_ids(value, base, field)
    elif not np.all(np.isfinite(value)):
        raise InvalidRequest("contains NaN or infinity", field=field)


def check_token_ids(tokens: np.ndarray, base: BaseModelInfo, field: str) -> None:
    if len(tokens) == 0:
        raise InvalidRequest("is empty: send at least one token", field=field)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= base.vocab_size:
        bad = low if low < 0 else high
        raise InvalidRequest(
            f"token id {bad} is outside the vocabulary of {base.name} (0..{base.vocab_size - 1})", field=field
        )


def check_custom_loss_data(call: ForwardBackwardCall, spec: CustomLossSpec, base: BaseModelInfo) -> None:
    """The datums of a call to an uploaded loss carry every input it declares, at its rank."""
    ranks = dict(spec.inputs)
    if ranks.get("logprobs") != 1:
        raise InvalidRequest(
            f"custom loss {spec.name!r} takes logprobs of rank {ranks.get('logprobs')}; this server computes "
            "one logprob per target token (rank 1)", field="loss_fn_config.loss_id",
        )
    if not call.data:
        raise InvalidRequest("no datums: send at least one", field="data")
    for i, datum in enumerate(call.data):
        path = f"data[{i}]"
        n = len(datum.tokens)
        if n > base.max_context_length:
            raise InvalidRequest(f"{n} tokens exceed the base model's context length {base.max_context_length}",
                                 field=f"{path}.model_input")
        check_token_ids(datum.tokens, base, f"{path}.model_input")
        if "target_tokens" not in datum.loss_fn_inputs:
            raise InvalidRequest("needs loss_fn_inputs['target_tokens']", field=f"{path}.loss_fn_inputs.target_tokens")
        _check_input("target_tokens", datum.loss_fn_inputs["target_tokens"], n, base,
                     f"{path}.loss_fn_inputs.target_tokens")
        for name, rank in spec.inputs[1:]:
            value = datum.loss_fn_inputs.get(name)
            field = f"{path}.loss_fn_inputs.{name}"
            if value is None:
                raise InvalidRequest(f"custom loss {spec.name!r} needs input {name!r}", field=field)
            if value.ndim != rank and not (rank == 0 and value.size == 1):
                raise InvalidRequest(f"custom loss {spec.name!r} declares {name!r} with rank {rank}, got shape "
                                     f"{list(value.shape)}", field=field)
