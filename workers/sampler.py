"""Token sampling on a transformers causal LM, with a KV cache.

The returned logprobs are the model's own (temperature 1, no top-k/top-p), i.e. exactly what the
trainer computes for the same tokens: that is what importance-sampling losses compare against.
Temperature, top-k and top-p shape only the choice of the next token. A request's randomness comes
from a private generator seeded by its `seed`, so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from workers.types import SampledSequence, SampleOutput, SampleParams

Decode = Callable[[list[int]], str]


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
) -> SampleOutput:
    generator = torch.Generator().manual_seed(_seed(params.seed))
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    prompt_logprobs = _prompt_logprobs(out.logits[0], ids[0]) if want_prompt_logprobs else None
    cache = out.past_key_values
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
    logits = out.logits[:, -1, :].float().expand(num_samples, -1)

    stop_tokens = set(params.stop_tokens) | (set(eos_token_ids) if params.stop_at_eos else set())
    rows = [_Row() for _ in range(num_samples)]
    for step in range(params.max_tokens):
        tokens, logprobs = _choose(logits, params, generator)
        for row, tok, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            if not row.done:
                row.append(tok, lp, stop_tokens, params.stop_strings, decode)
        if all(row.done for row in rows) or step == params.max_tokens - 1:
            break
        out = model(input_ids=tokens.unsqueeze(-1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
    sequences = [
        SampledSequence(tokens=row.tokens, logprobs=row.logprobs, stop_reason="stop" if row.done else "length")
        for row in rows
    ]
    return SampleOutput(sequences=sequences, prompt_logprobs=prompt_logprobs)


class _Row:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done = False

    def append(
        self, token: int, logprob: float, stop_tokens: set[int], stop_strings: Sequence[str], decode: Decode
    ) -> None:
        # The token that triggers a stop is kept, as Tinker's renderers expect the end-of-turn
        # token at the end of a sampled message.
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in stop_tokens:
            self.done = True
        elif stop_strings:
            text = decode(self.tokens)
            self.done = any(s in text for s in stop_strings)


def _prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Logprob of each prompt token given the ones before it; position 0 has no context (NaN)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    scored = lp.gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
    return [math.nan, *scored.tolist()]


def _choose(
    logits: torch.Tensor, params: SampleParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(_filter(logits / params.temperature, params), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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


def _seed(seed: int | None) -> int:
    # Seeds may exceed int64 on the wire; torch takes 64 unsigned bits.
    return random.getrandbits(63) if seed is None else seed % (1 << 64)
