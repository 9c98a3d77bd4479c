"""The native Twinkle API's model app: `POST /api/v1/model/{base}/twinkle/{op}`.

A native adapter is a training run like a Tinker model (the same pool, quotas, queue, fairness,
owner routing and checkpoints), named per (session, adapter name) as Twinkle names it
(`ids.native_model_id`). Each call is queued on its model like a Tinker operation and held inside
the HTTP request until it has run (twinkle_client waits, with no futures). The compute is
workers/native_training.py, on the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from schemas import native as nt
from server import ids
from server.errors import Conflict, InvalidRequest, NotFound, NotImplementedHere, OperationFailed
from server.kinds import FutureState, OpKind, ResultFormat
from server.ops import native_sampling, training
from server.ops.checkpoints import resolve_checkpoint
from server.ops.native_service import SESSION_FIELD, served_base
from server.ops.sessions import live_session
from server.queue.scheduler import OpResult
from server.queue.scopes import model_scope
from server.runtime import Runtime
from server.store.tables import Model
from workers.native_training import CLIENT_OPS
from workers.types import LoraSpec

log = logging.getLogger(__name__)
NEVER = "apply_patch is never run here: it would patch the base model every tenant shares"
NO_HUB = ("this server has no model hub to upload to; download the checkpoint instead "
          "(GET /twinkle/v1/export/{run}/{checkpoint_id}, peft or merged)")
ATTN, MLP = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
NAME = re.compile(r"[^\w-]")


async def call(rt: Runtime, tenant_id: str, session_id: str | None, base: str, op: str, body: dict[str, Any]) -> Any:
    base = served_base(rt, base)
    if op == "create":
        return {"status": "ok"}
    if op == "apply_patch":
        raise InvalidRequest(NEVER, field="op")
    if op == "upload_to_hub":
        raise NotImplementedHere(NO_HUB, field="op")
    if session_id is None:
        raise InvalidRequest("send the session id (twinkle_client's init_twinkle_client does)", field=SESSION_FIELD)
    name = body.pop("adapter_name", None)
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise InvalidRequest("the adapter's name: a string of 1 to 64 characters", field="adapter_name")
    if op == "add_adapter_to_model":
        return await add_adapter(rt, tenant_id, session_id, base, name, body)
    model = await training.owned_model(rt, tenant_id, ids.native_model_id(session_id, name))
    if op == "set_template":  # InputFeatures need no template here: a checked choice (Twinkle's data example calls it)
        if not isinstance(body.get("template_cls"), str):
            raise InvalidRequest("a template name", field="template_cls")
        native_sampling.template_choice(nt.SetTemplateRequest(**body))
        return None
    if op in CLIENT_OPS:
        result = await queued(rt, tenant_id, model, lambda: rt.engine_for(base).native(model.id, op, body))
        _on_curve(rt, model, op, result)
        return result
    if op == "save":
        return await queued(rt, tenant_id, model, lambda: save(rt, tenant_id, model, body))
    if op == "load":
        return await queued(rt, tenant_id, model, lambda: load(rt, tenant_id, model, body))
    if op == "resume_from_checkpoint":
        return await queued(rt, tenant_id, model, lambda: resume(rt, tenant_id, model, body))
    allowed = sorted({"create", "add_adapter_to_model", "save", "load", "resume_from_checkpoint", "set_template",
                      *CLIENT_OPS})
    raise NotFound(f"unknown model operation {op!r}; this server runs: {', '.join(allowed)}", field="op")


# The native ops that draw a run's curve on the dashboard (server/tenancy/run_metrics.py).
CURVE_KINDS = {"forward_backward": OpKind.FORWARD_BACKWARD, "step": OpKind.OPTIM_STEP}


def _on_curve(rt: Runtime, model: Model, op: str, result: Any) -> None:
    """A native forward_backward's loss and metrics (its finite floats), or a step, onto the run's curve."""
    if (kind := CURVE_KINDS.get(op)) is None:
        return
    answer = result if isinstance(result, dict) else {}
    metrics = {k: v for k, v in answer.items() if isinstance(v, float) and math.isfinite(v)}
    tokens = answer.get("num_tokens")
    rt.run_metrics.record(model.tenant_id, model.id, kind, tokens if isinstance(tokens, int) else 0, metrics)


async def queued(rt: Runtime, tenant_id: str, model: Model, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` as an operation of the model's queue (after what is queued before it, in turn
    with other tenants) and return its result, for a caller that waits in the request."""
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def run() -> OpResult:
        try:
            value = await work()
        except BaseException as exc:
            if not waiter.done():
                waiter.set_exception(exc)
            raise
        if not waiter.done():
            waiter.set_result(value)
        return json.dumps(value).encode(), ResultFormat.JSON

    def done(request_id: str, state: str, _: bytes | None) -> None:
        if state != FutureState.DONE and not waiter.done():  # cancelled before it ran (its session ended)
            waiter.set_exception(OperationFailed(f"{request_id} did not run: its session ended"))

    await rt.enqueue(tenant_id, kind=OpKind.NATIVE, scope=model_scope(model.id), seq_id=None, fingerprint="",
                     run=run, ordered=True, notify=done)
    return await waiter


# ----- adapters ------------------------------------------------------------------------------------
async def add_adapter(rt: Runtime, tenant_id: str, session_id: str, base: str, name: str, body: dict[str, Any]) -> dict:
    config = lora_config(body.pop("config", None))
    steps = body.pop("gradient_accumulation_steps", None)
    body.pop("save_dir", None)  # a client-side path: never a server path
    if body:
        key = next(iter(body))
        raise InvalidRequest(f"add_adapter_to_model takes no argument {key!r}", field=key)
    await rt.db.run(lambda s: live_session(s, tenant_id, session_id, field=SESSION_FIELD))
    spec = lora_spec(rt, config)
    await rt.refresh_limits(tenant_id)
    rt.quotas.check_rank(tenant_id, spec.rank)
    model_id = ids.native_model_id(session_id, name)
    if await rt.db.run(lambda s: s.get(Model, model_id)) is not None:
        raise Conflict(f"adapter {name!r} already exists in this session", field="adapter_name")
    await rt.check_model_room(tenant_id)
    async with training.model_slot(rt, tenant_id, model_id, base):
        engine = rt.engine_for(base)
        await engine.create_adapter(model_id, spec)
        if steps is not None:
            await engine.native(model_id, "configure", {"gradient_accumulation_steps": steps})
        await rt.db.run(lambda s: training.insert_model(
            s, tenant_id, session_id, -1, base, spec, {"twinkle_adapter_name": name}, rt.instances.id, model_id))
    log.info("native_adapter_created", extra={"model_id": model_id, "tenant_id": tenant_id, "rank": spec.rank})
    return {"status": "ok", "adapter_name": model_id}


def lora_config(config: Any) -> dict[str, Any]:
    """peft's LoraConfig as twinkle_client sends it: a JSON string tagged with its type (or the
    object itself)."""
    if config is None:
        raise InvalidRequest("this server trains LoRA adapters only: send a peft LoraConfig", field="config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            raise InvalidRequest("not JSON: a serialised peft LoraConfig", field="config") from None
    if not isinstance(config, dict):
        raise InvalidRequest("a peft LoraConfig object", field="config")
    return config


def lora_spec(rt: Runtime, config: dict[str, Any]) -> LoraSpec:
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= rt.settings.max_lora_rank:
        raise InvalidRequest(f"LoRA rank r must be an integer in [1, {rt.settings.max_lora_rank}]", field="config.r")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise InvalidRequest("lora_alpha must be a positive number", field="config.lora_alpha")
    if config.get("lora_dropout") not in (None, 0, 0.0):
        raise InvalidRequest("adapters here train without dropout: send lora_dropout 0", field="config.lora_dropout")
    attn, mlp, unembed = _targets(config.get("target_modules", "all-linear"))
    return LoraSpec(rank=rank, seed=secrets.randbits(31), alpha=float(alpha), train_attn=attn, train_mlp=mlp,
                    train_unembed=unembed)


def _targets(modules: Any) -> tuple[bool, bool, bool]:
    """(attention, MLP, lm_head) from target_modules: 'all-linear' or whole groups of projections."""
    if modules in ("all-linear", None):
        return True, True, False
    names = {modules} if isinstance(modules, str) else set(modules) if isinstance(modules, list) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise InvalidRequest("'all-linear' or a list of module names", field="config.target_modules")
    attn, mlp = bool(names & ATTN), bool(names & MLP)
    if (attn and not ATTN <= names) or (mlp and not MLP <= names) or names - ATTN - MLP - {"lm_head"}:
        raise InvalidRequest(
            "this server trains whole groups of layers: 'all-linear', or a union of attention "
            f"({', '.join(sorted(ATTN))}), MLP ({', '.join(sorted(MLP))}) and lm_head", field="config.target_modules")
    return attn, mlp, "lm_head" in names


# ----- checkpoints ---------------------------------------------------------------------------------
async def save(rt: Runtime, tenant_id: str, model: Model, body: dict[str, Any]) -> dict[str, Any]:
    name = NAME.sub("_", str(body.get("name") or "checkpoint"))[:80]
    is_sampler = bool(body.get("is_sampler", False))
    kind = "sampler" if is_sampler else "training"
    if is_sampler:  # a new path every time: the sampler caches weights by path
        name = f"{name}-{datetime.now(UTC):%Y%m%d_%H%M%S}-{secrets.token_hex(3)}"
    with_optimizer = bool(body.get("save_optimizer", False))
    if body.get("consumed_train_samples") is not None:  # recorded with the optimizer's state
        await rt.engine_for(model.base_model).native(
            model.id, "progress", {"consumed_train_samples": body["consumed_train_samples"]})
    await training.save_checkpoint(rt, tenant_id, model, kind=kind, name=name, with_optimizer=with_optimizer,
                                   overwrite=not is_sampler)
    return {"twinkle_path": ids.TinkerPath(model.id, kind, name).twinkle, "checkpoint_dir": None}


async def load(rt: Runtime, tenant_id: str, model: Model, body: dict[str, Any]) -> None:
    """The weights of a checkpoint the tenant may read (`load_optimizer`: its optimizer too)."""
    ref = await _checkpoint_ref(rt, tenant_id, body.get("name"))
    await rt.engine_for(model.base_model).load(model.id, ref, with_optimizer=bool(body.get("load_optimizer", False)))


async def resume(rt: Runtime, tenant_id: str, model: Model, body: dict[str, Any]) -> dict[str, int]:
    """Weights, and unless `resume_only_model` the optimizer, scheduler and progress of a save made
    with `save_optimizer=True`; answers the progress (cur_step, consumed_train_samples, ...)."""
    ref = await _checkpoint_ref(rt, tenant_id, body.get("name"))
    engine = rt.engine_for(model.base_model)
    await engine.load(model.id, ref, with_optimizer=not body.get("resume_only_model", False))
    return await engine.native(model.id, "progress", {})


async def _checkpoint_ref(rt: Runtime, tenant_id: str, path: Any) -> str:
    if not isinstance(path, str):
        raise InvalidRequest("the twinkle:// path of a checkpoint", field="name")
    return await rt.db.run(lambda s: resolve_checkpoint(s, tenant_id, path, field="name").storage_dir)
