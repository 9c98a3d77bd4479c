"""Names for the kinds and states the server passes around, so that none is a bare string.

The values are what the database stores and the wire shows: changing one is a migration."""

from __future__ import annotations

from enum import StrEnum


class OpKind(StrEnum):
    """What a future computes (Future.kind)."""

    CREATE_MODEL = "create_model"
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    UNLOAD_MODEL = "unload_model"
    SAMPLE = "sample"
    CREATE_CUSTOM_LOSS = "create_custom_loss"
    NATIVE = "native"  # a native Twinkle API call on a model (server/ops/native_models.py)


class FutureState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class ResultFormat(StrEnum):
    """How a finished future's result bytes are encoded."""

    JSON = "json"
    PROTO = "proto"


class ErrorCategory(StrEnum):
    """Who can fix a failure: the caller (`user`) or the operator (`server`), as the SDK reports it."""

    USER = "user"
    SERVER = "server"


class Lane(StrEnum):
    """A kind of engine work with its own concurrency (the engine says how much)."""

    TRAINING = "training"
    SAMPLING = "sampling"
