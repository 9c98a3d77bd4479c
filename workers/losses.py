"""Tinker's built-in losses, on a padded batch.

Every loss gets the learner's target-token logprobs `lp` [B, T], the per-token inputs the client sent
(padded with zeros to [B, T]) and a 0/1 `mask` [B, T] of real positions, and returns the per-datum
loss [B]. The total is the plain sum over datums (Tinker's sum reduction): no mean, no
normalisation, so losses from several forward_backward calls add up like one big batch.
Real-valued weights and advantages are used as they come (negative ones included): the SDK's
client-side custom losses rely on that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

LossInputs = dict[str, torch.Tensor]
LossBody = Callable[[torch.Tensor, LossInputs, torch.Tensor, dict[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossFn:
    name: str
    required_inputs: tuple[str, ...]
    body: LossBody
    optional_inputs: dict[str, float] = field(default_factory=dict)  # name -> fill value when absent
    config_defaults: dict[str, float] = field(default_factory=dict)


def _cross_entropy(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    return -(lp * x["weights"] * mask).sum(dim=-1)


def _importance_sampling(
    lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]
) -> torch.Tensor:
    # The ratio is taken against the sampler's logprobs; padded positions are masked before exp
    # so a padding value can never overflow.
    log_ratio = (lp - x["logprobs"]) * mask
    return -(torch.exp(log_ratio) * x["advantages"] * mask).sum(dim=-1)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": LossFn(
        name="cross_entropy",
        required_inputs=("target_tokens",),
        optional_inputs={"weights": 1.0},
        body=_cross_entropy,
    ),
    "importance_sampling": LossFn(
        name="importance_sampling",
        required_inputs=("target_tokens", "logprobs", "advantages"),
        body=_importance_sampling,
    ),
}


def get_loss(name: str) -> LossFn | None:
    return LOSSES.get(name)
