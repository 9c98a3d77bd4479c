"""The Ray Serve side of the Ray engine: the deployments, and the Serve config that describes them.

Per served base model there are two Serve applications: a trainer (one replica: it holds the base
model, every tenant's adapter and optimizer state, the LoRA pool) and a sampler (`replicas`
replicas, each with its own copy of the base model, loading checkpoints from the shared data dir).
Each replica runs a LocalEngine: the compute is the same code in both engines, only where it runs
differs. Outcomes cross back as data: a result, or a `Failure` (workers/guard.py), with the
replica's pool status, so the gateway never unpickles an exception type.

`serve_config` is the config `serve run` / KubeRay's RayService deploys, and `build_app` the
application builder it names; `twinkle serve --engine ray` deploys the same applications itself
(server/engine/ray_engine.py), so the printed config and what runs are one thing.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from server.config import Settings
from server.engine.local import LocalEngine
from server.errors import OperationFailed
from workers.guard import Failure
from workers.types import BaseModelInfo, PoolStatus, SampleJob, SampleOutput, SampleTarget, VersionInfo

TRAINER, SAMPLER = "trainer", "sampler"
BUILDER = "server.engine.ray_serve_app:build_app"
# What a replica needs of the settings: where the data dir is and how to run the compute. Nothing
# else (no database URL, no keys) is handed to the cluster.
REPLICA_FIELDS = (
    "data_dir", "allow_download", "torch_threads", "device", "dtype", "pass_memory_mb", "max_tokens_per_pass",
    "custom_loss_seconds", "max_resident_adapters", "host_adapter_budget_mb", "sampler", "sampler_cache_versions",
    "max_lora_rank", "packing",
)
# Serve's logs: warnings and up, no line per request (access logs double a handle call's cost).
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
# The engine methods a gateway may call on a replica ("snapshot" and "sample_batch" are adapted
# to the object store by the replica: see EngineReplica).
TRAINER_CALLS = frozenset({
    "create_adapter", "forward_backward", "forward_backward_packed", "optim_step", "optim_steps", "save", "load",
    "unload", "page_out", "snapshot", "native",
})
SAMPLER_CALLS = frozenset({"sample_batch", "release"})


class EngineReplica:
    """A LocalEngine for one base model in a Serve replica; the model loads before the replica
    reports ready, so a replica Serve brings back after a crash is ready when it answers."""

    def __init__(self, settings: dict[str, Any], base_model: str, role: str) -> None:
        parsed = Settings.model_validate(settings)
        # The trainer is the compute-heavy process; every sampler replica gets one thread.
        threads = parsed.torch_threads if role == TRAINER else 1
        self._role = role
        self._engine = LocalEngine.from_settings(parsed, base_model, torch_threads=threads)
        self._info = self._engine.start_blocking()

    def info(self) -> BaseModelInfo:
        return self._info

    async def call(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, PoolStatus | None]:
        """(the result or its Failure, the pool status after the call)."""
        allowed = TRAINER_CALLS if self._role == TRAINER else SAMPLER_CALLS
        if method not in allowed:
            return Failure("server", f"the {self._role} replica has no call {method!r}"), None
        try:
            if method == "snapshot":
                outcome = await self._snapshot(*args)
            elif method == "sample_batch":
                outcome = await self._sample_batch(*args)
            else:
                outcome = await getattr(self._engine, method)(*args, **kwargs)
        except OperationFailed as exc:
            outcome = Failure("user" if exc.category == "user" else "server", exc.message)
        return outcome, self._engine.pool_status()


    async def _snapshot(self, model_id: str) -> tuple[VersionInfo, list[ray.ObjectRef]]:
        """A new in-memory version, put in the object store (this replica owns the object; the
        gateway holds the reference, and releasing it frees the object). The reference goes back
        in a list, so that nothing resolves it on the way."""
        weights, info = await self._engine.capture(model_id)
        return info, [ray.put(weights)]

    async def _sample_batch(
        self, target: SampleTarget | None, jobs: list[SampleJob], refs: list[ray.ObjectRef]
    ) -> list[SampleOutput]:
        """`refs`: the object holding an in-memory version's weights, fetched only if this replica
        has not built that version yet (or evicted it)."""
        fetch = (lambda: ray.get(refs[0])) if refs else None
        return await self._engine.sample_batch(target, jobs, fetch)


def app_name(prefix: str, role: str, base_model: str) -> str:
    """The Serve application of a base model's trainer or sampler (a name Serve accepts)."""
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in base_model)[-80:]
    return f"{prefix}-{role}-{slug}"


def replica_settings(settings: Settings) -> dict[str, Any]:
    values = settings.model_dump(mode="json", include=set(REPLICA_FIELDS))
    values["data_dir"] = str(settings.data_dir.resolve())  # replicas do not share the gateway's cwd
    return values


def deployment_options(settings: Settings, role: str) -> dict[str, Any]:
    """Replicas and resources of a role's deployment, from the settings."""
    if role == TRAINER:
        # One replica: the adapters live in its memory. A gateway starts one training call at a
        # time per base model; the rest (unload, page_out) are short and queue in the replica.
        return {"num_replicas": 1, "max_ongoing_requests": 8,
                "ray_actor_options": {"num_cpus": settings.ray_trainer_cpus, "num_gpus": settings.ray_trainer_gpus}}
    return {"num_replicas": settings.ray_sampler_replicas, "max_ongoing_requests": 4,
            "ray_actor_options": {"num_cpus": settings.ray_sampler_cpus, "num_gpus": settings.ray_sampler_gpus}}


def build_app(args: dict[str, Any]) -> Application:
    """The application builder `serve run` / RayService calls with the config's `args`:
    {"settings": replica settings, "base_model": name, "role": trainer|sampler, "options": ...}."""
    role = args["role"]
    deployment = serve.deployment(EngineReplica, name=role.capitalize(), **args["options"])
    return deployment.bind(args["settings"], args["base_model"], role)


def app_args(settings: Settings, role: str, base_model: str) -> dict[str, Any]:
    return {"settings": replica_settings(settings), "base_model": base_model, "role": role,
            "options": deployment_options(settings, role)}


def serve_config(settings: Settings) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) of these settings' applications: for `serve run
    config.yaml`, or as a RayService's serveConfigV2. No HTTP proxy: the gateway is Twinkle's."""
    applications = [
        {"name": app_name(settings.ray_app_prefix, role, model), "route_prefix": None, "import_path": BUILDER,
         "args": app_args(settings, role, model)}
        for model in settings.base_models
        for role in (TRAINER, SAMPLER)
    ]
    return {"proxy_location": "Disabled", "http_options": {"host": "127.0.0.1"}, "logging_config": dict(LOGGING),
            "applications": applications}
