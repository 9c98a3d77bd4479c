"""The OpenAI-compatible API: models, completions and chat completions.

`model` names a served base model or a `tinker://<run>/sampler_weights/<name>` checkpoint the
caller may read (its own, or a published one). A request becomes one Tinker sample job per prompt,
run by `sampling.submit_generate`: the same admission, quotas, fairness and batching as asample. Text
goes through the base model's tokenizer and chat template (ops/text.py); logprobs are the model's
own (temperature 1), as Tinker's are.

A returned text leaves out the end-of-sequence token a row stopped on, and ends before the first
stop string, as OpenAI's does; logprobs cover the tokens of the returned text. Parameters that
would change the result and are not supported (tools, response_format, logit_bias, penalties,
echo, suffix, best_of > n, ...) are refused with a 400 naming them, never ignored.

Streaming, the current limit: the sampler produces whole sequences (one batched decode; no
per-token callback crosses the engine boundary). A stream sends its role chunk at once, then, when
the sample is done, one chunk per token's piece of text, a last chunk with the finish_reason, and
the usage if asked; time to first token is the time of the whole sample.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC

import numpy as np
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from schemas import openai as oa
from schemas.tensors import check_sample_options
from schemas.wire import WireError
from server import ids
from server.errors import InvalidRequest
from server.ops import sampling, text
from server.ops.checkpoints import resolve_checkpoint
from server.ops.validation import check_token_ids
from server.runtime import Runtime
from server.store.queries import listed
from server.store.tables import Checkpoint, Tenant
from workers.types import BaseModelInfo, SampledSequence, SampleJob, SampleOutput, SampleParams

MAX_LISTED = 1000  # sampler checkpoints /v1/models lists, newest first
MAX_ROWS = sampling.MAX_NUM_SAMPLES  # prompts x n of one request
# Parameters that do not change a result: accepted and ignored.
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
                      "prompt_cache_key", "prompt_cache_retention"})
# Values that ask for nothing (besides null, false, 0 and empty): accepted whatever the parameter.
NEUTRAL = {"tool_choice": "none", "response_format": {"type": "text"}, "reasoning_effort": "none"}


# ----- models ------------------------------------------------------------------------------------
async def list_models(rt: Runtime, tenant_id: str) -> oa.ModelList:
    """The served base models, then the caller's named sampler checkpoints (newest first)."""

    def read(s: Session) -> list[oa.ModelCard]:
        rows = s.scalars(
            select(Checkpoint)
            .where(and_(Checkpoint.tenant_id == tenant_id, Checkpoint.kind == "sampler", listed()))
            .order_by(Checkpoint.created_at.desc(), Checkpoint.id)
            .limit(MAX_LISTED)
        ).all()
        owner = s.get(Tenant, tenant_id).name
        return [_checkpoint_card(row, owner) for row in rows]

    return oa.ModelList(data=[_base_card(rt, name) for name in rt.engines] + await rt.db.run(read))


async def get_model(rt: Runtime, tenant_id: str, model: str) -> oa.ModelCard:
    """One model the caller may sample: a served base model or a checkpoint it may read."""
    if not model.startswith(ids.PATH_SCHEMES):
        return _base_card(rt, rt.served(model, field="model"))

    def read(s: Session) -> oa.ModelCard:
        row = resolve_checkpoint(s, tenant_id, model, field="model")
        return _checkpoint_card(row, s.get(Tenant, row.tenant_id).name)

    return await rt.db.run(read)


def _base_card(rt: Runtime, name: str) -> oa.ModelCard:
    return oa.ModelCard(id=name, created=int(time.time() - rt.uptime()), owned_by="twinkle")


def _checkpoint_card(row: Checkpoint, owner: str) -> oa.ModelCard:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return oa.ModelCard(id=str(ids.TinkerPath(row.model_id, row.kind, row.name)), created=int(created.timestamp()),
                        owned_by=owner)


# ----- a request, checked and tokenized ----------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Everything a request runs with; made before anything is sampled (its errors are 4xx)."""

    model: str  # as the request named it
    target: sampling.Target
    tokenizer: text.Tokenizer
    jobs: list[SampleJob]  # one per prompt
    stop: tuple[str, ...]
    eos: frozenset[int]
    logprobs: bool
    top_logprobs: int
    include_usage: bool

    @property
    def n(self) -> int:
        return self.jobs[0].num_samples


async def plan_completion(rt: Runtime, tenant_id: str, req: oa.CompletionRequest) -> Plan:
    _refuse_unsupported(req)
    if req.echo:
        raise InvalidRequest("echo is not supported", field="echo")
    if req.best_of not in (None, req.n):
        raise InvalidRequest("best_of is not supported (only best_of == n)", field="best_of")
    if req.suffix:
        raise InvalidRequest("suffix is not supported", field="suffix")
    target, info, tokenizer = await _model(rt, tenant_id, req.model)
    prompts = await asyncio.to_thread(_prompts, tokenizer, req.prompt)
    return _plan(rt, req, target, info, tokenizer, prompts, max_tokens=req.max_tokens, max_field="max_tokens",
                 logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0, logprobs_field="logprobs")


async def plan_chat(rt: Runtime, tenant_id: str, req: oa.ChatCompletionRequest) -> Plan:
    _refuse_unsupported(req)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
    messages = _messages(req.messages)
    target, info, tokenizer = await _model(rt, tenant_id, req.model)
    prompt = await asyncio.to_thread(text.apply_chat_template, tokenizer, target.base, messages)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return _plan(rt, req, target, info, tokenizer, [prompt], max_tokens=max_tokens, max_field=max_field,
                 logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0, logprobs_field="top_logprobs")


async def _model(rt: Runtime, tenant_id: str, model: str
                 ) -> tuple[sampling.Target, BaseModelInfo, text.Tokenizer]:
    target = await sampling.resolve_model(rt, tenant_id, model, field="model")
    return target, rt.base_for(target.base), await text.tokenizer_for(rt, target.base)


def _plan(
    rt: Runtime, req: oa.OpenAIRequest, target: sampling.Target, info: BaseModelInfo, tokenizer: text.Tokenizer,
    prompts: list[list[int]], *, max_tokens: int | None, max_field: str, logprobs: bool, top_logprobs: int,
    logprobs_field: str,
) -> Plan:
    if len(prompts) * req.n > MAX_ROWS:
        raise InvalidRequest(f"{len(prompts)} prompt(s) x n={req.n} samples exceed {MAX_ROWS} rows per request",
                             field="n" if req.n > 1 else "prompt")
    stop = _stop(req.stop)
    if req.top_k != -1 and req.top_k < 1:
        raise InvalidRequest("top_k must be -1 (no limit) or at least 1", field="top_k")
    jobs = []
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        check_token_ids(np.asarray(prompt, dtype=np.int64), info, where)
        params = SampleParams(
            max_tokens=_max_tokens(rt, info, len(prompt), max_tokens, max_field, where), temperature=req.temperature,
            top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop_strings=stop, stop_at_eos=True,
        )
        _check_size(info, len(prompt), req.n, params.max_tokens, top_logprobs, logprobs_field)
        jobs.append(SampleJob(prompt=prompt, num_samples=req.n, params=params, topk_sample=top_logprobs))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Plan(req.model, target, tokenizer, jobs, stop, frozenset(info.eos_token_ids), logprobs, top_logprobs,
                include_usage)


def _max_tokens(rt: Runtime, info: BaseModelInfo, prompt_len: int, asked: int | None, field: str, where: str) -> int:
    """As asample's: by default the server's default, within the room the prompt leaves."""
    room = info.max_context_length - prompt_len
    if room < 1:
        raise InvalidRequest(
            f"the prompt ({prompt_len} tokens) leaves no room in the context length {info.max_context_length}",
            field=where,
        )
    max_tokens = asked if asked is not None else min(rt.settings.default_sample_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + {field} ({max_tokens}) exceed the context length "
            f"{info.max_context_length}",
            field=field,
        )
    return max_tokens


def _check_size(info: BaseModelInfo, prompt_len: int, n: int, max_tokens: int, top: int, top_field: str) -> None:
    """asample's bounds on what a sample computes and returns (schemas/tensors.py), in these names."""
    try:
        check_sample_options(prompt_len=prompt_len, vocab_size=info.vocab_size, topk_sample_logprobs=top,
                             num_samples=n, max_tokens=max_tokens)
    except WireError as exc:
        field = {"num_samples": "n", "topk_sample_logprobs": top_field}.get(exc.field, exc.field)
        raise InvalidRequest(exc.message, field=field) from None


def _refuse_unsupported(req: oa.OpenAIRequest) -> None:
    for name, value in (req.model_extra or {}).items():
        if name not in HARMLESS and not _neutral(name, value):
            raise InvalidRequest(f"{name} is not supported by this server", field=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise InvalidRequest(f"{name} is not supported (only 0)", field=name)


def _neutral(name: str, value: object) -> bool:
    return value in (None, False, "", [], {}) or NEUTRAL.get(name, object()) == value


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > oa.MAX_STOP:
        raise InvalidRequest(f"at most {oa.MAX_STOP} stop strings", field="stop")
    if any(not s for s in strings):
        raise InvalidRequest("stop strings cannot be empty", field="stop")
    return tuple(strings)


def _prompts(tokenizer: text.Tokenizer, prompt: str | list) -> list[list[int]]:
    """A string, a list of ids, or a batch of either: one list of ids per prompt."""
    if isinstance(prompt, str):
        return [text.encode(tokenizer, prompt)]
    if not prompt:
        raise InvalidRequest("is empty: send a string, token ids, or a list of either", field="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [text.encode(tokenizer, p) if isinstance(p, str) else list(p) for p in prompt]


def _messages(messages: list[oa.ChatMessage]) -> list[dict[str, str]]:
    """The chat as the template takes it: text content only ("developer" is the template's "system")."""
    out = []
    for i, m in enumerate(messages):
        for name, value in (m.model_extra or {}).items():
            if not _neutral(name, value):
                raise InvalidRequest(f"{name} is not supported in messages", field=f"messages[{i}].{name}")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _content(m, i)})
    return out


def _content(m: oa.ChatMessage, i: int) -> str:
    if m.content is None:
        raise InvalidRequest("content is required (tool calls are not supported)", field=f"messages[{i}].content")
    if isinstance(m.content, str):
        return m.content
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"{part.type} content is not supported: this server's base models are text-only",
                                 field=f"messages[{i}].content[{j}]")
    return "".join(part.text or "" for part in m.content)


# ----- running it --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """One sampled row as returned: its tokens (no stop token), their pieces of text, logprobs."""

    index: int
    tokens: list[int]
    pieces: list[str]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per token, the most likely ids first; [] when not asked
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def submit(rt: Runtime, tenant_id: str, plan: Plan) -> list[asyncio.Future[SampleOutput]]:
    """The plan's jobs, submitted (each waits its turn like an asample); a refusal raises here,
    before any answer (or stream) has started."""
    waiters: list[asyncio.Future[SampleOutput]] = []
    try:
        for job in plan.jobs:
            waiters.append(await sampling.submit_generate(rt, tenant_id, plan.target, job))
    except BaseException:
        for waiter in waiters:
            waiter.cancel()  # nobody will wait for these (their work still runs its course)
        raise
    return waiters


async def sample(rt: Runtime, tenant_id: str, plan: Plan) -> tuple[list[Choice], oa.Usage]:
    return await outcome(plan, await submit(rt, tenant_id, plan))


async def outcome(plan: Plan, waiters: list[asyncio.Future[SampleOutput]]) -> tuple[list[Choice], oa.Usage]:
    """The submitted jobs' choices and usage, once all are sampled."""
    try:
        outputs = await asyncio.gather(*waiters)
    finally:
        for waiter in waiters:
            waiter.cancel()  # a failed sibling's: nobody waits for them any more (finished ones ignore it)
    return await asyncio.to_thread(_render, plan, outputs), _usage(plan, outputs)


def _usage(plan: Plan, outputs: Sequence[SampleOutput]) -> oa.Usage:
    prompt = sum(len(job.prompt) for job in plan.jobs)
    completion = sum(len(seq.tokens) for out in outputs for seq in out.sequences)
    return oa.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _render(plan: Plan, outputs: Sequence[SampleOutput]) -> list[Choice]:
    return [_choice(plan, p * plan.n + j, seq) for p, out in enumerate(outputs) for j, seq in enumerate(out.sequences)]


def _choice(plan: Plan, index: int, seq: SampledSequence) -> Choice:
    tokens = list(seq.tokens)
    if seq.stop_reason == "stop" and tokens and tokens[-1] in plan.eos:
        tokens.pop()  # the end-of-sequence token is no part of the text
    pieces = text.token_texts(plan.tokenizer, tokens)
    end = _first_stop("".join(pieces), plan.stop)
    if end is not None:
        pieces = _cut(pieces, end)
    keep = len(pieces)
    top = []
    if plan.top_logprobs and seq.topk is not None:
        top = [list(zip(ids.tolist(), lps.tolist())) for ids, lps in zip(seq.topk.token_ids[:keep], seq.topk.logprobs)]
    finish = "stop" if seq.stop_reason == "stop" or end is not None else "length"
    return Choice(index, tokens[:keep], pieces, list(seq.logprobs[:keep]), top, finish)


def _first_stop(full: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in the text (None: nowhere)."""
    found = [i for s in stop if (i := full.find(s)) >= 0]
    return min(found) if found else None


def _cut(pieces: list[str], end: int) -> list[str]:
    """The pieces of the tokens that begin before `end`, the last one cut at `end`."""
    kept, offset = [], 0
    for piece in pieces:
        if offset >= end:
            break
        kept.append(piece[: end - offset])
        offset += len(piece)
    return kept


# ----- responses ---------------------------------------------------------------------------------
def completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def completion_response(plan: Plan, choices: list[Choice], usage: oa.Usage) -> oa.Completion:
    return oa.Completion(
        id=completion_id("cmpl"), created=int(time.time()), model=plan.model, usage=usage,
        choices=[oa.CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                     logprobs=_completion_logprobs(plan, c, range(len(c.tokens))))
                 for c in choices],
    )


def chat_response(plan: Plan, choices: list[Choice], usage: oa.Usage) -> oa.ChatCompletion:
    return oa.ChatCompletion(
        id=completion_id("chatcmpl"), created=int(time.time()), model=plan.model, usage=usage,
        choices=[oa.ChatChoice(index=c.index, message=oa.AssistantMessage(content=c.text),
                               finish_reason=c.finish_reason, logprobs=_chat_logprobs(plan, c, range(len(c.tokens))))
                 for c in choices],
    )


def _completion_logprobs(plan: Plan, c: Choice, span: range) -> oa.CompletionLogprobs | None:
    if not plan.logprobs:
        return None
    tok = plan.tokenizer
    offsets = np.cumsum([0, *map(len, c.pieces)]).tolist()
    top = None
    if plan.top_logprobs:
        top = [{text.token_text(tok, t): lp for t, lp in c.top[k]} for k in span]
    return oa.CompletionLogprobs(
        tokens=[text.token_text(tok, c.tokens[k]) for k in span], token_logprobs=[c.logprobs[k] for k in span],
        top_logprobs=top, text_offset=[offsets[k] for k in span],
    )


def _chat_logprobs(plan: Plan, c: Choice, span: range) -> oa.ChoiceLogprobs | None:
    if not plan.logprobs:
        return None
    tok = plan.tokenizer

    def entry(token: int, logprob: float) -> oa.TopLogprob:
        piece = text.token_text(tok, token)
        return oa.TopLogprob(token=piece, logprob=logprob, bytes=list(piece.encode()))

    content = []
    for k in span:
        first = entry(c.tokens[k], c.logprobs[k])
        top = [entry(t, lp) for t, lp in c.top[k]] if plan.top_logprobs else []
        content.append(oa.TokenLogprob(**first.model_dump(), top_logprobs=top))
    return oa.ChoiceLogprobs(content=content)


# ----- streams -----------------------------------------------------------------------------------
async def stream_completion(plan: Plan, waiters: list[asyncio.Future[SampleOutput]]) -> AsyncIterator[oa.Completion]:
    head = _Head(completion_id("cmpl"), int(time.time()), plan.model)

    def piece(c: Choice, span: range, content: str, finish: str | None) -> oa.Completion:
        choice = oa.CompletionChoice(index=c.index, text=content, finish_reason=finish,
                                     logprobs=_completion_logprobs(plan, c, span) if span else None)
        return oa.Completion(id=head.id, created=head.created, model=head.model, choices=[choice])

    def usage(totals: oa.Usage) -> oa.Completion:
        return oa.Completion(id=head.id, created=head.created, model=head.model, choices=[], usage=totals)

    async for chunk in _stream(plan, waiters, piece, usage):
        yield chunk


async def stream_chat(plan: Plan, waiters: list[asyncio.Future[SampleOutput]]) -> AsyncIterator[oa.ChatCompletionChunk]:
    head = _Head(completion_id("chatcmpl"), int(time.time()), plan.model)

    def chunk(choices: list[oa.ChunkChoice], usage: oa.Usage | None = None) -> oa.ChatCompletionChunk:
        return oa.ChatCompletionChunk(id=head.id, created=head.created, model=head.model, choices=choices, usage=usage)

    def piece(c: Choice, span: range, content: str, finish: str | None) -> oa.ChatCompletionChunk:
        delta = oa.Delta(content=content) if finish is None else oa.Delta()
        logprobs = _chat_logprobs(plan, c, span) if span else None
        return chunk([oa.ChunkChoice(index=c.index, delta=delta, logprobs=logprobs, finish_reason=finish)])

    rows = len(plan.jobs) * plan.n
    for index in range(rows):  # at once: the client sees the answer begin while it is sampled
        yield chunk([oa.ChunkChoice(index=index, delta=oa.Delta(role="assistant", content=""))])
    async for item in _stream(plan, waiters, piece, lambda totals: chunk([], usage=totals)):
        yield item


@dataclass(frozen=True)
class _Head:
    id: str
    created: int
    model: str


async def _stream(
    plan: Plan, waiters: list[asyncio.Future[SampleOutput]], piece: Callable, usage_chunk: Callable
) -> AsyncIterator:
    """Each choice's pieces (several tokens in one chunk where a character spans them), its last
    chunk with the finish_reason, then the usage if asked. `piece(choice, token span, text, finish)`."""
    choices, usage = await outcome(plan, waiters)
    for c in choices:
        first = 0
        for k, content in enumerate(c.pieces):
            if content:
                yield piece(c, range(first, k + 1), content, None)
                first = k + 1
        yield piece(c, range(first, len(c.pieces)), "", c.finish_reason)
    if plan.include_usage:
        yield usage_chunk(usage)
