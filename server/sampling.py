"""Sampling sessions and sample requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from schemas import tinker as api
from schemas.wire import SampledSequenceOut, encode_sample_response
from server import ids
from server.errors import InvalidRequest, NotFound
from server.runtime import Runtime
from server.scheduler import OpResult
from server.sessions import live_session
from server.store.queries import checkpoint_by_name, owned
from server.store.tables import Checkpoint, SamplingSession
from server.validation import check_token_ids
from workers.types import SampleParams

MAX_NUM_SAMPLES = 128
# Options of the full sampling surface that this server does not compute yet. Silently ignoring
# them would make the SDK raise a confusing RuntimeError later (protocol §8 #27), so say so now.
_UNSUPPORTED = {
    "topk_prompt_logprobs": lambda r: r.topk_prompt_logprobs > 0,
    "topk_sample_logprobs": lambda r: r.topk_sample_logprobs > 0,
    "target_prompt_logprobs": lambda r: r.target_prompt_logprobs is not None,
    "prompt_alt_tokens_k": lambda r: r.prompt_alt_tokens_k > 0,
    "prompt_logprobs_last_n": lambda r: r.prompt_logprobs_last_n is not None,
}


async def create_sampling_session(rt: Runtime, tenant_id: str, req: api.CreateSamplingSessionRequest) -> str:
    sampler_id = ids.sampling_session_id(req.session_id, req.sampling_session_seq_id)
    checkpoint = await _checkpoint_for(rt, tenant_id, req.model_path) if req.model_path else None
    base = _served_base(rt, req.base_model)

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


def _served_base(rt: Runtime, name: str | None) -> str:
    if name is not None and name != rt.base.name:
        raise InvalidRequest(f"base model {name!r} is not served here; this server serves {rt.base.name!r}", field="base_model")
    return rt.base.name


async def _checkpoint_for(rt: Runtime, tenant_id: str, model_path: str) -> Checkpoint:
    parsed = ids.parse_tinker_path(model_path, field="model_path")

    def find(s: Session) -> Checkpoint:
        row = checkpoint_by_name(s, tenant_id, parsed.model_id, parsed.kind, parsed.name)
        if row is None:
            raise NotFound(f"checkpoint {model_path} not found", field="model_path")
        return row

    return await rt.db.run(find)


async def _adapter_dir(rt: Runtime, tenant_id: str, req: api.SampleRequest) -> Path | None:
    """The checkpoint folder to sample with (None: the bare base model)."""
    if req.sampling_session_id is not None:

        def find(s: Session) -> str | None:
            row = owned(s, SamplingSession, tenant_id, req.sampling_session_id, field="sampling_session_id")
            return None if row.checkpoint_id is None else s.get(Checkpoint, row.checkpoint_id).storage_dir

        relative = await rt.db.run(find)
    elif req.model_path is not None:
        relative = (await _checkpoint_for(rt, tenant_id, req.model_path)).storage_dir
    else:
        _served_base(rt, req.base_model)
        relative = None
    return None if relative is None else rt.data_dir / relative


def _prompt_tokens(rt: Runtime, req: api.SampleRequest) -> list[int]:
    tokens: list[int] = []
    for j, chunk in enumerate(req.prompt.chunks):
        if not isinstance(chunk, api.EncodedTextChunk):
            raise InvalidRequest(
                f"{chunk.type} chunks are not supported: this server's base models are text-only",
                field=f"prompt.chunks[{j}]",
            )
        tokens.extend(chunk.tokens)
    check_token_ids(np.asarray(tokens, dtype=np.int64), rt.base, "prompt")
    return tokens


def _params(rt: Runtime, req: api.SampleRequest, prompt_len: int) -> SampleParams:
    p = req.sampling_params
    room = rt.base.max_context_length - prompt_len
    max_tokens = p.max_tokens if p.max_tokens is not None else min(rt.settings.default_sample_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the context length "
            f"{rt.base.max_context_length}",
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
    for name, requested in _UNSUPPORTED.items():
        if requested(req):
            raise InvalidRequest(f"{name} is not supported by this server yet", field=name)
    if req.num_samples > MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples is limited to {MAX_NUM_SAMPLES}", field="num_samples")
    adapter_dir = await _adapter_dir(rt, tenant_id, req)
    prompt = _prompt_tokens(rt, req)
    params = _params(rt, req, len(prompt))
    want_prompt_lp = bool(req.prompt_logprobs)

    async def run() -> OpResult:
        out = await rt.engine.sample(adapter_dir, prompt, req.num_samples, params, prompt_logprobs=want_prompt_lp)
        sequences = [SampledSequenceOut(s.tokens, s.logprobs, s.stop_reason) for s in out.sequences]
        return encode_sample_response(sequences, out.prompt_logprobs), "proto"

    scope = f"sampler:{req.sampling_session_id or 'direct'}"
    # Without a seq_id there is nothing to recognise a retry by: every such request is new.
    seq = req.seq_id if req.seq_id is not None else -1
    fp = fingerprint if req.seq_id is not None else ids.new_id("fp")
    request_id = await rt.enqueue(tenant_id, kind="sample", scope=scope, seq_id=seq, fingerprint=fp, run=run)
    return api.UntypedAPIFuture(
        request_id=request_id, sample_sequence_ids=[f"{request_id}:{i}" for i in range(req.num_samples)]
    )
