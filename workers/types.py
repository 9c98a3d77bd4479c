"""Plain data that crosses the engine boundary: no torch, only numbers, strings and numpy arrays,
so the same values can travel to a thread, a process or a Ray actor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


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


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # NaN at position 0


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
