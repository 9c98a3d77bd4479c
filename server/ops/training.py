"""Training operations: each submission checks ownership and input, takes a future and queues the
work on its model; the work itself runs later on the engine, in the model's seq_id order."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session

from schemas import tinker as api
from schemas.wire import ForwardBackwardCall, encode_forward_backward_output
from server import ids
from server.engine.protocol import Engine
from server.errors import Elsewhere, InvalidRequest, NotFound, OperationFailed, TwinkleError
from server.kinds import OpKind, ResultFormat
from server.ops import custom_losses, versions
from server.ops.checkpoints import check_ttl, expiry, is_expired, new_checkpoint_ref, resolve_checkpoint
from server.ops.sessions import live_session
from server.ops.validation import check_custom_loss_data, check_forward_backward
from server.queue.scheduler import Batch, OpResult, OpRunner, Pack, json_result
from server.queue.scopes import model_scope, session_scope
from server.runtime import Runtime
from server.store.queries import checkpoint_by_name, owned
from server.store.tables import Checkpoint, Model, SamplingSession, utcnow
from server.store.tables import Session as SessionRow
from workers import failpoints
from workers.adapter_files import RecipientError, age_recipients
from workers.guard import Failure
from workers.types import AdamConfig, CustomLossSpec, LoraSpec, ModelCalls

log = logging.getLogger(__name__)
T = TypeVar("T")


async def owned_model(
    rt: Runtime, tenant_id: str, model_id: str, *, touch: bool = True, route: bool | None = None
) -> Model:
    """The tenant's model; by default (a request that runs on the model) also checks that this
    process runs its work (else Elsewhere: the gateway forwards the request to the process that
    does) and records the request as the run's last_request_time (at submission: off the compute
    path). A run that passed lately is admitted from memory (tenancy/runs.py). `route`: check
    where it runs without touching (default: as `touch`)."""

    if touch:  # a submission the quotas would refuse is refused before it writes anything
        await rt.refresh_limits(tenant_id)
        rt.quotas.check(tenant_id, time.monotonic(), rate=rt.shared is None)
        if (known := rt.runs.get(tenant_id, model_id)) is not None:  # passed all of the below lately
            return known

    def read(s: Session) -> Model:
        model = owned(s, Model, tenant_id, model_id, field="model_id")
        if touch:
            if model.copied_from is not None:
                raise InvalidRequest(
                    f"training run {model_id} is a copy of {model.copied_from} and has no trainable state; "
                    "create a training client from its checkpoint instead", field="model_id",
                )
            live_session(s, tenant_id, model.session_id, field="model_id")  # 410 once it has ended
            rt.served(model.base_model, field="model_id")  # 400 if this server no longer serves its base model
            model.last_request_at = utcnow()
        if (touch if route is None else route) and (url := rt.instances.claim(s, model)) is not None:
            raise Elsewhere(url, model.id)
        return model

    model = await rt.db.run(read)
    if touch and route is not False:
        rt.runs.put(model)
    return model


async def _model_op(
    rt: Runtime, tenant_id: str, model: Model, *, kind: OpKind, seq_id: int | None, fingerprint: str, run: OpRunner,
    batch: Batch | None = None, cost: int = 0,
) -> api.UntypedAPIFuture:
    """Queue an operation on its model, in the model's seq_id order."""
    sub = await rt.enqueue(
        tenant_id, kind=kind, scope=model_scope(model.id), seq_id=seq_id, fingerprint=fingerprint, run=run,
        ordered=True, batch=batch, cost=cost,
    )
    return api.UntypedAPIFuture(request_id=sub.request_id, model_id=model.id)


@contextmanager
def refusing(rt: Runtime, model: Model, seq_id: int | None) -> Iterator[None]:
    """A submission refused with a 4xx still used up its seq_id: tell the model's queue not to
    wait for it."""
    try:
        yield
    except TwinkleError:
        if seq_id is not None:
            rt.scheduler.skip(model_scope(model.id), seq_id, model.tenant_id)
        raise


async def release_seq(rt: Runtime, tenant_id: str, model_id: object, seq_id: object) -> None:
    """The same for a body that failed validation before it was parsed (if it names a model of
    this tenant and a seq_id)."""
    if isinstance(model_id, str) and isinstance(seq_id, int):
        with suppress(NotFound):
            model = await owned_model(rt, tenant_id, model_id, touch=False)
            rt.scheduler.skip(model_scope(model.id), seq_id, tenant_id)


@asynccontextmanager
async def model_slot(rt: Runtime, tenant_id: str, model_id: str, base: str) -> AsyncIterator[None]:
    """Claim a live-model slot for a model being made in the block. Checked again here, when the
    creation runs (the check and the claim are one step), so concurrent submissions cannot
    together exceed the quota (over every server process, with Redis); a creation that fails
    frees the slot and whatever adapter it made."""
    try:
        await rt.claim_model(tenant_id, model_id)
    except TwinkleError as exc:
        raise OperationFailed(exc.message) from None
    try:
        yield
    except BaseException:
        await rt.release_model(tenant_id, model_id)
        try:
            await rt.engine_for(base).unload(model_id)  # a no-op when no adapter was made
        except Exception:
            log.exception("model_release_failed", extra={"model_id": model_id})
        raise


# ----- model creation ------------------------------------------------------------------------
async def create_model(rt: Runtime, tenant_id: str, req: api.CreateModelRequest, fingerprint: str) -> api.UntypedAPIFuture:
    await rt.db.run(lambda s: live_session(s, tenant_id, req.session_id))
    base = rt.served(req.base_model)
    lora = req.lora_config or api.LoraConfig(rank=32)
    await rt.refresh_limits(tenant_id)
    rt.quotas.check_rank(tenant_id, lora.rank)
    await rt.check_model_room(tenant_id)
    spec = LoraSpec(
        rank=lora.rank,
        seed=lora.seed if lora.seed is not None else random.getrandbits(31),
        alpha=rt.settings.lora_alpha,
        train_attn=lora.train_attn,
        train_mlp=lora.train_mlp,
        train_unembed=lora.train_unembed,
    )
    model_id = ids.model_id(req.session_id, req.model_seq_id)

    async def run() -> OpResult:
        if await rt.db.run(lambda s: s.get(Model, model_id)) is not None:
            raise OperationFailed(f"model {model_id} already exists (model_seq_id {req.model_seq_id} was used before)")
        async with model_slot(rt, tenant_id, model_id, base):
            await rt.engine_for(base).create_adapter(model_id, spec)
            await rt.db.run(lambda s: insert_model(s, tenant_id, req.session_id, req.model_seq_id, base, spec,
                                                    req.user_metadata, rt.instances.id))
        log.info("model_created", extra={"model_id": model_id, "tenant_id": tenant_id, "rank": spec.rank})
        return json_result(api.CreateModelResponse(model_id=model_id))

    sub = await rt.enqueue(
        tenant_id, kind=OpKind.CREATE_MODEL, scope=session_scope(req.session_id), seq_id=req.model_seq_id,
        fingerprint=fingerprint, run=run,
    )
    return api.UntypedAPIFuture(request_id=sub.request_id, model_id=model_id)


def engine_of(rt: Runtime, model: Model) -> Engine:
    """The engine of the model's base model (owned_model has checked that it is served)."""
    return rt.engine_for(model.base_model)


def insert_model(
    s: Session, tenant_id: str, session_id: str, seq: int, base: str, spec: LoraSpec, meta: dict | None, owner: str,
    model_id: str | None = None,
) -> None:
    """The model row (`model_id`: a native adapter's run id instead of Tinker's `<session>:train:<seq>`)."""
    # A write to the live session row first: it takes the row lock (PostgreSQL) or the write lock
    # (SQLite, where a SELECT ... FOR UPDATE locks nothing), so that a session that ended while the
    # adapter was being made gets no model, and an end that comes later lists this one.
    touched = s.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.finished_at.is_(None))
        .values(last_heartbeat_at=SessionRow.last_heartbeat_at)
    )
    if touched.rowcount != 1:
        raise OperationFailed(f"session {session_id} ended while the model was being created")
    s.add(
        Model(
            id=model_id or ids.model_id(session_id, seq),
            tenant_id=tenant_id,
            session_id=session_id,
            model_seq_id=seq,
            base_model=base,
            owner=owner,
            lora_rank=spec.rank,
            lora_spec=spec.__dict__.copy(),
            user_metadata=dict(meta or {}),
        )
    )


async def get_info(rt: Runtime, tenant_id: str, model_id: str) -> api.GetInfoResponse:
    model = await owned_model(rt, tenant_id, model_id, touch=False)
    return api.GetInfoResponse(
        model_id=model.id,
        model_data=api.ModelData(
            arch=rt.base_for(rt.served(model.base_model, field="model_id")).architecture,
            model_name=model.base_model, tokenizer_id=model.base_model,
        ),
        is_lora=True,
        lora_rank=model.lora_rank,
        model_name=model.base_model,
    )


# ----- steps -----------------------------------------------------------------------------------
OFFLOAD_TOKENS = 1 << 16  # a call with more tokens than this is checked in a worker thread


async def off_loop(tokens: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`: in a worker thread for a large call (numpy on megabytes: the event loop serves
    other requests meanwhile), inline for a small one (a thread hop costs more than the work)."""
    if tokens > OFFLOAD_TOKENS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def forward_backward(
    rt: Runtime, tenant_id: str, call: ForwardBackwardCall, fingerprint: str
) -> api.UntypedAPIFuture:
    model = await owned_model(rt, tenant_id, call.model_id)
    with refusing(rt, model, call.seq_id):
        custom = None
        base, tokens = rt.base_for(model.base_model), sum(len(d.tokens) for d in call.data)
        if call.loss_fn == "custom":
            custom = await custom_losses.spec_for(rt, tenant_id, model.session_id, call.loss_fn_config.get("loss_id"))
            await off_loop(tokens, check_custom_loss_data, call, custom, base)
        else:
            await off_loop(tokens, check_forward_backward, call, base)
        await rt.refresh_limits(tenant_id)
        rt.quotas.check_tokens(tenant_id, tokens, "data")

    async def run_calls(calls: list[ForwardBackwardCall]) -> list[OpResult]:
        results = await engine_of(rt, model).forward_backward(model.id, calls, custom)
        _record_passes(rt, model, calls, results)
        return [(encode_forward_backward_output(r.outputs, r.metrics), ResultFormat.PROTO) for r in results]

    async def run() -> OpResult:
        return (await run_calls([call]))[0]

    # Chunks of one call (and back-to-back calls) with the same loss run as one pass: gradients
    # add up the same, and a chunked call computes exactly what the unchunked one would.
    batch = Batch(
        key=(call.loss_fn, tuple(sorted(call.loss_fn_config.items())), call.forward_only),
        size=tokens,
        budget=rt.settings.fwdbwd_batch_tokens,
        payload=call,
        run=run_calls,
        pack=_pack(rt, model, custom, call.forward_only),
    )
    kind = OpKind.FORWARD if call.forward_only else OpKind.FORWARD_BACKWARD
    return await _model_op(rt, tenant_id, model, kind=kind, seq_id=call.seq_id, fingerprint=fingerprint, run=run,
                           batch=batch, cost=tokens)


def _pack(rt: Runtime, model: Model, custom: CustomLossSpec | None, forward_only: bool) -> Pack | None:
    """How the model's forward(_backward) may share an engine call with other models' on its base
    model (server/queue/scheduler.py, "Packing"); None when packing is off."""
    if rt.settings.packing == "never":
        return None
    return Pack(key=("forward_backward", model.base_model, forward_only), budget=rt.settings.pack_max_tokens,
                max_queues=_pack_models(rt), item=(model, custom), run=functools.partial(_run_packed, rt))


def _pack_models(rt: Runtime) -> int:
    """How many models one packed call may hold: never more than the pool keeps resident."""
    settings = rt.settings
    return min(settings.pack_max_models, settings.max_resident_adapters or settings.pack_max_models)


async def _run_packed(
    rt: Runtime, parts: list[tuple[tuple[Model, CustomLossSpec | None], list[ForwardBackwardCall]]]
) -> list[list[OpResult] | OperationFailed]:
    engine = engine_of(rt, parts[0][0][0])
    items = [ModelCalls(model.id, calls, custom) for (model, custom), calls in parts]
    outcomes = await engine.forward_backward_packed(items)
    for ((model, _), calls), outcome in zip(parts, outcomes, strict=True):
        if not isinstance(outcome, Failure):
            _record_passes(rt, model, calls, outcome)
    return [
        OperationFailed(o.message, o.category, o.field) if isinstance(o, Failure)
        else [(encode_forward_backward_output(r.outputs, r.metrics), ResultFormat.PROTO) for r in o]
        for o in outcomes
    ]


def _record_passes(rt: Runtime, model: Model, calls: list[ForwardBackwardCall], results: list[Any]) -> None:
    """Each call's metrics onto its run's curve (the dashboard's)."""
    for call, result in zip(calls, results, strict=True):
        kind = OpKind.FORWARD if call.forward_only else OpKind.FORWARD_BACKWARD
        rt.run_metrics.record(model.tenant_id, model.id, kind, sum(len(d.tokens) for d in call.data), result.metrics)


async def optim_step(rt: Runtime, tenant_id: str, req: api.OptimStepRequest, fingerprint: str) -> api.UntypedAPIFuture:
    model = await owned_model(rt, tenant_id, req.model_id)
    with refusing(rt, model, req.seq_id):
        if req.adam_params is None:
            kind = (req.optimizer_params or {}).get("type", "unknown")
            raise InvalidRequest(f"optimizer {kind!r} is not supported; use AdamParams", field="optimizer_params")
    adam = AdamConfig(**req.adam_params.model_dump())

    async def run() -> OpResult:
        metrics = await engine_of(rt, model).optim_step(model.id, adam)
        rt.run_metrics.record(model.tenant_id, model.id, OpKind.OPTIM_STEP, 0, metrics or {})
        return json_result(api.OptimStepResponse(metrics=metrics))

    batch = None
    if rt.settings.packing != "never":
        # Due optimizer steps of other models on the base ride in one engine call (size 1 each,
        # budget 1: never two steps of one model in a call; the pack budget counts models).
        most = _pack_models(rt)
        pack = Pack(key=("optim_step", model.base_model), budget=most, max_queues=most, item=model,
                    run=functools.partial(_run_optim_steps, rt))
        batch = Batch(key="optim_step", size=1, budget=1, payload=adam, run=_one_at_a_time(run), pack=pack)
    return await _model_op(rt, tenant_id, model, kind=OpKind.OPTIM_STEP, seq_id=req.seq_id, fingerprint=fingerprint,
                           run=run, batch=batch)


def _one_at_a_time(run: OpRunner) -> Callable[[list[Any]], Awaitable[list[OpResult]]]:
    async def run_all(payloads: list[Any]) -> list[OpResult]:  # a batch of one: its budget is 1
        return [await run() for _ in payloads]

    return run_all


async def _run_optim_steps(rt: Runtime, parts: list[tuple[Model, list[AdamConfig]]]) -> list[list[OpResult] | OperationFailed]:
    """The optimizer steps of several models in one engine call; one that fails fails alone."""
    engine = engine_of(rt, parts[0][0])
    outcomes = await engine.optim_steps([(model.id, adam) for model, steps in parts for adam in steps])
    for (model, _), outcome in zip(parts, outcomes, strict=True):
        if not isinstance(outcome, Failure):
            rt.run_metrics.record(model.tenant_id, model.id, OpKind.OPTIM_STEP, 0, outcome or {})
    return [OperationFailed(o.message, o.category, o.field) if isinstance(o, Failure)
            else [json_result(api.OptimStepResponse(metrics=o))] for o in outcomes]


# ----- checkpoints -----------------------------------------------------------------------------
async def save_checkpoint(
    rt: Runtime,
    tenant_id: str,
    model: Model,
    *,
    kind: str,
    name: str,
    with_optimizer: bool,
    overwrite: bool = False,
    ttl_seconds: int | None = None,
    user_metadata: dict | None = None,
    encrypt_to: list[str] | None = None,
) -> Checkpoint:
    """Write the model's adapter to a new folder and record it; runs inside a queued operation.
    `encrypt_to`: age recipients every file is encrypted to before the checkpoint is recorded."""
    existing = await rt.db.run(lambda s: checkpoint_by_name(s, tenant_id, model.id, kind, name))
    if existing is not None and not overwrite and not is_expired(existing):
        path = ids.TinkerPath(model.id, kind, name)
        raise OperationFailed(f"checkpoint {path} already exists; choose another name (or save_state with overwrite=True)")
    checkpoint_id, relative = new_checkpoint_ref(tenant_id)
    size = await engine_of(rt, model).save(model.id, relative, with_optimizer=with_optimizer, encrypt_to=encrypt_to)
    failpoints.hit("checkpoint.before_record")

    def record(s: Session) -> Checkpoint:
        row = checkpoint_by_name(s, tenant_id, model.id, kind, name)
        if row is None:
            row = Checkpoint(id=checkpoint_id, tenant_id=tenant_id, model_id=model.id, kind=kind, name=name)
            s.add(row)
        row.storage_dir, row.size_bytes, row.created_at = relative, size, utcnow()
        row.has_optimizer, row.ephemeral, row.user_metadata = with_optimizer, False, dict(user_metadata or {})
        row.expires_at, row.public = expiry(ttl_seconds), False
        return row

    row = await rt.db.run(record)
    if existing is not None:
        shutil.rmtree(rt.data_dir / existing.storage_dir, ignore_errors=True)
    log.info("checkpoint_saved", extra={"model_id": model.id, "kind": kind, "checkpoint": row.id, "bytes": size})
    return row


async def save_weights(rt: Runtime, tenant_id: str, req: api.SaveWeightsRequest, fingerprint: str) -> api.UntypedAPIFuture:
    model = await owned_model(rt, tenant_id, req.model_id)
    with refusing(rt, model, req.seq_id):
        check_ttl(req.ttl_seconds)
    name = req.path or f"state-{req.seq_id}"

    async def run() -> OpResult:
        await save_checkpoint(
            rt, tenant_id, model, kind="training", name=name, with_optimizer=True, overwrite=req.overwrite,
            ttl_seconds=req.ttl_seconds, user_metadata=req.user_metadata,
        )
        return json_result(api.SaveWeightsResponse(path=str(ids.TinkerPath(model.id, "training", name))))

    return await _model_op(rt, tenant_id, model, kind=OpKind.SAVE_WEIGHTS, seq_id=req.seq_id, fingerprint=fingerprint, run=run)


async def save_weights_for_sampler(
    rt: Runtime, tenant_id: str, req: api.SaveWeightsForSamplerRequest, fingerprint: str
) -> api.UntypedAPIFuture:
    """Named (`path`): a checkpoint folder, listed and downloadable. Ephemeral
    (`sampling_session_seq_id`, behind save_weights_and_get_sampling_client): an in-memory adapter
    version and a sampling session on it, nothing on disk (server/engine/versions.py)."""
    model = await owned_model(rt, tenant_id, req.model_id)
    with refusing(rt, model, req.seq_id):
        check_ttl(req.ttl_seconds)
        if req.sampling_session_seq_id is not None:
            await rt.db.run(lambda s: live_session(s, tenant_id, model.session_id))

    async def run_named() -> OpResult:
        await save_checkpoint(
            rt, tenant_id, model, kind="sampler", name=req.path, with_optimizer=False,
            ttl_seconds=req.ttl_seconds, user_metadata=req.user_metadata,
        )
        return json_result(api.SaveWeightsForSamplerResponse(path=str(ids.TinkerPath(model.id, "sampler", req.path))))

    async def run_ephemeral() -> OpResult:
        sampler_id = ids.sampling_session_id(model.session_id, req.sampling_session_seq_id)
        version = await versions.make_version(rt, model)
        await rt.db.run(
            lambda s: s.merge(
                SamplingSession(
                    id=sampler_id, tenant_id=tenant_id, session_id=model.session_id, base_model=model.base_model,
                    version=version.key, model_id=model.id,
                )
            )
        )
        return json_result(api.SaveWeightsForSamplerResponse(sampling_session_id=sampler_id))

    run = run_named if req.sampling_session_seq_id is None else run_ephemeral
    return await _model_op(rt, tenant_id, model, kind=OpKind.SAVE_WEIGHTS_FOR_SAMPLER, seq_id=req.seq_id, fingerprint=fingerprint, run=run)


async def save_weights_external(
    rt: Runtime, tenant_id: str, req: api.SaveWeightsExternalRequest, fingerprint: str
) -> api.UntypedAPIFuture:
    """The adapter as a peft folder (what vLLM, peft and merge tools load), optionally encrypted."""
    model = await owned_model(rt, tenant_id, req.model_id)
    with refusing(rt, model, req.seq_id):
        check_ttl(req.ttl_seconds)
        try:
            age_recipients(req.age_encryption_recipients or [])
        except RecipientError as exc:
            raise InvalidRequest(str(exc), field=f"age_encryption_recipients[{exc.index}]") from None

    async def run() -> OpResult:
        row = await save_checkpoint(
            rt, tenant_id, model, kind="external", name=req.path, with_optimizer=False, ttl_seconds=req.ttl_seconds,
            encrypt_to=req.age_encryption_recipients,
        )
        path = str(ids.TinkerPath(model.id, "external", req.path))
        return json_result(api.SaveWeightsExternalResponse(path=path, size_bytes=row.size_bytes))

    return await _model_op(rt, tenant_id, model, kind=OpKind.SAVE_WEIGHTS_EXTERNAL, seq_id=req.seq_id,
                           fingerprint=fingerprint, run=run)


async def unload_model(rt: Runtime, tenant_id: str, req: api.UnloadModelRequest, fingerprint: str) -> api.UntypedAPIFuture:
    """Free the model's weights after everything already queued for it; its checkpoints stay."""
    model = await owned_model(rt, tenant_id, req.model_id, touch=False, route=True)

    async def run() -> OpResult:
        await engine_of(rt, model).unload(model.id)
        await rt.release_model(tenant_id, model.id)
        log.info("model_unloaded", extra={"model_id": model.id, "tenant_id": tenant_id})
        return json_result(api.UnloadModelResponse(model_id=model.id))

    return await _model_op(rt, tenant_id, model, kind=OpKind.UNLOAD_MODEL, seq_id=None, fingerprint=fingerprint, run=run)


async def training_checkpoint(rt: Runtime, tenant_id: str, path: str, field: str = "path") -> Checkpoint:
    row = await rt.db.run(lambda s: resolve_checkpoint(s, tenant_id, path, field=field))
    if row.kind != "training":
        raise InvalidRequest(
            f"{path} holds {row.kind} weights; loading training state needs a tinker://…/weights/… checkpoint "
            "written by save_state",
            field=field,
        )
    return row


async def load_weights(rt: Runtime, tenant_id: str, req: api.LoadWeightsRequest, fingerprint: str) -> api.UntypedAPIFuture:
    if req.creates_model:
        checkpoint = await _loadable_checkpoint(rt, tenant_id, req)
        return await _create_from_checkpoint(rt, tenant_id, req, checkpoint, fingerprint)
    model = await owned_model(rt, tenant_id, req.model_id)
    with refusing(rt, model, req.seq_id):
        ref = (await _loadable_checkpoint(rt, tenant_id, req)).storage_dir

    async def run() -> OpResult:
        await engine_of(rt, model).load(model.id, ref, with_optimizer=req.optimizer)
        return json_result(api.LoadWeightsResponse(path=req.path, model_id=model.id))

    return await _model_op(rt, tenant_id, model, kind=OpKind.LOAD_WEIGHTS, seq_id=req.seq_id, fingerprint=fingerprint, run=run)


async def _loadable_checkpoint(rt: Runtime, tenant_id: str, req: api.LoadWeightsRequest) -> Checkpoint:
    checkpoint = await training_checkpoint(rt, tenant_id, req.path)
    if req.optimizer and not checkpoint.has_optimizer:
        raise InvalidRequest(f"{req.path} holds no optimizer state; load it with optimizer=False", field="optimizer")
    return checkpoint


async def _create_from_checkpoint(
    rt: Runtime, tenant_id: str, req: api.LoadWeightsRequest, checkpoint: Checkpoint, fingerprint: str
) -> api.UntypedAPIFuture:
    assert req.session_id is not None and req.model_seq_id is not None
    session_id, seq = req.session_id, req.model_seq_id
    await rt.db.run(lambda s: live_session(s, tenant_id, session_id))
    await rt.refresh_limits(tenant_id)
    source = await rt.db.run(lambda s: s.get(Model, checkpoint.model_id))
    base = rt.served(source.base_model, field="path")  # the new model is on the checkpoint's base model
    if req.base_model is not None and req.base_model != base:
        raise InvalidRequest(f"{req.path} was trained on base model {base!r}, not {req.base_model!r}", field="base_model")
    # A published checkpoint (or one saved before the tenant's limit was lowered) may be bigger.
    rank = source.lora_rank
    if rank > (cap := rt.quotas.limits(tenant_id).max_lora_rank):
        raise InvalidRequest(f"{req.path} has LoRA rank {rank}, over this tenant's max_lora_rank {cap}", field="path")
    await rt.check_model_room(tenant_id)
    model_id = ids.model_id(session_id, seq)

    async def run() -> OpResult:
        if await rt.db.run(lambda s: s.get(Model, model_id)) is not None:
            raise OperationFailed(f"model {model_id} already exists (model_seq_id {seq} was used before)")
        async with model_slot(rt, tenant_id, model_id, base):
            spec = await rt.engine_for(base).load(model_id, checkpoint.storage_dir, with_optimizer=req.optimizer)
            await rt.db.run(lambda s: insert_model(s, tenant_id, session_id, seq, base, spec, req.user_metadata,
                                                    rt.instances.id))
        log.info("model_created_from_checkpoint", extra={"model_id": model_id, "tenant_id": tenant_id})
        return json_result(api.LoadWeightsResponse(path=req.path, model_id=model_id))

    sub = await rt.enqueue(
        tenant_id, kind=OpKind.LOAD_WEIGHTS, scope=session_scope(session_id), seq_id=seq, fingerprint=fingerprint, run=run
    )
    return api.UntypedAPIFuture(request_id=sub.request_id, model_id=model_id)
