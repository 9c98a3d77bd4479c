"""The engine interface: what the control plane asks of the compute plane.

Methods are async and take and return plain data (numbers, strings, numpy arrays and the
dataclasses of workers.types), so an engine can run its work in a thread (LocalEngine) or in
Ray Serve deployments without the callers noticing. Adapters are addressed by model id,
in-memory adapter versions by key, and checkpoints by reference (a storage key the engine
resolves through its own CheckpointStore, workers/storage.py), never by a path of the caller's
disk. A failure crosses as data (workers/guard.py, `Failure(category, message, field)`) and reaches the
caller as OperationFailed with that category and message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from schemas.wire import ForwardBackwardCall
from server.kinds import Lane
from workers.guard import Failure
from workers.types import (
    AdamConfig,
    BaseModelInfo,
    CustomLossSpec,
    ForwardBackwardResult,
    LoraSpec,
    ModelCalls,
    PoolStatus,
    SampleJob,
    SampleOutput,
    SampleTarget,
    VersionInfo,
)


class Engine(Protocol):
    # How many calls the engine can run at once in each lane (every lane at least one); the
    # scheduler starts up to that many. A lane's calls may still queue inside the engine.
    lanes: Mapping[Lane, int]
    # How many calls it can run at once in all lanes together (None: the lanes' sum). An engine
    # whose lanes share one device thread says 1: then a sample never waits inside the engine,
    # where it could be neither batched with later samples nor cancelled.
    max_calls: int | None

    async def start(self) -> BaseModelInfo: ...

    async def stop(self) -> None: ...

    async def create_adapter(self, model_id: str, spec: LoraSpec) -> None: ...

    async def forward_backward(
        self, model_id: str, calls: list[ForwardBackwardCall], custom: CustomLossSpec | None = None
    ) -> list[ForwardBackwardResult]:
        """Calls with the same loss in one pass, one result per call (`custom`: the uploaded loss
        the calls name, when loss_fn is "custom")."""
        ...

    async def forward_backward_packed(self, items: list[ModelCalls]) -> list[list[ForwardBackwardResult] | Failure]:
        """Several models' calls in one engine call (workers/packing.py: one pass of the base
        model where that is faster), one outcome per item: its results, one per call, or the
        Failure it alone ended in. Each item's calls have one loss, and all share forward_only."""
        ...

    async def optim_step(self, model_id: str, adam: AdamConfig) -> dict[str, float]: ...

    async def optim_steps(self, steps: list[tuple[str, AdamConfig]]) -> list[dict[str, float] | Failure]:
        """Several models' optimizer steps in one engine call, in order; one outcome per step:
        its metrics, or the Failure it alone ended in."""
        ...

    async def save(self, model_id: str, ref: str, *, with_optimizer: bool, encrypt_to: list[str] | None = None) -> int:
        """Write the adapter (and optionally its optimizer state) as checkpoint `ref`, atomically;
        bytes written. `encrypt_to`: age recipients every file is encrypted to before it is published."""
        ...

    async def load(self, model_id: str, ref: str, *, with_optimizer: bool) -> LoraSpec:
        """Load a checkpoint into the model's adapter, creating the adapter if needed."""
        ...

    async def unload(self, model_id: str) -> None:
        """Drop the model's adapter (weights, optimizer state, gradients) from memory."""
        ...

    async def native(self, model_id: str, op: str, kwargs: dict[str, Any]) -> Any:
        """A native Twinkle API training op on the model's adapter (workers/native_training.py):
        JSON-like kwargs in, a JSON-like result out."""
        ...

    async def page_out(self, model_id: str) -> None:
        """Move the model's adapter off the compute device now; it pages back in when used."""
        ...

    def pool_status(self) -> PoolStatus | None:
        """The LoRA pool as of the last compute call (None before the first)."""
        ...

    async def snapshot(self, model_id: str, key: str) -> VersionInfo:
        """Keep the model's adapter weights as they are now, in memory, as immutable version `key`
        (the checkpoint engine: nothing is written to disk), where this engine's samplers find it."""
        ...

    async def release(self, key: str) -> None:
        """Forget in-memory version `key` (and what samplers built from it); a no-op if unknown."""
        ...

    async def sample_batch(self, target: SampleTarget | None, jobs: list[SampleJob]) -> list[SampleOutput]:
        """Sample several requests in one batch from the base model with the adapter version
        `target` (None: no adapter); one output per job."""
        ...
