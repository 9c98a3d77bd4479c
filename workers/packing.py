"""Packed execution: the forward(_backward) calls of several adapters in one pass of the base model.

Each adapter's calls are a `Segment`. Packed, the segments' rows go through the base model once
and every LoRA layer runs each adapter on its own rows (PeftHost.routed); each segment's loss is
evaluated on its own rows and its gradient reaches its own adapter only. The alternative is one
pass per segment, one adapter after another. Both compute the same losses, logprobs and gradients
(tests/unit/test_packed_exactness.py); which is faster depends on the sizes, and `PackRule` says
which to use. The rule's numbers were measured with bench/packing.py; docs/packing.md has the
table they come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from schemas.wire import DatumIn

if TYPE_CHECKING:
    import torch

    from workers.custom_loss import CustomLoss
    from workers.losses import LossFn

PackMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class Segment:
    """One adapter's share of a packed call: its requests' data (one group per request) and its loss."""

    name: str
    groups: list[list[DatumIn]]
    loss: LossFn | CustomLoss
    config: dict[str, float]

    @property
    def rows(self) -> list[int]:
        """The tokens of each datum."""
        return [len(d.tokens) for group in self.groups for d in group]


@dataclass(frozen=True)
class PackLimits:
    """Where packing stops paying on one kind of device: a segment bigger than `segment_tokens`
    runs alone, and a packed pass holds at most `pass_tokens` (padded tokens)."""

    segment_tokens: int
    pass_tokens: int


# Measured with bench/packing.py on the 2-core CPU (docs/packing.md): 4-16 adapters of 16-128
# tokens each gain 1.25-1.96x packed; at 256 tokens a segment packing no longer pays, at 1024 it
# loses (a pass past a few thousand tokens is slower per token there). The GPU's are not measured
# yet: a guess that bigger passes pay on a GPU, to be replaced by its bench/packing.py table.
LIMITS = {"cpu": PackLimits(segment_tokens=128, pass_tokens=2048),
          "cuda": PackLimits(segment_tokens=4096, pass_tokens=32768)}


@dataclass(frozen=True)
class PackRule:
    """Which segments share a pass. `mode`: "auto" by the device's PackLimits, "always" every
    segment whatever its size as long as the pass fits the trainer's budget (tests), "never" one
    adapter after another.

    Packing saves what every pass pays whatever its size (on a CPU, Python and kernel dispatch
    through every layer: a 16-token pass costs a third of a 256-token one) and makes bigger matrix
    products; it costs the padding of short rows to the longest, and a pass too big for the
    device's caches is slower per token."""

    mode: PackMode = "auto"
    limits: dict[str, PackLimits] = field(default_factory=lambda: dict(LIMITS))

    def bounds(self, device_type: str, tokens_per_pass: int) -> PackLimits:
        if self.mode == "always":
            return PackLimits(tokens_per_pass, tokens_per_pass)
        found = self.limits.get(device_type) if self.mode == "auto" else None
        if found is None:
            return PackLimits(0, 0)
        return PackLimits(found.segment_tokens, min(found.pass_tokens, tokens_per_pass))


class _Pool(Protocol):
    max_resident: int | None


class Trainer(Protocol):
    """What plan_packs reads of the trainer (workers/trainer.py LoraTrainer)."""

    packing: PackRule
    device: torch.device
    max_tokens_per_pass: int
    pool: _Pool

    def has_adapter(self, name: str) -> bool: ...


def plan_packs(trainer: Trainer, segments: list[Segment]) -> list[list[int]]:
    """Segment indices per pass-sharing group, in order of their longest row: a group of one runs
    alone (in passes of its own); a bigger one is one packed pass of distinct adapters that all
    exist and fit the pool at once, within the rule's limits. (One pass only: a packed call then
    touches no gradient before every loss has accepted its data, so a failing segment can be
    rerun alone, the others unharmed.)"""
    bounds = trainer.packing.bounds(trainer.device.type, trainer.max_tokens_per_pass)
    most = trainer.pool.max_resident or len(segments)
    groups: list[list[int]] = []
    current: list[int] = []
    rows = width = 0  # of `current`
    for i in sorted(range(len(segments)), key=lambda i: -max(segments[i].rows, default=0)):
        seg = segments[i]
        n, w = len(seg.rows), max(seg.rows, default=0)
        if not n or n * w > bounds.segment_tokens or not trainer.has_adapter(seg.name):
            groups.append([i])  # alone
            continue
        if current and (seg.name in {segments[j].name for j in current} or len(current) >= most
                        or (rows + n) * max(width, w) > bounds.pass_tokens):
            groups.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows, width = rows + n, max(width, w)
    return groups + [current] if current else groups
