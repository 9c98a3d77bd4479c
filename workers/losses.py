"""Tinker's built-in losses, on a padded batch.

Every loss gets the learner's target-token logprobs `lp` [B, T], the per-token inputs the client sent
(padded with zeros to [B, T]) and a 0/1 `mask` [B, T] of real positions, and returns the per-datum
loss [B]. The total is the plain sum over datums (Tinker's sum reduction): no mean, no
normalisation, so losses from several forward_backward calls add up like one big batch.
Real-valued weights and advantages are used as they come (negative ones included): the SDK's
client-side custom losses rely on that.

Each body follows the "This is implemented as" code of its page under
https://tinker-docs.thinkingmachines.ai/tinker/losses/ (sum over the datum's tokens), with padded
positions replaced by neutral values *before* any exp or product, so that padding can never leak
into a value or a gradient (not even as inf·0 = NaN).

`stable_reinforce` is deliberately absent: its objective is not published, and it consumes
sampler-recorded stability information (and provenance spans) that this server does not have, so
a request for it is answered as an unknown loss. `custom` is registered elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

LossInputs = dict[str, torch.Tensor]
LossBody = Callable[[torch.Tensor, LossInputs, torch.Tensor, dict[str, float]], torch.Tensor]

RL_INPUTS = ("target_tokens", "logprobs", "advantages")


@dataclass(frozen=True)
class LossFn:
    name: str
    required_inputs: tuple[str, ...]
    body: LossBody
    optional_inputs: dict[str, float] = field(default_factory=dict)  # name -> fill value when absent
    config_defaults: dict[str, float] = field(default_factory=dict)  # also the allowed config keys


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` on real positions, 0 on padding (whatever the padding holds, inf and NaN included)."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def _cross_entropy(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # loss = -(target_logprobs * weights).sum()
    return -(_real(lp, mask) * _real(x["weights"], mask)).sum(dim=-1)


def _importance_sampling(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # prob_ratio = exp(target_logprobs - sampling_logprobs); loss = -(prob_ratio * advantages).sum()
    ratio = torch.exp(_real(lp - x["logprobs"], mask))
    return -(ratio * _real(x["advantages"], mask)).sum(dim=-1)


def _ppo(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # prob_ratio = exp(target_logprobs - sampling_logprobs)
    # clipped_ratio = clamp(prob_ratio, clip_low_threshold, clip_high_threshold)
    # loss = -min(prob_ratio * advantages, clipped_ratio * advantages).sum()
    ratio = torch.exp(_real(lp - x["logprobs"], mask))
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    adv = _real(x["advantages"], mask)
    return -torch.minimum(ratio * adv, clipped * adv).sum(dim=-1)


def _cispo(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # clipped_ratio = clamp(exp(target_logprobs - sampling_logprobs), clip_low, clip_high)
    # loss = -(clipped_ratio.detach() * target_logprobs * advantages).sum()
    ratio = torch.exp(_real(lp - x["logprobs"], mask))
    coef = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"]).detach()
    return -(coef * _real(lp, mask) * _real(x["advantages"], mask)).sum(dim=-1)


def _dro(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # quadratic_term = (target_logprobs - sampling_logprobs) ** 2
    # loss = -(target_logprobs * advantages - 0.5 * beta * quadratic_term).sum()
    log_ratio = _real(lp - x["logprobs"], mask)
    objective = _real(lp, mask) * _real(x["advantages"], mask) - 0.5 * cfg["beta"] * log_ratio**2
    return -objective.sum(dim=-1)


def _gspo(lp: torch.Tensor, x: LossInputs, mask: torch.Tensor, cfg: dict[str, float]) -> torch.Tensor:
    # GSPO-token. Per datum:
    #   log_ratio = (target_logprobs.detach() - sampling_logprobs)[sequence_ratio_mask != 0].mean()
    #   ratio = exp(log_ratio + target_logprobs - target_logprobs.detach())
    #   loss = -min(ratio * A, clamp(ratio, clip_low_threshold, clip_high_threshold) * A).sum()
    # Every token carries the sequence ratio's value and its own logprob's gradient.
    # A datum whose mask marks no token has no sequence ratio (the mean of nothing): it is taken
    # as 1 (log-ratio 0) rather than NaN, which would poison the whole adapter's gradients.
    lp_sg = lp.detach()
    in_ratio = (x["sequence_ratio_mask"] != 0) & (mask > 0)
    token_log_ratio = torch.where(in_ratio, lp_sg - x["logprobs"], torch.zeros_like(lp_sg))
    count = in_ratio.sum(dim=-1)
    seq_log_ratio = token_log_ratio.sum(dim=-1) / count.clamp(min=1)
    # (lp - lp_sg) is exactly 0 in value; added last so the value is exactly exp(seq_log_ratio).
    ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + _real(lp - lp_sg, mask))
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    adv = _real(x["advantages"], mask)
    return -torch.minimum(ratio * adv, clipped * adv).sum(dim=-1)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": LossFn(
        name="cross_entropy",
        required_inputs=("target_tokens",),
        # The docs list weights as an input; without them every token counts once.
        optional_inputs={"weights": 1.0},
        body=_cross_entropy,
    ),
    "importance_sampling": LossFn(
        name="importance_sampling",
        required_inputs=RL_INPUTS,
        body=_importance_sampling,
    ),
    "ppo": LossFn(
        name="ppo",
        required_inputs=RL_INPUTS,
        body=_ppo,
        # Absolute ratio bounds: ε_low = ε_high = 0.2.
        config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    ),
    "cispo": LossFn(
        name="cispo",
        required_inputs=RL_INPUTS,
        body=_cispo,
        # One-sided by default: no lower bound, the coefficient capped at 4.
        config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    ),
    "dro": LossFn(
        name="dro",
        required_inputs=RL_INPUTS,
        body=_dro,
        # The docs give no default; 0.05 is the value of their example.
        config_defaults={"beta": 0.05},
    ),
    "gspo": LossFn(
        name="gspo",
        required_inputs=(*RL_INPUTS, "sequence_ratio_mask"),
        body=_gspo,
        # The docs' default is not published; PPO's bounds are used.
        config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    ),
}


def get_loss(name: str) -> LossFn | None:
    return LOSSES.get(name)
