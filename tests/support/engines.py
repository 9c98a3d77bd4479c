"""Stand-in engines for in-process gateway tests (nothing in them computes)."""

from __future__ import annotations

from server.kinds import Lane
from workers.types import BaseModelInfo, PoolStatus


class IdleEngine:
    """Enough engine for the endpoints that never compute (auth, admin, REST listings)."""

    lanes = {Lane.TRAINING: 1, Lane.SAMPLING: 1}
    max_calls = 1

    async def start(self) -> BaseModelInfo:
        return BaseModelInfo(name="tiny-qwen3", architecture="qwen3", vocab_size=1000, max_context_length=256)

    async def stop(self) -> None:
        pass

    def pool_status(self) -> PoolStatus | None:
        return None  # no compute call yet, ever
