"""The Ray engine: the Engine interface over Ray Serve deployments (server/engine/ray_serve_app.py).

The gateway keeps the control plane (queues, futures, tenants) and calls a base model's trainer
and sampler applications through DeploymentHandles: awaited on the event loop, never a blocking
`ray.get`. A call that cannot finish because its replica died (or Ray failed under it) fails with
a `server` error telling the user to reload from their last checkpoint: the trainer's adapters
were in that replica's memory. Serve brings the replica back, with the base model loaded and no
adapters, and later calls on a model it lost say so (LocalEngine._require).

`RayCluster` joins the cluster at `ray_address`, or starts a private local one, once per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from schemas.wire import ForwardBackwardCall
from server.config import Settings
from server.engine.ray_serve_app import LOGGING, SAMPLER, TRAINER, app_args, app_name, build_app
from server.errors import OperationFailed
from server.kinds import ErrorCategory, Lane
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

log = logging.getLogger(__name__)
DEPLOY_TIMEOUT_S = 600.0  # loading a large base model in a fresh replica takes minutes


class RayCapacityError(RuntimeError):
    """The replicas asked for cannot all be placed on the cluster."""


class RayCluster:
    """This process's connection to Ray and Serve, shared by the engines of every base model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._temp_dir: str | None = None
        self._started_here = False

    def connect(self) -> None:
        if ray.is_initialized():
            return
        s = self._settings
        common: dict[str, Any] = {"namespace": f"{s.ray_app_prefix}-gateway", "log_to_driver": False,
                                  "logging_level": logging.WARNING, "configure_logging": False}
        if s.ray_address:
            ray.init(address=s.ray_address, **common)
        else:
            # A private cluster: its own temp dir (short: Ray's unix socket paths must fit 107
            # bytes), no dashboard, the object store capped. Every socket is on loopback when the
            # server runs in a loopback-only network namespace (docs/architecture.md, "The Ray engine").
            self._temp_dir = tempfile.mkdtemp(prefix="twr-")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=self._temp_dir,
                     object_store_memory=s.ray_object_store_mb * 2**20, **common)
            self._started_here = True
        serve.start(proxy_location="Disabled", logging_config=LOGGING)
        if self._started_here:
            self._check_room()

    def _check_room(self) -> None:
        """A private cluster has what this machine has and never grows, and Serve waits forever
        (silently) for a replica that does not fit: refuse to start instead, saying what to lower."""
        s = self._settings
        need = {
            "CPU": len(s.base_models) * (s.ray_trainer_cpus + s.ray_sampler_replicas * s.ray_sampler_cpus),
            "GPU": len(s.base_models) * (s.ray_trainer_gpus + s.ray_sampler_replicas * s.ray_sampler_gpus),
        }
        have = ray.cluster_resources()
        short = {kind: (amount, have.get(kind, 0.0)) for kind, amount in need.items() if amount > have.get(kind, 0.0)}
        if short:
            detail = "; ".join(f"{amount:g} {kind}s needed, {got:g} on this machine" for kind, (amount, got) in short.items())
            raise RayCapacityError(
                f"the Ray replicas of {len(s.base_models)} base model(s) do not fit this machine ({detail}): lower "
                "--ray-trainer-cpus / --ray-sampler-cpus / --ray-sampler-replicas (fractions are fine), or their GPUs")

    def deploy(self, role: str, base_model: str) -> None:
        """Run a base model's trainer or sampler application, unless one is already running (a
        second gateway on the same cluster, or `serve run` / KubeRay deployed it)."""
        name = app_name(self._settings.ray_app_prefix, role, base_model)
        status = serve.status().applications.get(name)
        if status is not None and status.status in ("RUNNING", "DEPLOYING"):
            log.info("ray_app_reused", extra={"app": name, "status": status.status})
            return
        serve.run(build_app(app_args(self._settings, role, base_model)), name=name, route_prefix=None,
                  blocking=False)
        log.info("ray_app_deployed", extra={"app": name})

    def handle(self, role: str, base_model: str) -> serve.handle.DeploymentHandle:
        return serve.get_app_handle(app_name(self._settings.ray_app_prefix, role, base_model))

    def shutdown(self) -> None:
        """Tear a private cluster down; leave a joined cluster's applications running (other
        gateways use them) and only disconnect from it. Every base model's engine calls it; the
        first does it."""
        if not ray.is_initialized():
            return
        try:
            if self._started_here:
                serve.shutdown()
        finally:
            ray.shutdown()
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)


class RayEngine:
    max_calls: int | None = None  # the lanes run in different processes

    def __init__(self, cluster: RayCluster, settings: Settings, base_model: str) -> None:
        self._cluster = cluster
        self._name = base_model
        # One training call at a time (one trainer replica with one compute thread); as many
        # samples as there are sampler replicas.
        self.lanes: Mapping[Lane, int] = {Lane.TRAINING: 1, Lane.SAMPLING: settings.ray_sampler_replicas}
        self._trainer: Any = None
        self._sampler: Any = None
        self._pool_status: PoolStatus | None = None
        self._versions: dict[str, Any] = {}  # in-memory version key -> its ObjectRef

    async def start(self) -> BaseModelInfo:
        started = time.perf_counter()
        await asyncio.to_thread(self._deploy)
        info = await asyncio.wait_for(self._wait_ready(), DEPLOY_TIMEOUT_S)
        log.info("ray_engine_ready", extra={"model": self._name, "seconds": round(time.perf_counter() - started, 2)})
        return info

    def _deploy(self) -> None:
        self._cluster.connect()
        for role in (TRAINER, SAMPLER):
            self._cluster.deploy(role, self._name)
        self._trainer = self._cluster.handle(TRAINER, self._name)
        self._sampler = self._cluster.handle(SAMPLER, self._name)

    async def _wait_ready(self) -> BaseModelInfo:
        """The trainer's model info, once both applications answer (a replica answers once its
        model is loaded)."""
        while True:
            try:
                info = await self._trainer.info.remote()
                await self._sampler.info.remote()
                return info
            except (RayError, RayServeException) as exc:  # still deploying
                log.info("ray_engine_waiting", extra={"model": self._name, "reason": type(exc).__name__})
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        await asyncio.to_thread(self._cluster.shutdown)

    def pool_status(self) -> PoolStatus | None:
        return self._pool_status

    async def _call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        handle = self._trainer if role == TRAINER else self._sampler
        try:
            outcome, status = await handle.call.remote(method, *args, **kwargs)
        except (RayError, RayServeException) as exc:
            log.warning("ray_call_failed", extra={"model": self._name, "role": role, "call": method,
                                                  "error": type(exc).__name__})
            raise OperationFailed(_lost_message(role, self._name, exc), ErrorCategory.SERVER) from None
        if role == TRAINER and status is not None:
            self._pool_status = status
        if isinstance(outcome, Failure):
            raise OperationFailed(outcome.message, outcome.category, outcome.field)
        return outcome

    async def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        await self._call(TRAINER, "create_adapter", model_id, spec)

    async def forward_backward(
        self, model_id: str, calls: list[ForwardBackwardCall], custom: CustomLossSpec | None = None
    ) -> list[ForwardBackwardResult]:
        return await self._call(TRAINER, "forward_backward", model_id, calls, custom)

    async def forward_backward_packed(self, items: list[ModelCalls]) -> list[list[ForwardBackwardResult] | Failure]:
        return await self._call(TRAINER, "forward_backward_packed", items)

    async def optim_step(self, model_id: str, adam: AdamConfig) -> dict[str, float]:
        return await self._call(TRAINER, "optim_step", model_id, adam)

    async def optim_steps(self, steps: list[tuple[str, AdamConfig]]) -> list[dict[str, float] | Failure]:
        return await self._call(TRAINER, "optim_steps", steps)

    async def save(self, model_id: str, ref: str, *, with_optimizer: bool, encrypt_to: list[str] | None = None) -> int:
        return await self._call(TRAINER, "save", model_id, ref, with_optimizer=with_optimizer, encrypt_to=encrypt_to)

    async def load(self, model_id: str, ref: str, *, with_optimizer: bool) -> LoraSpec:
        return await self._call(TRAINER, "load", model_id, ref, with_optimizer=with_optimizer)

    async def unload(self, model_id: str) -> None:
        await self._call(TRAINER, "unload", model_id)

    async def page_out(self, model_id: str) -> None:
        await self._call(TRAINER, "page_out", model_id)

    async def native(self, model_id: str, op: str, kwargs: dict[str, Any]) -> Any:
        return await self._call(TRAINER, "native", model_id, op, kwargs)

    async def snapshot(self, model_id: str, key: str) -> VersionInfo:
        info, refs = await self._call(TRAINER, "snapshot", model_id)
        self._versions[key] = refs[0]
        return info

    async def release(self, key: str) -> None:
        # Dropping the reference frees the object; sampler replicas that built the version keep
        # it until their LRU evicts it (nothing samples a released version: the gateway refuses).
        self._versions.pop(key, None)

    async def sample_batch(self, target: SampleTarget | None, jobs: list[SampleJob]) -> list[SampleOutput]:
        held = None if target is None else self._versions.get(target.key)
        return await self._call(SAMPLER, "sample_batch", target, jobs, [] if held is None else [held])


def _lost_message(role: str, base_model: str, exc: Exception) -> str:
    if role == TRAINER:
        return (f"the trainer of base model {base_model} failed during this call ({type(exc).__name__}), and the "
                "adapters it held in memory may be lost: create a training client from your last checkpoint "
                "(ServiceClient.create_training_client_from_state) and go on from there")
    return (f"the sampler of base model {base_model} failed during this call ({type(exc).__name__}); "
            "sample again")
