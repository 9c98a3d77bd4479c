"""Errors the control plane raises for the gateway to map onto HTTP. Each carries the request
field it is about (when there is one) and a message a person can act on."""

from __future__ import annotations

from server.kinds import ErrorCategory


class TwinkleError(Exception):
    kind = "invalid"  # invalid | not_found | conflict | unauthorized | gone | busy
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


class Busy(TwinkleError):
    """Over capacity right now; the client should retry after `retry_after` seconds."""

    kind = "busy"

    def __init__(
        self, message: str, *, retry_after: float = 1.0, retryable: bool = True, field: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after
        self.retryable = retryable  # False: waiting will not help (the client must act), so say don't retry


class Gone(TwinkleError):
    """The object existed and has ended (a finished session)."""

    kind = "gone"


class OperationFailed(Exception):
    """An operation failed while running; it becomes the future's error."""

    def __init__(self, message: str, category: ErrorCategory = ErrorCategory.USER) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
