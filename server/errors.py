"""Errors the control plane raises for the gateway to map onto HTTP. Each carries the request
field it is about (when there is one) and a message a person can act on."""

from __future__ import annotations

from server.kinds import ErrorCategory


class TwinkleError(Exception):
    kind = "invalid"  # invalid | not_found | conflict | unauthorized | gone | busy | too_large | ...
    category = ErrorCategory.USER

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(TwinkleError):
    kind = "invalid"


class NotFound(TwinkleError):
    """Also what another tenant's object looks like: never a hint that it exists."""

    kind = "not_found"


class Conflict(TwinkleError):
    kind = "conflict"


class Unauthorized(TwinkleError):
    kind = "unauthorized"


class Forbidden(TwinkleError):
    """Something this server never hands out, whoever asks (e.g. a base model's weights)."""

    kind = "forbidden"


class Busy(TwinkleError):
    """Over capacity right now; the client should retry after `retry_after` seconds."""

    kind = "busy"

    def __init__(
        self, message: str, *, retry_after: float = 1.0, retryable: bool = True, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after
        self.retryable = retryable  # False: waiting will not help (the client must act), so say don't retry


class Unavailable(Busy):
    """A service the server depends on (the database, Redis) cannot be reached right now: a 503 the
    client retries after `retry_after` seconds."""

    kind = "unavailable"
    category = ErrorCategory.SERVER


class TooLarge(TwinkleError):
    """A request or upload over a size limit (a 413); smaller ones would be accepted."""

    kind = "too_large"


class Gone(TwinkleError):
    """The object existed and has ended (a finished session)."""

    kind = "gone"


class NotImplementedHere(TwinkleError):
    """A known operation this server does not offer (e.g. uploading to a model hub it does not have)."""

    kind = "not_implemented"


class OperationFailed(Exception):
    """An operation failed while running; it becomes the future's error."""

    def __init__(self, message: str, category: ErrorCategory = ErrorCategory.USER, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
        self.field = field  # the request field at fault, when the engine knows it


class Elsewhere(Exception):
    """The request is another server process's to run (the owner of its model, see
    server/queue/instances.py): the gateway forwards it to `url` unchanged."""

    def __init__(self, url: str, model_id: str) -> None:
        super().__init__(f"model {model_id} is run by the server process at {url}")
        self.url = url
        self.model_id = model_id
