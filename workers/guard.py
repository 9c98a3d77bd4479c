"""Errors cross the engine boundary as data: `Failure(category, message)`.

A worker-side error about the request (a bad checkpoint, an adapter that cannot take it, a
custom loss that fails) is the caller's to fix: category `user`, with the error's own message.
Anything else is logged here, where its traceback is, and crosses as a `server` failure. A
remote engine returns the same value across a process boundary, where exception types would
not survive."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from workers.adapter_files import CheckpointFormatError
from workers.custom_loss import CustomLossError
from workers.native_args import NativeArgError
from workers.peft_host import AdapterError
from workers.sampler import NonFiniteLogits

log = logging.getLogger(__name__)
T = TypeVar("T")
USER_ERRORS = (AdapterError, CheckpointFormatError, CustomLossError, NativeArgError, NonFiniteLogits)


@dataclass(frozen=True)
class Failure:
    category: Literal["user", "server"]
    message: str
    field: str | None = None  # the request field at fault (errors that name one, e.g. NativeArgError)


def guarded(fn: Callable[..., T], *args: object, **kwargs: object) -> T | Failure:
    """`fn(*args, **kwargs)`, or the Failure it ended in."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every error crosses as data
        return failure_of(exc, getattr(fn, "__qualname__", repr(fn)))


def failure_of(exc: Exception, call: str) -> Failure:
    """The Failure an error in engine call `call` crosses as (a server error is logged here, with
    its traceback: call this inside the `except` that caught it)."""
    if isinstance(exc, USER_ERRORS):
        return Failure("user", str(exc), getattr(exc, "field", None))
    log.error("engine_call_crashed", extra={"call": call}, exc_info=exc)
    return Failure("server", f"internal error in the engine ({type(exc).__name__}); the server log has details")
