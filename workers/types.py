"""Plain data that crosses the engine boundary: no torch, only numbers, strings and numpy arrays,
so the same values can travel to a thread, a process or a Ray actor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from schemas.wire import ForwardBackwardCall


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    seed: int
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamConfig:
    """Tinker's AdamParams; the update is torch.optim.AdamW's (decoupled weight decay)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping


@dataclass(frozen=True)
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # one dict per datum, in request order
    metrics: dict[str, float]  # keys are "<name>:<reduction>"


# Temperatures below this sample greedily (as 0 does). Dividing logits by a tiny temperature
# overflows float32 to inf below ~1e-37, and softmax of that picks the least likely token; well
# before that, at 1e-4, a logit gap of 0.01 already weighs e^-100: greedy in all but name.
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class SampleParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if 0 < self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)


# Tinker's empty top-k cell (tinker.types.topk_logprobs): a position or slot with nothing scored.
TOPK_EMPTY_ID = 0
TOPK_EMPTY_LOGPROB = -99999.0


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make `==` ambiguous
class TopK:
    """The k most likely tokens at each of n positions, most likely first (model logprobs at
    temperature 1). Rows or cells with nothing scored hold (TOPK_EMPTY_ID, TOPK_EMPTY_LOGPROB)."""

    token_ids: np.ndarray  # int64 [n, k]
    logprobs: np.ndarray  # float32 [n, k]


@dataclass(frozen=True, eq=False)
class PromptScoring:
    """What to compute on the prompt itself (SampleRequest's prompt options). All logprobs are the
    model's own: temperature 1, no top-k/top-p.

    * ``logprobs``: prompt_logprobs, one per prompt token, NaN where not scored (position 0).
    * ``last_n``: prompt_logprobs_last_n; only the last N positions are scored (logprobs and
      ``topk``), earlier ones are NaN / empty. Needs ``logprobs``; 1 <= N <= len(prompt) - 1.
    * ``topk``: topk_prompt_logprobs; the k most likely ids at every scored position.
    * ``target_ids``: target_prompt_logprobs as a dense int64 [len(prompt) - 1, K] array; cell
      [i, j] asks for the logprob of that id at prompt position i + 1, -1 asks for nothing.
      Not affected by ``last_n``.
    * ``alt_tokens_k``: prompt_alt_tokens_k; k ids drawn with replacement at the request's
      temperature (no top-k/top-p) at every prompt position after the first. Not affected by
      ``last_n``.
    """

    logprobs: bool = False
    last_n: int | None = None
    topk: int = 0
    target_ids: np.ndarray | None = None
    alt_tokens_k: int = 0

    @property
    def any(self) -> bool:
        return self.logprobs or self.topk > 0 or self.target_ids is not None or self.alt_tokens_k > 0


@dataclass(frozen=True, eq=False)
class SampleJob:
    """One sample request: ``num_samples`` continuations of one prompt."""

    prompt: Sequence[int]
    num_samples: int
    params: SampleParams
    scoring: PromptScoring = field(default_factory=PromptScoring)
    topk_sample: int = 0  # topk_sample_logprobs: the k most likely ids at every sampled position


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk: TopK | None = None  # [len(tokens), k] when SampleJob.topk_sample > 0


@dataclass(frozen=True)
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # NaN at position 0 and before the last_n suffix
    topk_prompt: TopK | None = None  # [len(prompt), k]; empty rows where not scored
    # [len(prompt) - 1, K] float32, dense; 0.0 where the request's id was -1
    target_prompt_logprobs: np.ndarray | None = field(default=None, compare=False)
    # [len(prompt) - 1, k]: int64 ids and their float32 logprobs
    alt_tokens: np.ndarray | None = field(default=None, compare=False)
    alt_logprobs: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SampleTarget:
    """The adapter weights a sample uses: version `key` (the same key always names the same
    weights; samplers cache by it). Its weights are the engine's in-memory version `key`, or
    (`ref` set) the checkpoint the store holds under `ref`."""

    key: str
    ref: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """An in-memory adapter version, as made: its size and its model's optimizer step."""

    nbytes: int
    step: int


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class CustomLossSpec:
    """An uploaded custom loss as stored: the traced graph's JSON and its declared inputs."""

    loss_id: str
    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    graph: dict


@dataclass(frozen=True)
class ModelCalls:
    """One model's share of a packed engine call: its queued forward(_backward) calls (one loss,
    one forward_only between them) and the custom loss they name, if any."""

    model_id: str
    calls: list[ForwardBackwardCall]
    custom: CustomLossSpec | None = None


@dataclass(frozen=True)
class PoolStatus:
    """The LoRA pool of one trainer (LoraTrainer.pool_status). Tenant (training) adapters only,
    except ``pinned``: the adapters kept outside the pool (the sampler's cache), always resident."""

    max_resident: int | None  # None: no limit, nothing is ever paged out
    resident: tuple[str, ...]  # tenant adapters in the model, least recently used first
    pinned: int
    paged_in_host: int  # paged out, held in host memory
    paged_on_disk: int  # paged out and spilled to the spill folder
    host_bytes: int  # bytes of the paged-out adapters held in host memory
    page_ins: int
    page_outs: int
    spills: int  # page-outs that went on to disk


@dataclass(frozen=True)
class ComputeOptions:
    """How an engine runs its trainer and sampler. None means: chosen for the device."""

    torch_threads: int = 2
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: cuda if available, else cpu
    dtype: str | None = None  # "float32" or "bfloat16"; None: bfloat16 on a GPU, float32 on a CPU
    pass_memory_bytes: int | None = None  # activations of one pass; None: 1 GiB on a CPU, 1/4 of a GPU
    max_tokens_per_pass: int | None = None  # None: as many as pass_memory_bytes holds
    custom_loss_seconds: float = 60.0
    max_resident_adapters: int | None = None
    host_budget_bytes: int | None = None
    spill_dir: Path | None = None
    sampler: Literal["hf", "vllm"] = "hf"  # the sampler backend (workers/hf_sampler.py, workers/vllm_sampler.py)
    sampler_cache_versions: int = 8  # adapter versions a sampler keeps built (LRU)
    max_lora_rank: int = 128  # the largest rank a sampler must take (vLLM sizes its LoRA buffers by it)
    packing: Literal["auto", "always", "never"] = "auto"  # workers/packing.py PackRule's mode
