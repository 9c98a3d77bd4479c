"""Token sampling on a transformers causal LM, with a KV cache, several requests at a time.

The returned logprobs (sampled tokens, prompt tokens, top-k, target ids, alt tokens) are the
model's own (temperature 1, no top-k/top-p), i.e. exactly what the trainer computes for the same
tokens: that is what importance-sampling losses compare against. Temperature, top-k and top-p
shape only the choice of the next token.

``sample_batch`` runs several requests (``SampleJob``s) as one left-padded prefill and one decode
batch. Randomness never crosses requests, nor rows: a request's generator is seeded by its
``seed``, and at every step in which any of its rows is still running it draws one uniform
number per row (``num_samples`` of them, whichever rows still run), from which each row picks
its token by inverse-CDF sampling. So a row's tokens depend only on
the seed, its row number and the model's logits: not on the other requests in the batch, nor on
which of its sibling rows have stopped. Batched logits differ from unbatched ones only by float
rounding (padded attention, other matmul shapes), which can flip a token only at a near tie.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from schemas.tensors import NO_TARGET, check_sample_options
from workers.types import (
    TOPK_EMPTY_ID,
    TOPK_EMPTY_LOGPROB,
    PromptScoring,
    SampledSequence,
    SampleJob,
    SampleOutput,
    SampleParams,
    TopK,
)

Decode = Callable[[list[int]], str]
# Prompt logits a batched prefill may keep for all its jobs together (float elements).
SHARED_PROMPT_LOGITS = 1 << 25


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: Sequence[int],
    num_samples: int,
    params: SampleParams,
    *,
    eos_token_ids: Sequence[int],
    decode: Decode,
    want_prompt_logprobs: bool = False,
    scoring: PromptScoring | None = None,
    topk_sample: int = 0,
) -> SampleOutput:
    """One request alone: ``sample_batch`` with a single job."""
    if scoring is None:
        scoring = PromptScoring(logprobs=want_prompt_logprobs)
    job = SampleJob(prompt=prompt, num_samples=num_samples, params=params, scoring=scoring, topk_sample=topk_sample)
    return sample_batch(model, [job], eos_token_ids=eos_token_ids, decode=decode)[0]


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    jobs: Sequence[SampleJob],
    *,
    eos_token_ids: Sequence[int],
    decode: Decode,
    pad_token_id: int = 0,
) -> list[SampleOutput]:
    """Run every job in one batched prefill + decode; one ``SampleOutput`` per job, in order.

    All jobs are checked before any compute (``ValueError`` naming ``jobs[i].<field>``), so one
    bad job fails the call up front rather than half-way. Callers should validate at submission
    (``schemas.tensors``) so that this never happens.
    """
    if not jobs:
        return []
    device = next(model.parameters()).device
    vocab = _vocab_size(model)
    for i, job in enumerate(jobs):
        check_job(job, vocab, f"jobs[{i}]")

    states = [_JobState.start(job, eos_token_ids, device) for job in jobs]
    logits_last, cache, attn, scoring_logits = _prefill(model, states, device, pad_token_id)
    outputs_prompt = []
    for j, st in enumerate(states):  # one job's prompt logits at a time
        logits = scoring_logits[j] if scoring_logits[j] is not None else _own_prompt_logits(model, st, device)
        if logits is not None:
            _finite(logits)
        outputs_prompt.append(_score_prompt(st, logits))
        scoring_logits[j] = logits = None  # freed before the next job's
    del scoring_logits  # the prompt logits are freed before decoding
    _decode_loop(model, states, logits_last, cache, attn, decode)
    return [st.output(*prompt_out) for st, prompt_out in zip(states, outputs_prompt)]


# --------------------------------------------------------------------------------------------
# per-request state
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_lps: list[np.ndarray] = field(default_factory=list)
    done: bool = False
    stopped: bool = False


@dataclass
class _JobState:
    job: SampleJob
    prompt: list[int]
    stop_tokens: set[int]
    generator: torch.Generator | None  # None for greedy decoding
    seed: int
    rows: list[_Row]
    need: int  # how many final prompt positions need logits (>= 1: the last one samples)

    @staticmethod
    def start(job: SampleJob, eos_token_ids: Sequence[int], device: torch.device) -> _JobState:
        params = job.params
        seed = _seed(params.seed)
        generator = None
        if params.temperature != 0:
            generator = torch.Generator(device=device).manual_seed(seed)
        stop_tokens = set(params.stop_tokens) | (set(eos_token_ids) if params.stop_at_eos else set())
        rows = [_Row(done=params.max_tokens == 0) for _ in range(job.num_samples)]
        prompt = [int(t) for t in job.prompt]
        return _JobState(job, prompt, stop_tokens, generator, seed, rows, _positions_needed(job.scoring, len(prompt)))

    def output(
        self, prompt_lp: list[float] | None, topk: TopK | None, target: np.ndarray | None,
        alt: tuple[np.ndarray, np.ndarray] | None,
    ) -> SampleOutput:
        k = self.job.topk_sample
        sequences = []
        for row in self.rows:
            seq_topk = None
            if k > 0:
                ids = np.stack(row.topk_ids) if row.topk_ids else np.empty((0, k), np.int64)
                lps = np.stack(row.topk_lps) if row.topk_lps else np.empty((0, k), np.float32)
                seq_topk = TopK(token_ids=ids.astype(np.int64), logprobs=lps.astype(np.float32))
            sequences.append(
                SampledSequence(
                    tokens=row.tokens, logprobs=row.logprobs, stop_reason="stop" if row.stopped else "length",
                    topk=seq_topk,
                )
            )
        return SampleOutput(
            sequences=sequences, prompt_logprobs=prompt_lp, topk_prompt=topk, target_prompt_logprobs=target,
            alt_tokens=None if alt is None else alt[0], alt_logprobs=None if alt is None else alt[1],
        )


def _positions_needed(scoring: PromptScoring, n: int) -> int:
    """Logits at position p score prompt position p + 1; the last position samples."""
    need = 1
    if scoring.logprobs or scoring.topk > 0:
        first_scored = 1 if scoring.last_n is None else n - scoring.last_n
        need = max(need, n - first_scored + 1)
    if scoring.target_ids is not None:
        requested = np.flatnonzero((scoring.target_ids != NO_TARGET).any(axis=1))
        if requested.size:
            need = max(need, n - int(requested[0]))
    if scoring.alt_tokens_k > 0:
        need = max(need, n)
    return min(need, n)


def check_job(job: SampleJob, vocab: int, where: str) -> None:
    if job.num_samples < 1:
        raise ValueError(f"{where}.num_samples: must be at least 1, got {job.num_samples}")
    if job.params.max_tokens < 0:
        raise ValueError(f"{where}.params.max_tokens: must be 0 or greater")
    s = job.scoring
    n = len(job.prompt)
    try:
        check_sample_options(
            prompt_len=n, vocab_size=vocab, prompt_logprobs=s.logprobs, prompt_logprobs_last_n=s.last_n,
            topk_prompt_logprobs=s.topk, topk_sample_logprobs=job.topk_sample, prompt_alt_tokens_k=s.alt_tokens_k,
            max_cells=1 << 62,
        )
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    prompt = np.asarray(job.prompt, dtype=np.int64)
    if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
        raise ValueError(f"{where}.prompt: token ids must be in [0, {vocab})")
    if s.target_ids is not None:
        ids = np.asarray(s.target_ids)
        if ids.ndim != 2 or ids.shape[0] != n - 1:
            raise ValueError(f"{where}.target_prompt_logprobs: must be [len(prompt) - 1, K] = [{n - 1}, K]")
        if np.any((ids != NO_TARGET) & ((ids < 0) | (ids >= vocab))):
            raise ValueError(f"{where}.target_prompt_logprobs: ids must be -1 or in [0, {vocab})")


# --------------------------------------------------------------------------------------------
# prefill and prompt scoring
# --------------------------------------------------------------------------------------------


def _prefill(
    model: torch.nn.Module, states: list[_JobState], device: torch.device, pad_token_id: int
) -> tuple[torch.Tensor, object, torch.Tensor, list[torch.Tensor | None]]:
    """One left-padded forward over every prompt. Returns the last position's logits [J, V], the
    cache, the attention mask [J, Lmax], and per job the logits of the positions it scores."""
    lengths = [len(st.prompt) for st in states]
    width = max(lengths)
    ids = torch.full((len(states), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(states), width), dtype=torch.long)
    for j, st in enumerate(states):
        ids[j, width - lengths[j] :] = torch.tensor(st.prompt, dtype=torch.long)
        attn[j, width - lengths[j] :] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    keep = max(st.need for st in states)
    # Every job gets the logits of the most positions any job scores: fine while that is small,
    # otherwise the jobs that score their prompt get their logits from a forward of their own.
    shared = len(states) == 1 or len(states) * keep * _vocab_size(model) <= SHARED_PROMPT_LOGITS
    if not shared:
        keep = 1
    ids, attn, position_ids = ids.to(device), attn.to(device), position_ids.to(device)
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=True, logits_to_keep=keep
    )
    logits = out.logits  # [J, keep, V]
    scoring: list[torch.Tensor | None] = [
        logits[j, keep - st.need :] if shared or st.need == 1 else None for j, st in enumerate(states)
    ]
    # clone: a float32 slice would otherwise keep every prompt position's logits alive.
    return logits[:, -1, :].float().clone(), out.past_key_values, attn, scoring


def _own_prompt_logits(model: torch.nn.Module, st: _JobState, device: torch.device) -> torch.Tensor:
    """The logits of the last `st.need` prompt positions of one job, from a forward of its own."""
    ids = torch.tensor([st.prompt], dtype=torch.long, device=device)
    return model(input_ids=ids, use_cache=False, logits_to_keep=st.need).logits[0]


def _score_prompt(
    st: _JobState, logits: torch.Tensor
) -> tuple[list[float] | None, TopK | None, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """``logits`` hold the last ``st.need`` prompt positions; row r is position n - need + r."""
    s, n, prompt = st.job.scoring, len(st.prompt), st.prompt
    if not s.any:
        return None, None, None, None
    offset = n - st.need  # prompt position of logits row 0
    logprobs = torch.log_softmax(logits[: max(st.need - 1, 0)].float(), dim=-1)  # positions offset..n-2

    prompt_lp = topk = None
    first_scored = 1 if s.last_n is None else n - s.last_n  # first prompt position scored
    span = slice(first_scored - 1 - offset, n - 1 - offset)  # logprob rows predicting them
    if s.logprobs:
        targets = torch.tensor(prompt[first_scored:], dtype=torch.long, device=logprobs.device)
        scored = logprobs[span].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().numpy()
        prompt_lp = [math.nan] * first_scored + scored.astype(np.float64).tolist()
    if s.topk > 0:
        ids = np.full((n, s.topk), TOPK_EMPTY_ID, dtype=np.int64)
        lps = np.full((n, s.topk), TOPK_EMPTY_LOGPROB, dtype=np.float32)
        if first_scored < n:
            top = torch.topk(logprobs[span], s.topk, dim=-1)
            ids[first_scored:] = top.indices.cpu().numpy()
            lps[first_scored:] = top.values.cpu().numpy()
        topk = TopK(token_ids=ids, logprobs=lps)

    target = None
    if s.target_ids is not None:
        wanted = np.asarray(s.target_ids, dtype=np.int64)
        target = np.zeros(wanted.shape, dtype=np.float32)
        rows, cols = np.nonzero(wanted != NO_TARGET)
        if rows.size:
            # Row r of the request scores prompt position r + 1 from logits at position r.
            r = torch.as_tensor(rows - offset, device=logprobs.device)
            t = torch.as_tensor(wanted[rows, cols], device=logprobs.device)
            target[rows, cols] = logprobs[r, t].cpu().numpy()

    alt = None
    if s.alt_tokens_k > 0:
        alt = _alt_tokens(st, logits[: n - 1].float(), logprobs)
    return prompt_lp, topk, target, alt


def _alt_tokens(
    st: _JobState, logits: torch.Tensor, logprobs: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """k draws with replacement at the request's temperature (top-k/top-p not applied) at
    prompt positions 1..n-1; their own generator, so alt draws never shift the sampled tokens."""
    k, rows = st.job.scoring.alt_tokens_k, logits.shape[0]
    if rows == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    temperature = st.job.params.temperature
    if temperature == 0:
        tokens = logits.argmax(dim=-1, keepdim=True).expand(rows, k)
    else:
        gen = torch.Generator(device=logits.device).manual_seed(derived_seed(st.seed, "prompt_alt_tokens"))
        probs = torch.softmax(logits / temperature, dim=-1)
        tokens = torch.multinomial(probs, k, replacement=True, generator=gen)
    lps = logprobs.gather(-1, tokens)
    return tokens.cpu().numpy().astype(np.int64), lps.cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _decode_loop(
    model: torch.nn.Module,
    states: list[_JobState],
    logits_last: torch.Tensor,
    cache: object,
    attn: torch.Tensor,
    decode: Decode,
) -> None:
    device = logits_last.device
    # The batch: one entry per running row, as (job index, row index within the job).
    active = [(j, r) for j, st in enumerate(states) for r, row in enumerate(st.rows) if not row.done]
    if not active:
        return
    select = torch.tensor([j for j, _ in active], device=device)
    cache.batch_select_indices(select)
    attn = attn[select]
    logits = logits_last[select]
    positions = torch.tensor([len(states[j].prompt) for j, _ in active], device=device)
    while True:
        tokens, token_lp, logprobs = _choose_all(states, active, logits)
        tok_list, lp_list = tokens.tolist(), token_lp.tolist()
        topk_ids, topk_lps = _topk_rows(states, active, logprobs)
        still = []
        for b, (j, r) in enumerate(active):
            st = states[j]
            row = st.rows[r]
            row.tokens.append(tok_list[b])
            row.logprobs.append(lp_list[b])
            if st.job.topk_sample > 0:
                row.topk_ids.append(topk_ids[b, : st.job.topk_sample])
                row.topk_lps.append(topk_lps[b, : st.job.topk_sample])
            _update_done(row, st, decode)
            if not row.done:
                still.append(b)
        if not still:
            return
        if len(still) != len(active):
            keep = torch.tensor(still, device=device)
            cache.batch_select_indices(keep)
            attn, tokens, positions = attn[keep], tokens[keep], positions[keep]
            active = [active[b] for b in still]
        attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=-1)
        out = model(
            input_ids=tokens.unsqueeze(-1), attention_mask=attn, position_ids=positions.unsqueeze(-1),
            past_key_values=cache, use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        positions = positions + 1


def _update_done(row: _Row, st: _JobState, decode: Decode) -> None:
    # The token that triggers a stop is kept, as Tinker's renderers expect the end-of-turn
    # token at the end of a sampled message.
    params = st.job.params
    if row.tokens[-1] in st.stop_tokens:
        row.done = row.stopped = True
    elif params.stop_strings and any(s in decode(row.tokens) for s in params.stop_strings):
        row.done = row.stopped = True
    elif len(row.tokens) >= params.max_tokens:
        row.done = True


class NonFiniteLogits(ValueError):
    """The model computed NaN or inf logits: its adapter's weights hold NaN or inf (a diverged
    run). A user error: the weights are the caller's."""


def _finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the model's logits are NaN or infinite: the adapter's weights hold NaN or inf "
                              "(did training diverge?); sample an earlier checkpoint")


def _choose_all(
    states: list[_JobState], active: list[tuple[int, int]], logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _finite(logits)  # else NaN would pass through the CDF as a random token
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.empty(len(active), dtype=torch.long, device=logits.device)
    by_job: dict[int, tuple[list[int], list[int]]] = {}
    for b, (j, r) in enumerate(active):
        batch_idx, rows = by_job.setdefault(j, ([], []))
        batch_idx.append(b)
        rows.append(r)
    for j, (batch_idx, rows) in by_job.items():
        st = states[j]
        idx = torch.tensor(batch_idx, device=logits.device)
        tokens[idx] = _choose(logits[idx], st.job.params, st.generator, torch.tensor(rows), st.job.num_samples)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logprobs


def _choose(
    logits: torch.Tensor, params: SampleParams, generator: torch.Generator | None, rows: torch.Tensor, n: int
) -> torch.Tensor:
    """Tokens for some rows of one request, by inverse-CDF sampling. One uniform per row of the
    request is drawn each step, whichever rows still run, so a row's draws never depend on its
    siblings (or on other requests)."""
    if params.temperature == 0 or generator is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_filter(logits / params.temperature, params), dim=-1)
    uniform = torch.rand(n, generator=generator, device=logits.device, dtype=torch.float64)
    cdf = probs.double().cumsum(dim=-1)
    # The first token whose cumulative mass exceeds u * total: never a zero-probability token.
    x = (uniform[rows.to(logits.device)] * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max_(logits.shape[-1] - 1)


def _topk_rows(
    states: list[_JobState], active: list[tuple[int, int]], logprobs: torch.Tensor
) -> tuple[np.ndarray | None, np.ndarray | None]:
    k = max(states[j].job.topk_sample for j, _ in active)
    if k == 0:
        return None, None
    top = torch.topk(logprobs, k, dim=-1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def _filter(logits: torch.Tensor, params: SampleParams) -> torch.Tensor:
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _vocab_size(model: torch.nn.Module) -> int:
    embeddings = model.get_output_embeddings()
    if embeddings is not None and hasattr(embeddings, "out_features"):
        return int(embeddings.out_features)
    return int(model.config.vocab_size)


def _seed(seed: int | None) -> int:
    # Seeds may exceed int64 on the wire; torch takes 64 unsigned bits.
    return random.getrandbits(63) if seed is None else seed % (1 << 64)


def derived_seed(seed: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
