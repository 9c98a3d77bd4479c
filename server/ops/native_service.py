"""The native Twinkle API's service and management side: sessions, capabilities, capacity, and
training runs and checkpoints in twinkle_client's shapes (docs/twinkle-native.md).

Nothing here is a second catalog: a native session is a Session row like a Tinker one (tagged
`twinkle-native`), a native adapter's training run is a Model row named `<session>-<adapter>`, and
twinkle:// names the same checkpoints as tinker://. So the views below are the Tinker REST views
(ops/catalog.py, ops/checkpoints.py) recast, and a Tinker run shows up here and the other way round."""

from __future__ import annotations

from sqlalchemy.orm import Session

from schemas import native as nt
from schemas import tinker as api
from server import ids
from server.errors import NotFound
from server.ops import catalog, checkpoints, sessions
from server.ops.checkpoints import resolve_checkpoint
from server.runtime import Runtime
from server.store.tables import Model, Tenant

SESSION_FIELD = "X-Twinkle-Session-Id"  # the header every call after create_session carries
NATIVE_TAG = "twinkle-native"  # the tag of a session made through the native API
NATIVE_SDK = "twinkle_client"  # its sdk_version: the client does not say which version it is


def served_base(rt: Runtime, base: str) -> str:
    """The served base model a model/sampler path names; 404 otherwise (the client strips `ms://`
    and friends)."""
    if base not in rt.engines:
        raise NotFound(f"base model {base!r} is not served here; this server serves "
                       f"{', '.join(map(repr, rt.engines))}", field="base_model")
    return base


# ----- sessions and the server -------------------------------------------------------------------
async def create_session(rt: Runtime, tenant_id: str, req: nt.CreateSessionRequest) -> nt.CreateSessionResponse:
    """A Session row like a Tinker one; the client's `metadata` is kept as the user metadata."""
    tinker_req = api.CreateSessionRequest(sdk_version=NATIVE_SDK, tags=[NATIVE_TAG], user_metadata=req.metadata)
    return nt.CreateSessionResponse(session_id=await sessions.create_session(rt, tenant_id, tinker_req))


async def heartbeat(rt: Runtime, tenant_id: str, req: nt.SessionHeartbeatRequest) -> None:
    """NotFound for a session this tenant does not have; Gone (404 on this API) once it has ended."""
    await sessions.heartbeat(rt, tenant_id, req.session_id)


def capabilities(rt: Runtime) -> nt.ServerCapabilities:
    return nt.ServerCapabilities(supported_models=[nt.SupportedModel(model_name=b.name) for b in rt.bases])


async def capacity(rt: Runtime, tenant_id: str) -> nt.CapacityInfo:
    """Per tenant, never the server's: how many adapters it may hold, holds, and has left."""
    limit = (await rt.refresh_limits(tenant_id)).max_live_models
    used = await rt.live_models(tenant_id)
    return nt.CapacityInfo(max_loras=limit, used_loras=used, free_loras=max(limit - used, 0))


# ----- training runs and checkpoints -------------------------------------------------------------
def twinkle_path(tinker_path: str) -> str:
    return ids.parse_tinker_path(tinker_path).twinkle


def checkpoint_view(c: api.Checkpoint, run: api.TrainingRun) -> nt.Checkpoint:
    return nt.Checkpoint(
        checkpoint_id=c.checkpoint_id, checkpoint_type=c.checkpoint_type, time=c.time, size_bytes=c.size_bytes or 0,
        public=c.public, twinkle_path=twinkle_path(c.tinker_path), base_model=run.base_model, is_lora=run.is_lora,
        lora_rank=run.lora_rank, user_metadata=c.user_metadata,
    )


def run_view(run: api.TrainingRun) -> nt.TrainingRun:
    last, last_sampler = run.last_checkpoint, run.last_sampler_checkpoint
    return nt.TrainingRun(
        training_run_id=run.training_run_id, base_model=run.base_model, model_owner=run.model_owner,
        is_lora=run.is_lora, corrupted=run.corrupted, lora_rank=run.lora_rank,
        last_request_time=run.last_request_time, user_metadata=run.user_metadata,
        last_checkpoint=checkpoint_view(last, run) if last else None,
        last_sampler_checkpoint=checkpoint_view(last_sampler, run) if last_sampler else None,
    )


async def list_training_runs(
    rt: Runtime, tenant_id: str, limit: int, offset: int, *, all_users: bool = False
) -> nt.TrainingRunsResponse:
    """The tenant's runs, newest first; `all_users` adds other tenants' runs that hold a published
    checkpoint (showing only those), as the Tinker API's access_scope="accessible" does."""
    scope = "accessible" if all_users else "owned"
    page = await catalog.list_training_runs(rt, tenant_id, limit, offset, access_scope=scope)
    cursor = nt.Cursor(**page.cursor.model_dump())
    return nt.TrainingRunsResponse(training_runs=[run_view(r) for r in page.training_runs], cursor=cursor)


async def get_training_run(rt: Runtime, tenant_id: str, run_id: str) -> nt.TrainingRun:
    return run_view(await catalog.get_training_run(rt, tenant_id, run_id, access_scope="accessible"))


async def list_checkpoints(rt: Runtime, tenant_id: str, run_id: str) -> nt.CheckpointsListResponse:
    """A run's checkpoints, oldest first (the client takes the last as the latest)."""
    run = await catalog.get_training_run(rt, tenant_id, run_id, access_scope="accessible")
    page = await catalog.training_run_checkpoints(rt, tenant_id, run_id)
    cursor = nt.Cursor(**page.cursor.model_dump()) if page.cursor else None
    return nt.CheckpointsListResponse(checkpoints=[checkpoint_view(c, run) for c in page.checkpoints], cursor=cursor)


def _path_of(run_id: str, checkpoint_id: str) -> str:
    """The twinkle:// path of `<segment>/<name>` in a run; InvalidRequest names checkpoint_id."""
    checkpoints.parse_checkpoint_id(checkpoint_id)
    return f"twinkle://{run_id}/{checkpoint_id}"


async def checkpoint_path(rt: Runtime, tenant_id: str, run_id: str, checkpoint_id: str) -> nt.CheckpointPath:
    """The checkpoint's twinkle:// path, once it is known to exist for the caller. Never a path on
    the server's disk: Twinkle sends one here, which tells a client nothing it can use and tells
    anyone where the server keeps its data."""
    path = _path_of(run_id, checkpoint_id)
    await rt.db.run(lambda s: resolve_checkpoint(s, tenant_id, path, field="checkpoint_id"))
    return nt.CheckpointPath(path="", twinkle_path=path)


async def delete_checkpoint(rt: Runtime, tenant_id: str, run_id: str, checkpoint_id: str
                            ) -> nt.DeleteCheckpointResponse:
    await checkpoints.delete_checkpoint(rt, tenant_id, run_id, checkpoint_id)
    return nt.DeleteCheckpointResponse(success=True, message=f"checkpoint {checkpoint_id} of {run_id} deleted")


async def weights_info(rt: Runtime, tenant_id: str, path: str) -> nt.WeightsInfoResponse:
    """What a readable checkpoint holds: its run, base model, owner and LoRA shape."""

    def read(s: Session) -> nt.WeightsInfo:
        row = resolve_checkpoint(s, tenant_id, path, field="twinkle_path")
        model = s.get(Model, row.model_id)
        spec = model.lora_spec or {}
        return nt.WeightsInfo(
            training_run_id=model.id, base_model=model.base_model, model_owner=s.get(Tenant, row.tenant_id).name,
            is_lora=True, lora_rank=model.lora_rank, train_unembed=spec.get("train_unembed"),
            train_mlp=spec.get("train_mlp"), train_attn=spec.get("train_attn"),
        )

    info = await rt.db.run(read)
    return nt.WeightsInfoResponse(**info.model_dump(), weights_info=info)
