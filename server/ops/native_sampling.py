"""The native Twinkle API's sampler app: `POST /api/v1/sampler/{base}/twinkle/{op}`, as
twinkle_client's `vLLMSampler` (an HTTP wrapper) calls it; the contract is docs/twinkle-native.md.

A request becomes one sample job per input, run by `sampling.submit_generate`: the same admission,
quotas, queue and batching as the Tinker API's asample. Inputs are token ids (an InputFeature,
labels next-token aligned) or a chat (a Trajectory, rendered by the base model's own chat
template). Weights are chosen by `adapter_uri`, a twinkle:// (or tinker://) checkpoint the caller
may read; without it the bare base model samples, as on Twinkle (`adapter_name` selects nothing).

Logprobs are the model's own (temperature 1), as every sampler of this server returns them; pairs
are `[token_id, logprob]`: with `logprobs=1` the sampled token's own, with k > 1 the k most likely,
most likely first (which may leave out the sampled token, as Twinkle's do). Twinkle's vLLM reports
logprobs after temperature/top-p processing instead: they agree at temperature 1 without top-p/top-k.

Answers are strict JSON: the client's simplejson refuses NaN, so the unscored first prompt
position is null and any other non-finite value is an error, never a number."""

from __future__ import annotations

import asyncio
import json
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from schemas import native as nt
from schemas.openai import MAX_STOP
from schemas.tensors import check_sample_options
from schemas.wire import WireError
from server import ids
from server.errors import InvalidRequest, NotFound, OperationFailed
from server.kinds import ErrorCategory
from server.ops import sampling, text
from server.ops.native_service import SESSION_FIELD
from server.ops.sessions import live_session
from server.ops.validation import check_token_ids
from server.runtime import Runtime
from workers.types import (
    TOPK_EMPTY_ID,
    TOPK_EMPTY_LOGPROB,
    BaseModelInfo,
    PromptScoring,
    SampledSequence,
    SampleJob,
    SampleOutput,
    SampleParams,
    TopK,
)

SUPPORTED_OPS = ("create", "sample", "sample_stream", "set_template")
REFUSED_OPS = {
    "apply_patch": "never: it would patch the shared base model, which every tenant's samples use",
    "add_adapter_to_sampler": "not needed here (Twinkle's vLLM sampler does not implement it either): save the "
                              "model with is_sampler=True and pass its twinkle_path as sample's adapter_uri",
}
# Twinkle's template classes; each renders a chat with the served base model's own chat template.
TEMPLATE_NAMES = ("Template", "Qwen3_5Template", "DeepseekV4Template")
DEFAULT_MAX_TOKENS = 16  # vLLM's, which Twinkle's sampler inherits
IGNORE = -100  # a label that trains nothing
MULTIMODAL_KEYS = ("images", "videos", "audios", "pixel_values", "image_grid_thw", "mm_token_type_ids")


# ----- the route's checks ------------------------------------------------------------------------
def check_op(op: str) -> None:
    if op in REFUSED_OPS:
        raise InvalidRequest(f"{op} is refused: {REFUSED_OPS[op]}", field="op")
    if op not in SUPPORTED_OPS:
        raise NotFound(f"the sampler has no op {op!r}; supported: {', '.join(SUPPORTED_OPS)}", field="op")


# ----- set_template ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateChoice:
    """How chats are rendered for one (tenant, session): always by the base model's chat template,
    with Twinkle's Template options that change the ids it makes."""

    name: str = "Template"
    enable_thinking: bool | None = None  # None: the template's own default
    max_length: int | None = None  # a longer rendered prompt is refused (Twinkle's truncation_strategy 'raise')
    default_system: str | None = None  # a system turn for chats that have none


class _Templates:
    """Choices by (tenant, session), the least recently set dropped past `capacity` (one process's
    memory: a session's choice lives in the server process that received its set_template)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity, self.items = capacity, OrderedDict[tuple[str, str | None], TemplateChoice]()

    def get(self, tenant_id: str, session_id: str | None) -> TemplateChoice:
        return self.items.get((tenant_id, session_id), TemplateChoice())

    def put(self, tenant_id: str, session_id: str | None, choice: TemplateChoice) -> None:
        self.items[(tenant_id, session_id)] = choice
        self.items.move_to_end((tenant_id, session_id))
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


TEMPLATES = _Templates()


def template_choice(req: nt.SetTemplateRequest) -> TemplateChoice:
    """The request's choice, every option checked; an option that would change the ids and is not
    implemented is refused by name, never ignored."""
    if req.template_cls not in TEMPLATE_NAMES:
        raise InvalidRequest(f"unknown template {req.template_cls!r}; allowed: {', '.join(TEMPLATE_NAMES)} "
                             "(each renders with the base model's own chat template)", field="template_cls")
    choice = TemplateChoice(name=req.template_cls)
    for key, value in (req.model_extra or {}).items():
        choice = _template_option(choice, key, value)
    return choice


def _template_option(choice: TemplateChoice, key: str, value: Any) -> TemplateChoice:
    if key == "enable_thinking" and isinstance(value, bool):
        return replace(choice, enable_thinking=value)
    if key == "max_length" and (value is None or (type(value) is int and value > 0)):
        return replace(choice, max_length=value)
    if key == "default_system" and (value is None or isinstance(value, str)):
        return replace(choice, default_system=value)
    if (key, value) in (("truncation_strategy", "raise"), ("use_chat_template", True)):
        return choice  # Twinkle's defaults
    known = key in ("enable_thinking", "max_length", "default_system", "truncation_strategy", "use_chat_template")
    reason = f"unsupported value {value!r}" if known else "not a supported option"
    raise InvalidRequest(f"{reason} (supported: enable_thinking, max_length, default_system, "
                         "truncation_strategy='raise', use_chat_template=true)", field=key)


async def set_template(rt: Runtime, tenant_id: str, session_id: str | None, req: nt.SetTemplateRequest) -> None:
    """Scoped to the caller's session (Twinkle's is global to the sampler, i.e. to every tenant)."""
    choice = template_choice(req)
    if session_id is not None:
        await rt.db.run(lambda s: live_session(s, tenant_id, session_id, field=SESSION_FIELD))
    TEMPLATES.put(tenant_id, session_id, choice)


# ----- sample: options ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """A request's sampling_params, checked and resolved."""

    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS within the room the prompt leaves
    num_samples: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_tokens: tuple[int, ...]
    stop_strings: tuple[str, ...]
    logprobs: int | None  # k
    prompt_logprobs: int | None  # k

    @property
    def score_only(self) -> bool:
        return self.max_tokens == 0


def options(req: nt.SampleRequest) -> Options:
    p = req.sampling_params or nt.SamplingParams()
    if p.repetition_penalty != 1:
        raise InvalidRequest("repetition_penalty is not supported (only 1.0): the samplers here apply no penalty",
                             field="sampling_params.repetition_penalty")
    if p.top_k != -1 and p.top_k < 1:
        raise InvalidRequest("top_k must be -1 (off) or at least 1", field="sampling_params.top_k")
    stop_tokens, stop_strings = _stop(p.stop)
    return Options(
        max_tokens=p.max_tokens if p.max_tokens is not None else p.max_new_tokens,
        num_samples=num_samples(req), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
        stop_tokens=stop_tokens, stop_strings=stop_strings, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
    )


def num_samples(req: nt.SampleRequest) -> int:
    """sampling_params.num_samples (what Twinkle honours), else the top-level one. The client sends
    the top-level one always, 1 by default, so only another value can conflict."""
    inner = req.sampling_params.num_samples if req.sampling_params else None
    outer = req.num_samples
    if inner is not None and outer not in (None, 1, inner):
        raise InvalidRequest(f"sampling_params.num_samples ({inner}) and num_samples ({outer}) disagree: "
                             "send one of them, or the same value", field="num_samples")
    n = inner or outer or 1
    if n > sampling.MAX_NUM_SAMPLES:
        raise InvalidRequest(f"num_samples is limited to {sampling.MAX_NUM_SAMPLES}", field="num_samples")
    return n


def _stop(stop: str | list[int | str] | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop token ids, stop strings): a string, a list of strings, or a list of token ids."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len({type(s) for s in items}) > 1:
        raise InvalidRequest("mixes strings and token ids: send a list of either", field="sampling_params.stop")
    if len(items) > MAX_STOP:
        raise InvalidRequest(f"at most {MAX_STOP} stops", field="sampling_params.stop")
    if any(s == "" for s in items):
        raise InvalidRequest("stop strings cannot be empty", field="sampling_params.stop")
    if any(isinstance(s, int) and s < 0 for s in items):
        raise InvalidRequest("stop token ids cannot be negative", field="sampling_params.stop")
    return tuple(s for s in items if isinstance(s, int)), tuple(s for s in items if isinstance(s, str))


# ----- sample: prompts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One input as sampled: its ids and its next-token-aligned labels (new_input_feature's start)."""

    ids: list[int]
    labels: list[int]


def feature_prompt(feature: nt.InputFeature, info: BaseModelInfo, where: str) -> Prompt:
    _refuse_multimodal(feature, where)
    ids = list(feature.input_ids)
    check_token_ids(np.asarray(ids, dtype=np.int64), info, f"{where}.input_ids")
    labels = list(feature.labels) if feature.labels is not None else [IGNORE] * len(ids)
    check_labels(ids, labels, f"{where}.labels")
    return Prompt(ids, labels)


def check_labels(ids: Sequence[int], labels: Sequence[int], field: str) -> None:
    """One label per token, each -100 or the next token (Twinkle's template rolls labels by one:
    the model scores labels[i] at position i), the last one -100."""
    if len(labels) != len(ids):
        raise InvalidRequest(f"{len(labels)} labels for {len(ids)} input_ids: send one label per token", field=field)
    for i, label in enumerate(labels):
        nxt = ids[i + 1] if i + 1 < len(ids) else None
        if label != IGNORE and label != nxt:
            want = f"-100 or input_ids[{i + 1}] = {nxt}" if nxt is not None else "-100 (nothing follows the last token)"
            raise InvalidRequest(f"labels[{i}] is {label}; labels are next-token aligned, so it must be {want}",
                                 field=field)


def _refuse_multimodal(item: nt.NativeRequest, where: str) -> None:
    for key in MULTIMODAL_KEYS:
        if (item.model_extra or {}).get(key):
            raise InvalidRequest("is not supported: this server's base models are text-only", field=f"{where}.{key}")


def trajectory_prompt(
    tokenizer: text.Tokenizer, info: BaseModelInfo, traj: nt.Trajectory, choice: TemplateChoice, where: str, *,
    add_generation_prompt: bool,
) -> Prompt:
    """A chat rendered by the base model's template; no prompt token is labelled (the sampled
    completion is what new_input_feature trains)."""
    _refuse_multimodal(traj, where)
    messages = [_message(m, f"{where}.messages[{j}]") for j, m in enumerate(traj.messages)]
    if choice.default_system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": choice.default_system})
    kwargs: dict[str, Any] = {"tools": traj.tools} if traj.tools else {}
    if choice.enable_thinking is not None:
        kwargs["enable_thinking"] = choice.enable_thinking
    try:
        ids = text.apply_chat_template(tokenizer, info.name, messages, add_generation_prompt=add_generation_prompt,
                                       **kwargs)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=f"{where}.messages") from None
    if choice.max_length is not None and len(ids) > choice.max_length:
        raise InvalidRequest(f"renders to {len(ids)} tokens, over the template's max_length {choice.max_length}",
                             field=f"{where}.messages")
    check_token_ids(np.asarray(ids, dtype=np.int64), info, f"{where}.messages")
    return Prompt(ids, [IGNORE] * len(ids))


def _message(m: nt.ChatMessage, where: str) -> dict[str, Any]:
    """The turn as chat templates take it: text content as one string."""
    content = m.content
    if isinstance(content, list):
        for k, block in enumerate(content):
            if block.get("type", "text") != "text" or not isinstance(block.get("text"), str):
                raise InvalidRequest(f"{block.get('type')!r} content is not supported: this server's base models "
                                     "are text-only", field=f"{where}.content[{k}]")
        content = "".join(block["text"] for block in content)
    return {**(m.model_extra or {}), "role": m.role, "content": content if content is not None else ""}


# ----- sample: jobs ------------------------------------------------------------------------------
def job(info: BaseModelInfo, prompt: Prompt, opts: Options, where: str) -> SampleJob:
    room = info.max_context_length - len(prompt.ids)
    max_tokens = opts.max_tokens
    if max_tokens is None:
        if room < 1:
            raise InvalidRequest(f"the prompt ({len(prompt.ids)} tokens) leaves no room in the context length "
                                 f"{info.max_context_length}", field=where)
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise InvalidRequest(f"prompt ({len(prompt.ids)} tokens) + max_tokens ({max_tokens}) exceed the context "
                             f"length {info.max_context_length}", field="sampling_params.max_tokens")
    k, pk = opts.logprobs or 0, opts.prompt_logprobs or 0
    _check_size(info, len(prompt.ids), opts.num_samples, max_tokens, k if k > 1 else 0, pk)
    params = SampleParams(max_tokens=max_tokens, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                          seed=opts.seed, stop_tokens=opts.stop_tokens, stop_strings=opts.stop_strings)
    return SampleJob(prompt=prompt.ids, num_samples=opts.num_samples, params=params,
                     scoring=PromptScoring(logprobs=pk > 0, topk=pk), topk_sample=k if k > 1 else 0)


_SIZE_FIELDS = {"num_samples": "num_samples", "topk_sample_logprobs": "sampling_params.logprobs",
                "topk_prompt_logprobs": "sampling_params.prompt_logprobs"}


def _check_size(info: BaseModelInfo, prompt_len: int, n: int, max_tokens: int, top: int, prompt_top: int) -> None:
    """asample's bounds on what a sample computes and returns (schemas/tensors.py), in these names."""
    try:
        check_sample_options(prompt_len=prompt_len, vocab_size=info.vocab_size, prompt_logprobs=prompt_top > 0,
                             topk_prompt_logprobs=prompt_top, topk_sample_logprobs=top, num_samples=n,
                             max_tokens=max_tokens)
    except WireError as exc:
        raise InvalidRequest(exc.message, field=_SIZE_FIELDS.get(exc.field, exc.field)) from None


async def target(rt: Runtime, tenant_id: str, base: str, adapter_uri: str | None) -> sampling.Target:
    """The weights: the checkpoint adapter_uri names (the caller's own, or a published one), else
    the bare base model. A checkpoint of another base model is refused rather than sampled there."""
    if adapter_uri is None or adapter_uri == "":
        return sampling.Target(None, base)
    if not adapter_uri.startswith(ids.PATH_SCHEMES):
        raise InvalidRequest("expected the twinkle:// path of a checkpoint (a save's twinkle_path); local paths and "
                             "hub ids are not loaded by this server", field="adapter_uri")
    found = await sampling.resolve_model(rt, tenant_id, adapter_uri, field="adapter_uri")
    if found.base != base:
        raise InvalidRequest(f"this checkpoint was trained on {found.base!r}: sample it at "
                             f"/sampler/{found.base}/twinkle/sample", field="adapter_uri")
    return found


async def run_jobs(rt: Runtime, tenant_id: str, where: sampling.Target, jobs: list[SampleJob]) -> list[SampleOutput]:
    """Every job submitted before any is awaited (a refusal raises before anything runs)."""
    waiters: list[asyncio.Future[SampleOutput]] = []
    try:
        for j in jobs:
            waiters.append(await sampling.submit_generate(rt, tenant_id, where, j))
        return list(await asyncio.gather(*waiters))
    finally:
        for waiter in waiters:
            waiter.cancel()  # a failed sibling's: nobody waits for them any more (finished ones ignore it)


# ----- sample: the answer ------------------------------------------------------------------------
def new_input_feature(prompt: Prompt, tokens: Sequence[int]) -> nt.NewInputFeature:
    """The prompt and the sampled tokens as one InputFeature: the completion trained, labels next-
    token aligned (Twinkle's concat_input_feature: the prompt's labels but its last, the tokens,
    then the prompt's last label, i.e. -100)."""
    input_ids = [*prompt.ids, *tokens]
    labels = [*prompt.labels[:-1], *tokens, *prompt.labels[-1:]] if tokens else list(prompt.labels)
    n = len(input_ids)
    return nt.NewInputFeature(input_ids=input_ids, labels=labels, attention_mask=[1] * n,
                              position_ids=list(range(n)), length=n)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise OperationFailed("the sampler returned a non-finite logprob; the server log has details",
                              ErrorCategory.SERVER)
    return float(value)


def _pairs(topk: TopK, row: int) -> list[tuple[int, float]]:
    cells = zip(topk.token_ids[row].tolist(), topk.logprobs[row].tolist())
    return [(t, _finite(lp)) for t, lp in cells if not (t == TOPK_EMPTY_ID and lp == TOPK_EMPTY_LOGPROB)]


def sampled_logprobs(seq: SampledSequence, k: int | None) -> list[list[tuple[int, float]]] | None:
    """Per sampled token: k <= 1, [(that token, its logprob)]; k > 1, the k most likely."""
    if k is None:
        return None
    if k > 1 and seq.topk is not None:
        return [_pairs(seq.topk, i) for i in range(len(seq.tokens))]
    return [[(t, _finite(lp))] for t, lp in zip(seq.tokens, seq.logprobs)]


def prompt_logprobs(out: SampleOutput, k: int | None) -> tuple[list[float | None] | None, list | None]:
    """(each prompt token's logprob, the k most likely at each position); null at position 0,
    which nothing precedes; both null unless k >= 1 (vLLM's prompt_logprobs=0 gives nothing)."""
    if not k or out.prompt_logprobs is None:
        return None, None
    values: list[float | None] = [None] + [_finite(lp) for lp in out.prompt_logprobs[1:]]
    top = None
    if out.topk_prompt is not None:
        top = [None] + [_pairs(out.topk_prompt, i) for i in range(1, len(out.prompt_logprobs))]
    return values, top


def sequence_view(prompt: Prompt, seq: SampledSequence, opts: Options, decode: Callable) -> nt.SampledSequence:
    if opts.score_only:  # Twinkle's logprobs_only: no tokens, the prompt as it came
        return nt.SampledSequence(stop_reason=seq.stop_reason, tokens=[],
                                  new_input_feature=new_input_feature(prompt, []))
    return nt.SampledSequence(
        stop_reason=seq.stop_reason, tokens=list(seq.tokens), logprobs=sampled_logprobs(seq, opts.logprobs),
        decoded=decode(list(seq.tokens)), new_input_feature=new_input_feature(prompt, seq.tokens),
    )


def render(prompts: list[Prompt], outputs: list[SampleOutput], opts: Options, decode: Callable
           ) -> nt.SampleResponseList:
    samples = []
    for prompt, out in zip(prompts, outputs):
        values, top = prompt_logprobs(out, opts.prompt_logprobs)
        sequences = [sequence_view(prompt, seq, opts, decode) for seq in out.sequences]
        samples.append(nt.SampleResponse(sequences=sequences, prompt_logprobs=values, topk_prompt_logprobs=top))
    return nt.SampleResponseList(samples=samples)


# ----- sample ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    opts: Options
    weights: sampling.Target
    tokenizer: text.Tokenizer
    prompts: list[Prompt]
    jobs: list[SampleJob]


async def _plan(
    rt: Runtime, tenant_id: str, session_id: str | None, base: str, req: nt.SampleRequest,
    inputs: list[nt.InputFeature | nt.Trajectory],
) -> _Plan:
    """Everything a sample request needs, checked before anything runs."""
    opts = options(req)
    if len(inputs) * opts.num_samples > sampling.MAX_NUM_SAMPLES:
        raise InvalidRequest(f"{len(inputs)} input(s) x num_samples={opts.num_samples} exceed "
                             f"{sampling.MAX_NUM_SAMPLES} sequences per request", field="inputs")
    weights = await target(rt, tenant_id, base, req.adapter_uri)
    info = rt.base_for(base)
    tokenizer = await text.tokenizer_for(rt, base)
    choice = TEMPLATES.get(tenant_id, session_id)
    prompts = await asyncio.to_thread(_prompts, tokenizer, info, inputs, choice, not opts.score_only)
    jobs = [job(info, p, opts, f"inputs[{i}]") for i, p in enumerate(prompts)]
    return _Plan(opts, weights, tokenizer, prompts, jobs)


async def sample(
    rt: Runtime, tenant_id: str, session_id: str | None, base: str, req: nt.SampleRequest,
    inputs: list[nt.InputFeature | nt.Trajectory],
) -> nt.SampleResponseList:
    """One sample job per input, num_samples sequences each; everything is checked before anything runs."""
    plan = await _plan(rt, tenant_id, session_id, base, req, inputs)
    outputs = await run_jobs(rt, tenant_id, plan.weights, plan.jobs)
    # As Twinkle's template.decode: every token's text, special tokens included.
    return await asyncio.to_thread(render, plan.prompts, outputs, plan.opts, plan.tokenizer.decode)


async def sample_stream(
    rt: Runtime, tenant_id: str, session_id: str | None, base: str, req: nt.SampleRequest,
    inputs: list[nt.InputFeature | nt.Trajectory],
) -> AsyncIterator[str]:
    """Twinkle's `sample_stream`: one input, one sequence, as newline-delimited JSON
    `{"delta": text, "finish_reason": null|"stop"|"length"}`. Checked and submitted before the stream
    starts (so refusals are plain 4xx); the deltas go out once the sample is done, as the /v1
    streams' do (one batched decode: no per-token callback crosses the engine boundary)."""
    if len(inputs) != 1:
        raise InvalidRequest("streaming takes a single input", field="inputs")
    plan = await _plan(rt, tenant_id, session_id, base, req, inputs)
    if plan.opts.num_samples != 1:
        raise InvalidRequest("streaming samples one sequence", field="num_samples")
    waiter = await sampling.submit_generate(rt, tenant_id, plan.weights, plan.jobs[0])

    async def lines() -> AsyncIterator[str]:
        try:
            seq = (await waiter).sequences[0]
        except Exception as exc:  # a failure while sampling: the stream's last line says so
            message = exc.message if isinstance(exc, OperationFailed) else "the sample failed; the server log has details"
            yield json.dumps({"error": message}) + "\n"
            return
        pieces = await asyncio.to_thread(text.token_texts, plan.tokenizer, seq.tokens)
        for piece in pieces:
            if piece:
                yield json.dumps({"delta": piece, "finish_reason": None}) + "\n"
        yield json.dumps({"delta": "", "finish_reason": seq.stop_reason}) + "\n"

    return lines()


def _prompts(
    tokenizer: text.Tokenizer, info: BaseModelInfo, inputs: list[nt.InputFeature | nt.Trajectory],
    choice: TemplateChoice, add_generation_prompt: bool,
) -> list[Prompt]:
    """Score-only requests render a chat without the assistant's turn begun (Twinkle's logprobs_only)."""
    def one(i: int, item: nt.InputFeature | nt.Trajectory) -> Prompt:
        if isinstance(item, nt.InputFeature):
            return feature_prompt(item, info, f"inputs[{i}]")
        return trajectory_prompt(tokenizer, info, item, choice, f"inputs[{i}]",
                                 add_generation_prompt=add_generation_prompt)

    return [one(i, item) for i, item in enumerate(inputs)]
