"""Running async test bodies without pytest-asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def arun(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body (the suite does without pytest-asyncio)."""
    return asyncio.run(fn())  # type: ignore[arg-type]
