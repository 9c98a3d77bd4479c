"""Sampling sessions and sample requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from schemas import tinker as api
from schemas.futures import SamplingSessionTarget
from schemas.tensors import TargetIds, check_sample_options, decode_target_ids
from schemas.wire import SampledSequenceOut, encode_sample_response
from server import ids
from server.errors import Elsewhere, InvalidRequest, NotFound, OperationFailed
from server.kinds import FutureState, OpKind, ResultFormat
from server.ops import versions
from server.ops.checkpoints import readable_by, resolve_checkpoint
from server.ops.sessions import live_session
from server.ops.validation import check_token_ids
from server.queue.futures import Submission
from server.queue.scheduler import Batch, OpResult
from server.queue.scopes import BASE_ADAPTER, DIRECT_SAMPLER, sample_batch_key, sample_queue, sampler_scope
from server.runtime import Runtime
from server.store.queries import owned
from server.store.tables import Checkpoint, Model, SamplingSession
from workers.types import BaseModelInfo, PromptScoring, SampleJob, SampleOutput, SampleParams, SampleTarget

log = logging.getLogger(__name__)
MAX_NUM_SAMPLES = 128


async def create_sampling_session(rt: Runtime, tenant_id: str, req: api.CreateSamplingSessionRequest) -> str:
    sampler_id = ids.sampling_session_id(req.session_id, req.sampling_session_seq_id)
    checkpoint, base = None, rt.served(req.base_model)
    if req.model_path:
        checkpoint, base = await _checkpoint_for(rt, tenant_id, req.model_path)

    def insert(s: Session) -> None:
        live_session(s, tenant_id, req.session_id)
        existing = s.get(SamplingSession, sampler_id)
        if existing is not None:  # a retried create: same id, same target
            owned(s, SamplingSession, tenant_id, sampler_id)
            return
        s.add(
            SamplingSession(
                id=sampler_id, tenant_id=tenant_id, session_id=req.session_id, base_model=base,
                model_path=req.model_path, checkpoint_id=checkpoint.id if checkpoint else None,
            )
        )

    await rt.db.run(insert)
    return sampler_id


async def get_sampler(rt: Runtime, tenant_id: str, sampler_id: str) -> api.GetSamplerResponse:
    row = await rt.db.run(lambda s: owned(s, SamplingSession, tenant_id, sampler_id))
    return api.GetSamplerResponse(sampler_id=row.id, base_model=row.base_model, model_path=row.model_path)


async def _checkpoint_for(
    rt: Runtime, tenant_id: str, model_path: str, *, field: str = "model_path"
) -> tuple[Checkpoint, str]:
    """The readable checkpoint at `model_path`, and the served base model it was trained on."""

    def read(s: Session) -> tuple[Checkpoint, str]:
        checkpoint = resolve_checkpoint(s, tenant_id, model_path, field=field)
        return checkpoint, s.get(Model, checkpoint.model_id).base_model

    checkpoint, base = await rt.db.run(read)
    return checkpoint, rt.served(base, field=field)


@dataclass(frozen=True)
class Target:
    """What a sample runs on: the adapter version (None: the bare base model), its base model,
    and the in-memory version it pins while it runs (None for a checkpoint or the base model)."""

    adapter: SampleTarget | None
    base: str
    pinned: str | None = None

    @property
    def batch_on(self) -> str:
        # Samples of the bare base model name it: several base models never share a pass.
        return self.adapter.key if self.adapter is not None else f"{BASE_ADAPTER}:{self.base}"


def _checkpoint_target(checkpoint: Checkpoint, base: str) -> Target:
    # A checkpoint's folder is immutable (an overwrite makes a new one): its storage ref is its version key.
    return Target(SampleTarget(key=checkpoint.storage_dir, ref=checkpoint.storage_dir), base)


async def _target(rt: Runtime, tenant_id: str, req: api.SampleRequest) -> Target:
    """The adapter version to sample with, and its base model. A sampling session's checkpoint is
    checked again at every request: it may have been deleted, expired or (if it is another
    tenant's) unpublished since the session was made. An in-memory version is sampled where it
    lives, in the process that owns its model (elsewhere: the request is forwarded there)."""
    if req.sampling_session_id is not None:
        field = "sampling_session_id"

        def find(s: Session) -> Target:
            row = owned(s, SamplingSession, tenant_id, req.sampling_session_id, field=field)
            live_session(s, tenant_id, row.session_id, field=field)  # 410 once it has ended
            if row.version is not None:
                model = s.get(Model, row.model_id)
                if model is not None and (url := rt.instances.claim(s, model)) is not None:
                    raise Elsewhere(url, model.id)
                return Target(SampleTarget(key=row.version), row.base_model, pinned=row.version)
            if row.checkpoint_id is None:
                if row.model_path:  # its checkpoint was deleted: resolving the path says so
                    return _checkpoint_target(resolve_checkpoint(s, tenant_id, row.model_path, field=field), row.base_model)
                return Target(None, row.base_model)
            checkpoint = s.get(Checkpoint, row.checkpoint_id)
            if checkpoint is None or not readable_by(checkpoint, tenant_id):
                raise NotFound(f"the checkpoint of sampler {row.id} is no longer available", field=field)
            return _checkpoint_target(checkpoint, row.base_model)

        target = await rt.db.run(find)
        rt.served(target.base, field=field)
        return target
    if req.model_path is not None:
        checkpoint, base = await _checkpoint_for(rt, tenant_id, req.model_path)
        return _checkpoint_target(checkpoint, base)
    return Target(None, rt.served(req.base_model))


def _prompt_tokens(base: BaseModelInfo, req: api.SampleRequest) -> list[int]:
    tokens: list[int] = []
    for j, chunk in enumerate(req.prompt.chunks):
        if not isinstance(chunk, api.EncodedTextChunk):
            raise InvalidRequest(
                f"{chunk.type} chunks are not supported: this server's base models are text-only",
                field=f"prompt.chunks[{j}]",
            )
        tokens.extend(chunk.tokens)
    check_token_ids(np.asarray(tokens, dtype=np.int64), base, "prompt")
    return tokens


def _params(rt: Runtime, base: BaseModelInfo, req: api.SampleRequest, prompt_len: int) -> SampleParams:
    p = req.sampling_params
    room = base.max_context_length - prompt_len
    max_tokens = p.max_tokens if p.max_tokens is not None else min(rt.settings.default_sample_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the context length "
            f"{base.max_context_length}",
            field="sampling_params.max_tokens",
        )
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    return SampleParams(
        max_tokens=max(max_tokens, 0),
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop_tokens=tuple(s for s in stop if isinstance(s, int)),
        stop_strings=tuple(s for s in stop if isinstance(s, str)),
        stop_at_eos=p.stop is None or len(stop) > 0,  # stop=[] turns every stop off, EOS included
    )


async def sample(rt: Runtime, tenant_id: str, req: api.SampleRequest, fingerprint: str) -> api.UntypedAPIFuture:
    if req.num_samples > MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples is limited to {MAX_NUM_SAMPLES}", field="num_samples")
    target = await _target(rt, tenant_id, req)
    info = rt.base_for(target.base)
    prompt = _prompt_tokens(info, req)
    job, target_ids = _job(rt, info, req, prompt)
    sub = await _submit(rt, tenant_id, target, _Payload(job, target_ids, tenant=tenant_id),
                        sampler_id=req.sampling_session_id, seq_id=req.seq_id, fingerprint=fingerprint)
    return api.UntypedAPIFuture(
        request_id=sub.request_id, sample_sequence_ids=[f"{sub.request_id}:{i}" for i in range(req.num_samples)]
    )


async def resolve_model(rt: Runtime, tenant_id: str, model: str, *, field: str = "model") -> Target:
    """What `model` names: a tinker:// checkpoint path the tenant may read, or a served base model."""
    if model.startswith(ids.PATH_SCHEMES):
        checkpoint, base = await _checkpoint_for(rt, tenant_id, model, field=field)
        return _checkpoint_target(checkpoint, base)
    return Target(None, rt.served(model, field=field))


async def submit_generate(rt: Runtime, tenant_id: str, target: Target, job: SampleJob) -> asyncio.Future[SampleOutput]:
    """One sample request whose caller waits in-process for the output (the OpenAI-compatible
    API): admitted, counted, queued and batched with asample's, and recorded as a future like
    them. Refusals (quotas, a full queue) raise here; the returned future gives the output."""
    if job.num_samples > MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples is limited to {MAX_NUM_SAMPLES}", field="n")
    waiter: asyncio.Future[SampleOutput] = asyncio.get_running_loop().create_future()
    await _submit(rt, tenant_id, target, _Payload(job, None, waiter, tenant=tenant_id), sampler_id=None, seq_id=None,
                  fingerprint="")
    return waiter


@dataclass(frozen=True, eq=False)
class _Payload:
    job: SampleJob
    target_ids: TargetIds | None
    waiter: asyncio.Future[SampleOutput] | None = None  # a caller waiting in-process for the output
    tenant: str = ""  # whose request it is (a batch may hold several tenants'): for metrics


async def _submit(
    rt: Runtime, tenant_id: str, target: Target, payload: _Payload, *, sampler_id: str | None,
    seq_id: int | None, fingerprint: str,
) -> Submission:
    job = payload.job
    await rt.refresh_limits(tenant_id)
    tokens = (len(job.prompt) + job.params.max_tokens) * job.num_samples
    rt.quotas.check_tokens(tenant_id, tokens, "sampling_params.max_tokens")
    release = await rt.admit_sample(tenant_id)
    if target.pinned is not None:
        try:  # held until the sample ends, so that the version is not released under it
            versions.pin(rt, target.pinned, sampler_id or "")
        except BaseException:
            release()
            raise
        release = _also(release, lambda: versions.unpin(rt, target.pinned))

    async def run_many(payloads: list[_Payload]) -> list[OpResult]:
        try:
            outputs = await rt.engine_for(target.base).sample_batch(target.adapter, [p.job for p in payloads])
        except BaseException as exc:
            for p in payloads:
                _settle(p.waiter, exc=exc)
            raise
        for p, out in zip(payloads, outputs):
            _settle(p.waiter, out)
            rt.metrics.sample_done(p.tenant, len(p.job.prompt), sum(len(s.tokens) for s in out.sequences))
        return [_encode(out, p.target_ids) for out, p in zip(outputs, payloads)]

    async def run() -> OpResult:
        return (await run_many([payload]))[0]

    publish = completion_notifier(rt, feed_key(tenant_id, sampler_id or DIRECT_SAMPLER, seq_id))

    def done(request_id: str, state: str, result: bytes | None) -> None:
        release()
        if state != FutureState.DONE:  # cancelled or failed before it ran
            _settle(payload.waiter, exc=OperationFailed(f"sample {request_id} did not run"))
        publish(request_id, state, result)

    # Requests on the same adapter version share one batched prefill and decode (one adapter per pass).
    batch = Batch(key=sample_batch_key(target.batch_on), size=job.num_samples, budget=rt.settings.sample_batch_rows,
                  payload=payload, run=run_many)
    try:
        sub = await rt.enqueue(
            tenant_id, kind=OpKind.SAMPLE, scope=sampler_scope(sampler_id), seq_id=seq_id,
            fingerprint=fingerprint, run=run, queue=sample_queue(tenant_id, target.batch_on), batch=batch,
            notify=done, cost=tokens,
        )
    except BaseException:
        release()
        raise
    if not sub.is_new:  # a retry of a request already admitted: it holds its own place
        release()
    return sub


def _settle(waiter: asyncio.Future | None, out: SampleOutput | None = None, *, exc: BaseException | None = None) -> None:
    if waiter is None or waiter.done():
        return
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(out)


def _also(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """Both, each once, the second even if the first raises."""
    def both() -> None:
        try:
            first()
        finally:
            second()

    return both


def _job(rt: Runtime, base: BaseModelInfo, req: api.SampleRequest, prompt: list[int]
         ) -> tuple[SampleJob, TargetIds | None]:
    params = _params(rt, base, req, len(prompt))
    check_sample_options(
        prompt_len=len(prompt), vocab_size=base.vocab_size, prompt_logprobs=bool(req.prompt_logprobs),
        prompt_logprobs_last_n=req.prompt_logprobs_last_n, topk_prompt_logprobs=req.topk_prompt_logprobs,
        topk_sample_logprobs=req.topk_sample_logprobs, prompt_alt_tokens_k=req.prompt_alt_tokens_k,
        num_samples=req.num_samples, max_tokens=params.max_tokens,
    )
    target = None
    if req.target_prompt_logprobs is not None:
        target = decode_target_ids(req.target_prompt_logprobs, prompt_len=len(prompt), vocab_size=base.vocab_size)
    scoring = PromptScoring(
        logprobs=bool(req.prompt_logprobs), last_n=req.prompt_logprobs_last_n, topk=req.topk_prompt_logprobs,
        target_ids=None if target is None else target.ids, alt_tokens_k=req.prompt_alt_tokens_k,
    )
    job = SampleJob(prompt, req.num_samples, params, scoring, req.topk_sample_logprobs)
    return job, target


def _encode(out: SampleOutput, target: TargetIds | None) -> OpResult:
    sequences = [SampledSequenceOut(s.tokens, s.logprobs, s.stop_reason, topk=s.topk) for s in out.sequences]
    body = encode_sample_response(
        sequences,
        out.prompt_logprobs,
        topk_prompt_logprobs=out.topk_prompt,
        target_prompt_logprobs=out.target_prompt_logprobs,
        target_prompt_logprobs_csr=None if target is None else target.csr,
        prompt_alt_tokens=None if out.alt_tokens is None else (out.alt_tokens, out.alt_logprobs),
    )
    return body, ResultFormat.PROTO


# ----- completion feed and cancellation ----------------------------------------------------------
def feed_key(tenant_id: str, sampler_id: str, seq_id: int | None) -> tuple[str, str, int]:
    # A cloned SamplingClient numbers its requests from 1e9 * clone id
    # (docs/tinker-protocol-notes.md, "Seq ids of cloned sampling clients").
    return tenant_id, sampler_id, (seq_id or 0) // 1_000_000_000


def completion_notifier(rt: Runtime, key: tuple[str, str, int]):  # noqa: ANN201 - a scheduler.Notify
    def notify(request_id: str, state: str, result: bytes | None) -> None:
        if state == FutureState.DONE:
            event = {"state": "finished", "request_id": request_id, "response_payload_uncompressed_size": len(result or b"")}
        else:
            event = {"state": "failed", "request_id": request_id}
        rt.feeds.publish(key, event)

    return notify


async def poll_completions(
    rt: Runtime, tenant_id: str, target: SamplingSessionTarget, prev_cursor: int, timeout: float
) -> tuple[list[dict], int]:
    await rt.db.run(lambda s: owned(s, SamplingSession, tenant_id, target.sampling_session_id,
                                    field="target.sampling_session_id"))
    key = (tenant_id, target.sampling_session_id, target.cloned_sampler_id)
    return await rt.feeds.poll(key, prev_cursor, timeout)


async def cancel(rt: Runtime, tenant_id: str, request_id: str) -> bool:
    """Cancel a request that has not started yet; one that is running or done is left alone."""
    view = await rt.hub.get(tenant_id, request_id)
    if view is None:
        raise NotFound(f"request {request_id!r} not found", field="request_id")
    if view.state != FutureState.PENDING:
        return False
    return await rt.fail_queued(request_id, "cancelled by the client before it ran")
