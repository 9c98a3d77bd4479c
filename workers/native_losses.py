"""The native Twinkle API's losses (`set_loss`), chosen by name from an allow-list.

Re-implemented from the semantics of twinkle-kit 0.5.1's `twinkle.loss` (docs/native-losses.md has
each formula and the file:line it comes from); twinkle is never imported. Twinkle looks `loss_cls`
up as any attribute of its `twinkle.loss` module (or a plugin) and swallows unknown kwargs; here a
name outside `NATIVE_LOSSES` or an argument outside its table is an error naming it.

The contract, for a padded batch of B sequences of T positions:
  * `labels` [B, T] int: next-token aligned (labels[t] is the token predicted at position t),
    `ignore_index` (-100) where nothing is trained. The trained positions are the loss's mask.
  * `logps` [B, T] float: the policy's log p(labels[t]) at position t, after the temperature
    (Twinkle divides the logits by `temperature` first). Any value where labels == ignore_index:
    those positions are replaced by 0 before use, so they reach neither the value nor the gradient.
  * per-call inputs from the client's forward_backward kwargs (`advantages`, `old_logps`,
    `ref_logps`, ...), turned into tensors aligned to the mask by `NativeLoss.prepare`.
  * `entropies` [B, T] (GRPO family with entropy_coef > 0) and `predictions` (MSELoss, with
    `labels` as its float targets of the same shape): these need the full logits, so the trainer
    computes them (`token_entropy` for the former).

Every loss is a sum of per-sequence (or per-pair) terms divided by a count of the whole batch. A
trainer that runs one request as several passes of rows passes `totals=BatchTotals.of(labels)` of
the whole request to each pass: the passes' losses and gradients then add up to the whole batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from workers.native_args import Arg, NativeArgError, above, at_least, parse_args, unknown_name, within

IGNORE_INDEX = -100
LOG_RATIO_CLAMP = 20.0  # Twinkle clamps log(pi/pi_old) to [-20, 20] before exp


class NativeLossInputError(NativeArgError):
    """A per-call input (or a tensor from the trainer) that the loss cannot use; `field` names it."""


@dataclass(frozen=True)
class BatchTotals:
    """Counts of a whole forward_backward request, the denominators of every loss."""

    rows: int
    tokens: float  # trained positions (labels != ignore_index)
    chosen_tokens: float  # trained positions of the even rows (the "chosen" of preference pairs)
    pairs: int

    @staticmethod
    def of(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> BatchTotals:
        mask = labels != ignore_index
        return BatchTotals(
            rows=int(labels.shape[0]),
            tokens=float(mask.sum()),
            chosen_tokens=float(mask[0::2].sum()),
            pairs=int(labels.shape[0]) // 2,
        )


@dataclass(frozen=True)
class LossInputs:
    """Per-call inputs of a loss, aligned to the batch (see `NativeLoss.prepare`), in float64."""

    advantages: torch.Tensor | None = None  # [B, T], 0 off the trained positions
    old_logps: torch.Tensor | None = None  # [B, T], 0 off the trained positions
    ref_logps: torch.Tensor | None = None  # [B, T]; GRPO family: 0 off the trained positions
    ref_chosen_logps: torch.Tensor | None = None  # [B/2] sequence sums (DPO)
    ref_rejected_logps: torch.Tensor | None = None  # [B/2]
    num_items_in_batch: float | None = None  # CISPO's denominator, instead of the token count

    def rows(self, start: int, stop: int, width: int | None = None) -> LossInputs:
        """The inputs of rows [start, stop) (even bounds for pairs), cropped to `width` columns
        (the cropped columns must be padding) for a pass that pads to its own length."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop, :width]

        def half(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start // 2 : stop // 2]

        return replace(
            self,
            advantages=cut(self.advantages),
            old_logps=cut(self.old_logps),
            ref_logps=cut(self.ref_logps),
            ref_chosen_logps=half(self.ref_chosen_logps),
            ref_rejected_logps=half(self.ref_rejected_logps),
        )


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable w.r.t. logps (and predictions)
    # Twinkle's LossOutput.num_tokens: what gradients are divided by at clip time. 0 means "one
    # unit" (the loss is already a mean); CrossEntropyLoss(reduction='sum') gives its token count.
    num_tokens: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Batch:
    """The normalised view every loss body works on."""

    lp: torch.Tensor  # [B, T], 0 off the mask
    mask: torch.Tensor  # [B, T] bool
    inputs: LossInputs
    totals: BatchTotals
    entropies: torch.Tensor | None = None
    targets: torch.Tensor | None = None  # MSELoss: lp holds the predictions

    @staticmethod
    def of_outputs(predictions: torch.Tensor, targets: torch.Tensor) -> _Batch:
        mask = torch.ones_like(predictions, dtype=torch.bool)
        return _Batch(predictions, mask, LossInputs(), BatchTotals(predictions.shape[0], 0.0, 0.0, 0), None, targets)

    @property
    def maskf(self) -> torch.Tensor:
        return self.mask.to(self.lp.dtype)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.lp.device, dtype=self.lp.dtype)


LossBody = Callable[[dict[str, Any], _Batch], LossResult]


@dataclass(frozen=True)
class NativeLossSpec:
    name: str
    args: dict[str, Arg]
    body: LossBody
    call_inputs: tuple[str, ...] = ()  # forward_backward kwargs the loss reads
    pairs: bool = False  # rows are interleaved (chosen, rejected) pairs
    needs_logits: bool = False  # reads `predictions` (the full logits), not logps
    source: str = ""  # where twinkle-kit 0.5.1 defines it
    check: Callable[[dict[str, Any]], None] | None = None  # cross-argument checks


@dataclass(frozen=True)
class NativeLoss:
    """A configured loss: `spec` plus its parsed constructor arguments."""

    spec: NativeLossSpec
    args: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ignore_index(self) -> int:
        return self.args.get("ignore_index", IGNORE_INDEX)

    @property
    def needs_entropy(self) -> bool:
        return self.args.get("entropy_coef", 0.0) > 0.0

    @property
    def reduction(self) -> str:
        """Twinkle's `loss_reduction` for its loss metric: 'sum' only for a summed cross-entropy."""
        return self.args.get("reduction", "mean")

    def prepare(self, labels: torch.Tensor, call_kwargs: Mapping[str, Any]) -> LossInputs:
        """The per-call inputs (JSON lists, numbers or tensors) checked and aligned to `labels`."""
        given = {k: v for k, v in call_kwargs.items() if v is not None}  # null means absent
        for key in given:
            if key not in self.spec.call_inputs:
                allowed = ", ".join(self.spec.call_inputs) or "none"
                raise NativeLossInputError(key, f"{key}: {self.name} takes no input {key!r}; allowed: {allowed}")
        mask = _check_labels(labels) != self.ignore_index
        if self.spec.pairs:
            return _prepare_pairs(given, labels)
        return _prepare_tokens(given, mask)

    def __call__(
        self,
        logps: torch.Tensor | None,
        labels: torch.Tensor,
        inputs: LossInputs | None = None,
        *,
        entropies: torch.Tensor | None = None,
        predictions: torch.Tensor | None = None,
        totals: BatchTotals | None = None,
    ) -> LossResult:
        """The loss of a batch. MSELoss reads `predictions` (the model's raw output, e.g. logits)
        against `labels` of the same shape, and no logps."""
        if self.spec.needs_logits:
            _check_predictions(predictions, labels)
            return self.spec.body(self.args, _Batch.of_outputs(predictions, labels))
        batch = self._batch(logps, labels, inputs or LossInputs(), entropies, totals)
        return self.spec.body(self.args, batch)

    def _batch(
        self,
        logps: Any,
        labels: torch.Tensor,
        inputs: LossInputs,
        entropies: torch.Tensor | None,
        totals: BatchTotals | None,
    ) -> _Batch:
        mask = _check_labels(labels) != self.ignore_index
        _check_logps(logps, labels, mask)
        if self.spec.pairs and labels.shape[0] % 2:
            raise NativeLossInputError(
                "labels",
                f"labels: {self.name} needs (chosen, rejected) pairs: an even batch, got {labels.shape[0]} rows",
            )
        if self.needs_entropy:
            _check_same("entropies", entropies, labels)
            entropies = torch.where(mask, entropies, torch.zeros_like(entropies))
        lp = torch.where(mask, logps, torch.zeros_like(logps))
        return _Batch(lp, mask, inputs, totals or BatchTotals.of(labels, self.ignore_index), entropies)


def build_loss(name: str, /, **kwargs: Any) -> NativeLoss:
    """`set_loss(loss_cls=name, **kwargs)`: the loss, or an error naming the bad name or argument."""
    spec = NATIVE_LOSSES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise unknown_name("loss_cls", "loss", name, NATIVE_LOSSES)
    args = parse_args(name, spec.args, kwargs)
    if spec.check is not None:
        spec.check(args)
    return NativeLoss(spec, args)


def default_loss() -> NativeLoss:
    """What an adapter uses before any set_loss: Twinkle's CrossEntropyLoss(reduction='sum')."""
    return build_loss("CrossEntropyLoss", reduction="sum")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(x) - sum(softmax(x) * x). Feed it
    logits already divided by the temperature, as the logps are; chunk rows to bound memory."""
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return lse - (probs * logits).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Input checks and alignment.


def _check_labels(labels: Any) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.dtype.is_floating_point:
        raise NativeLossInputError("labels", f"labels: expected an integer tensor [B, T], got {_describe(labels)}")
    return labels


def _check_logps(logps: Any, labels: torch.Tensor, mask: torch.Tensor) -> None:
    _check_same("logps", logps, labels)
    if not torch.isfinite(logps[mask]).all():
        raise NativeLossInputError("logps", "logps: non-finite value at a trained position")


def _check_same(name: str, t: Any, labels: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.shape != labels.shape:
        raise NativeLossInputError(
            name, f"{name}: expected a float tensor of the labels' shape {tuple(labels.shape)}, got {_describe(t)}"
        )


def _check_predictions(predictions: Any, labels: Any) -> None:
    if not isinstance(predictions, torch.Tensor) or not predictions.dtype.is_floating_point:
        raise NativeLossInputError("predictions", f"predictions: expected a float tensor, got {_describe(predictions)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != predictions.shape:
        shape = tuple(predictions.shape)
        raise NativeLossInputError(
            "labels", f"labels: MSELoss needs labels of the model output's shape {shape}, got {_describe(labels)}"
        )
    if not torch.isfinite(labels).all():
        raise NativeLossInputError("labels", "labels: non-finite value")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _prepare_tokens(given: dict[str, Any], mask: torch.Tensor) -> LossInputs:
    aligned = {k: align_to_mask(k, given[k], mask) for k in ("advantages", "old_logps", "ref_logps") if k in given}
    items = given.get("num_items_in_batch")
    if items is not None:
        items = _positive_number("num_items_in_batch", items)
    return LossInputs(**aligned, num_items_in_batch=items)


def align_to_mask(name: str, value: Any, mask: torch.Tensor) -> torch.Tensor:
    """Twinkle's alignment of a per-token input to the trained positions (`mask` [B, T]), 0 elsewhere:
      * one number per sequence (a flat list of B numbers, a [B] or [B, 1] tensor): broadcast;
      * per sequence, a list of exactly as many values as it has trained positions: scattered
        onto them in order (response-only form, e.g. a sampler's logprobs);
      * per sequence, a list of >= T values: the first T, read at the trained positions
        (full-sequence form, e.g. a reference model's right-padded logps);
      * per sequence, a single value: broadcast.
    Anything else is an error naming `name`, as is a non-finite value or a wrong row count."""
    rows = _as_rows(name, value, mask.shape[0])
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i] = _align_row(name, i, row, mask[i])
    if not torch.isfinite(out).all():
        raise NativeLossInputError(name, f"{name}: non-finite value")
    return out


def _as_rows(name: str, value: Any, batch: int) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64)
        if value.dim() == 1 or (value.dim() == 2 and value.shape[1] == 1):
            value = value.reshape(-1, 1)
        rows = list(value) if value.dim() == 2 else None
    elif isinstance(value, (list, tuple)):
        rows = _list_rows(name, value)
    else:
        rows = None
    if rows is None:
        raise NativeLossInputError(
            name,
            f"{name}: expected one number per sequence or one list of numbers per sequence, got {_describe(value)}",
        )
    if len(rows) != batch:
        raise NativeLossInputError(name, f"{name}: expected {batch} entries (one per sequence), got {len(rows)}")
    return rows


def _list_rows(name: str, value: Sequence[Any]) -> list[torch.Tensor]:
    if all(_is_number(v) for v in value):  # one number per sequence
        return [torch.tensor([float(v)], dtype=torch.float64) for v in value]
    rows = []
    for i, row in enumerate(value):
        if _is_number(row):
            row = [row]
        if not isinstance(row, (list, tuple)) or not all(_is_number(v) for v in row):
            raise NativeLossInputError(name, f"{name}[{i}]: expected a number or a list of numbers")
        rows.append(torch.tensor([float(v) for v in row], dtype=torch.float64))
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _align_row(name: str, i: int, row: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
    row = row.flatten()
    out = torch.zeros(mask_row.shape, dtype=torch.float64)
    n, n_pos, width = row.numel(), int(mask_row.sum()), mask_row.shape[0]
    if n == 1:
        out[mask_row] = row[0]
    elif n == n_pos:
        out[mask_row] = row
    elif n >= width:
        out[mask_row] = row[:width][mask_row]
    else:
        raise NativeLossInputError(
            name,
            f"{name}[{i}]: {n} values fit neither the sequence's {n_pos} trained positions nor its {width} positions",
        )
    return out


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise NativeLossInputError(name, f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _prepare_pairs(given: dict[str, Any], labels: torch.Tensor) -> LossInputs:
    out: dict[str, torch.Tensor] = {}
    if "ref_logps" in given:
        out["ref_logps"] = _align_full_width(given["ref_logps"], labels.shape)
    sums = [k for k in ("ref_chosen_logps", "ref_rejected_logps") if k in given]
    if len(sums) == 1:
        other = ({"ref_chosen_logps", "ref_rejected_logps"} - set(sums)).pop()
        raise NativeLossInputError(other, f"{other}: {sums[0]} needs {other} as well")
    for key in sums:
        out[key] = _pair_sums(key, given[key], labels.shape[0] // 2)
    return LossInputs(**out)


def _align_full_width(value: Any, shape: torch.Size) -> torch.Tensor:
    """DPO's ref_logps: per-token, a [B, T'] rectangle with T' >= T (the right part is dropped)."""
    t = _float_tensor("ref_logps", value)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != shape[0] or t.shape[1] < shape[1]:
        raise NativeLossInputError(
            "ref_logps", f"ref_logps: expected [{shape[0]}, >= {shape[1]}] per-token values, got shape {tuple(t.shape)}"
        )
    return t[:, : shape[1]]


def _pair_sums(name: str, value: Any, pairs: int) -> torch.Tensor:
    t = _float_tensor(name, value).flatten()
    if t.numel() != pairs:
        raise NativeLossInputError(name, f"{name}: expected {pairs} values (one per pair), got {t.numel()}")
    return t


def _float_tensor(name: str, value: Any) -> torch.Tensor:
    try:
        t = (
            value.detach().to("cpu", torch.float64)
            if isinstance(value, torch.Tensor)
            else torch.tensor(value, dtype=torch.float64)
        )
    except (TypeError, ValueError, RuntimeError):
        raise NativeLossInputError(name, f"{name}: expected a rectangular list of numbers") from None
    if not torch.isfinite(t).all():
        raise NativeLossInputError(name, f"{name}: non-finite value")
    return t


# ---------------------------------------------------------------------------------------------
# Cross-entropy and MSE.


def _cross_entropy(args: dict[str, Any], b: _Batch) -> LossResult:
    # DFT (arXiv 2508.05629) weights each token's -log p by p.
    per_token = -b.lp * torch.exp(b.lp) if args["dft"] else -b.lp
    total = (per_token * b.maskf).sum()
    tokens = max(b.totals.tokens, 1.0)
    metrics = {"trained_tokens": float(b.mask.sum())}
    if args["reduction"] == "sum":
        return LossResult(total, tokens, metrics)
    return LossResult(total / tokens, 0.0, metrics)


def _mse(args: dict[str, Any], b: _Batch) -> LossResult:
    # Mean over every element. Twinkle's LossOutput here has no num_tokens (its calculate_loss then
    # fails with a KeyError); 0 is what a mean loss reports.
    assert b.targets is not None
    return LossResult(F.mse_loss(b.lp, b.targets.to(b.lp.dtype)), 0.0)


# ---------------------------------------------------------------------------------------------
# The GRPO family: a policy-gradient objective per token, aggregated per loss.


PerToken = Callable[[dict[str, Any], torch.Tensor, torch.Tensor, _Batch], torch.Tensor]
LogWeight = Callable[[torch.Tensor, _Batch], torch.Tensor]
Aggregate = Callable[[dict[str, Any], torch.Tensor, _Batch], torch.Tensor]


def _grpo_family(per_token: PerToken, log_weight: LogWeight, aggregate: Aggregate, two_sided: bool = True) -> LossBody:
    def body(args: dict[str, Any], b: _Batch) -> LossResult:
        if b.inputs.advantages is None:
            # No advantages (a reference-logps forward, an eval): a zero that keeps the graph.
            return LossResult(b.lp.sum() * 0.0, 0.0, {"skipped": 1.0})
        old = b.lp.detach() if b.inputs.old_logps is None else b.cast(b.inputs.old_logps)
        log_ratio = torch.clamp(b.lp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_weight(log_ratio, b))
        adv = b.cast(b.inputs.advantages)
        loss = per_token(args, ratio, adv, b)
        if args["beta"] > 0.0 and b.inputs.ref_logps is not None:
            loss = loss + args["beta"] * _k3_kl(b.cast(b.inputs.ref_logps), b.lp)
        if args["entropy_coef"] > 0.0:
            loss = loss - args["entropy_coef"] * b.entropies.to(loss.dtype)
        return LossResult(aggregate(args, loss, b), 0.0, _ratio_metrics(args, ratio, b, two_sided))

    return body


def _k3_kl(ref: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    # Schulman's k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi.
    d = ref - lp
    return torch.exp(d) - d - 1


def _token_ratio(log_ratio: torch.Tensor, b: _Batch) -> torch.Tensor:
    return log_ratio


def _sequence_ratio(log_ratio: torch.Tensor, b: _Batch) -> torch.Tensor:
    # GSPO: one weight per sequence, the mean log-ratio over its trained tokens ([B, 1]).
    return ((log_ratio * b.maskf).sum(-1) / b.maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _clipped_objective(args: dict, ratio: torch.Tensor, adv: torch.Tensor, b: _Batch) -> torch.Tensor:
    clipped = torch.clamp(ratio, 1 - args["epsilon"], 1 + _epsilon_high(args))
    return -torch.minimum(ratio * adv, clipped * adv)


def _cispo_objective(args: dict, ratio: torch.Tensor, adv: torch.Tensor, b: _Batch) -> torch.Tensor:
    # The ratio, capped above at 1 + epsilon, is a constant weight on the policy gradient.
    return -torch.clamp(ratio, max=1 + args["epsilon"]).detach() * adv * b.lp


def _epsilon_high(args: dict[str, Any]) -> float:
    high = args.get("epsilon_high")
    return args["epsilon"] if high is None else high


def _seq_mean_token_mean(args: dict, loss: torch.Tensor, b: _Batch) -> torch.Tensor:
    per_seq = (loss * b.maskf).sum(-1) / b.maskf.sum(-1).clamp(min=1.0)
    return per_seq.sum() / b.totals.rows


def _token_mean(args: dict, loss: torch.Tensor, b: _Batch) -> torch.Tensor:
    return (loss * b.maskf).sum() / max(b.totals.tokens, 1.0)


def _ppo_aggregate(args: dict, loss: torch.Tensor, b: _Batch) -> torch.Tensor:
    agg = _token_mean if args["loss_agg_mode"] == "token-mean" else _seq_mean_token_mean
    return agg(args, loss, b)


def _cispo_aggregate(args: dict, loss: torch.Tensor, b: _Batch) -> torch.Tensor:
    # Twinkle divides by num_items_in_batch, else the token count, unclamped (0 tokens: NaN);
    # here 0 tokens give 0.
    items = b.inputs.num_items_in_batch
    return (loss * b.maskf).sum() / (items if items is not None else max(b.totals.tokens, 1.0))


def _ratio_metrics(args: dict, ratio: torch.Tensor, b: _Batch, two_sided: bool) -> dict[str, float]:
    """Mean importance ratio and the share of trained tokens whose ratio is clipped (CISPO
    caps only above, at 1 + epsilon)."""
    with torch.no_grad():
        r = ratio.expand_as(b.lp)[b.mask]
        if r.numel() == 0:
            return {}
        high = 1 + (_epsilon_high(args) if two_sided else args["epsilon"])
        clipped = (r > high) | ((r < 1 - args["epsilon"]) if two_sided else torch.zeros_like(r, dtype=torch.bool))
        return {"ratio_mean": float(r.mean()), "clip_fraction": float(clipped.float().mean())}


# ---------------------------------------------------------------------------------------------
# Preference losses: rows are interleaved pairs (chosen_1, rejected_1, chosen_2, ...).


@dataclass(frozen=True)
class _Pairs:
    chosen_sum: torch.Tensor  # [P] sum of logps over each chosen sequence's trained tokens
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor  # [P] trained-token counts
    rejected_tokens: torch.Tensor

    @staticmethod
    def of(lp: torch.Tensor, maskf: torch.Tensor) -> _Pairs:
        sums, counts = (lp * maskf).sum(-1), maskf.sum(-1)
        return _Pairs(sums[0::2], sums[1::2], counts[0::2], counts[1::2])

    def chosen_mean(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_tokens.clamp(min=1)

    def rejected_mean(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_tokens.clamp(min=1)


def _pair_mean(per_pair: torch.Tensor, b: _Batch) -> torch.Tensor:
    return per_pair.sum() / max(b.totals.pairs, 1)


def _chosen_nll(p: _Pairs, b: _Batch) -> torch.Tensor:
    # Mean negative log-likelihood over every trained token of the chosen sequences.
    return -p.chosen_sum.sum() / max(b.totals.chosen_tokens, 1.0)


def _pair_metrics(margin: torch.Tensor) -> dict[str, float]:
    m = margin.detach()
    if m.numel() == 0:
        return {}
    return {"margin_mean": float(m.mean()), "pair_accuracy": float((m > 0).float().mean())}


def _dpo(args: dict[str, Any], b: _Batch) -> LossResult:
    p = _Pairs.of(b.lp, b.maskf)
    ref = _dpo_reference(args, b)
    if ref is None:
        # Neither reference logps nor reference_free: Twinkle answers a zero loss (nothing trained).
        return LossResult((p.chosen_sum.sum() + p.rejected_sum.sum()) * 0.0, 0.0, {"skipped": 1.0})
    chosen_ratio, rejected_ratio = p.chosen_sum - ref[0], p.rejected_sum - ref[1]
    per_pair = _dpo_per_pair(args, chosen_ratio, rejected_ratio)
    loss = _pair_mean(per_pair, b)
    if args["sft_weight"] > 0:
        loss = loss + args["sft_weight"] * _chosen_nll(p, b)
    return LossResult(loss, 0.0, _pair_metrics(chosen_ratio - rejected_ratio))


def _dpo_reference(args: dict[str, Any], b: _Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(chosen, rejected) sequence log-probs under the reference: given as sums, or summed from
    per-token ref_logps over the labels' mask, or zeros when reference_free."""
    x = b.inputs
    if args["reference_free"]:
        # Twinkle ignores any reference given with reference_free (the log-ratios are the policy's).
        zero = torch.zeros(b.lp.shape[0] // 2, dtype=b.lp.dtype, device=b.lp.device)
        return zero, zero
    if x.ref_chosen_logps is not None and x.ref_rejected_logps is not None:
        return b.cast(x.ref_chosen_logps), b.cast(x.ref_rejected_logps)
    if x.ref_logps is not None:
        sums = (b.cast(x.ref_logps[:, : b.lp.shape[1]]) * b.maskf).sum(-1)
        return sums[0::2], sums[1::2]
    return None


def _dpo_per_pair(args: dict[str, Any], chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    beta, kind = args["beta"], args["loss_type"]
    z = beta * (chosen - rejected)
    if kind == "sigmoid":
        eps = args["label_smoothing"]
        # Soft Bradley-Terry labels: with probability eps the preference is flipped.
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z) if eps > 0 else -F.logsigmoid(z)
    if kind == "hinge":
        return torch.relu(1 - z)
    if kind == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    # kto_pair: each side scored on its own log-ratio.
    return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)


def _simpo(args: dict[str, Any], b: _Batch) -> LossResult:
    p = _Pairs.of(b.lp, b.maskf)
    margin = p.chosen_mean() - p.rejected_mean()
    per_pair = -F.logsigmoid(args["beta"] * margin - args["gamma"])
    return LossResult(_pair_mean(per_pair, b), 0.0, _pair_metrics(margin))


def _cpo(args: dict[str, Any], b: _Batch) -> LossResult:
    p = _Pairs.of(b.lp, b.maskf)
    margin = p.chosen_sum - p.rejected_sum
    preference = _pair_mean(-F.logsigmoid(args["beta"] * margin), b)
    return LossResult(preference + args["bc_coef"] * _chosen_nll(p, b), 0.0, _pair_metrics(margin))


def _orpo(args: dict[str, Any], b: _Batch) -> LossResult:
    p = _Pairs.of(b.lp, b.maskf)
    log_odds = _log_odds(p.chosen_mean()) - _log_odds(p.rejected_mean())
    odds_ratio = _pair_mean(-F.logsigmoid(log_odds), b)
    return LossResult(_chosen_nll(p, b) + args["lambda_orpo"] * odds_ratio, 0.0, _pair_metrics(log_odds))


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp), with log(1 - p) computed stably (Maechler's
    log1mexp); avg_logp is capped just below 0 so that p = 1 stays finite."""
    x = torch.clamp(avg_logp, max=-1e-7)
    log1mexp = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return avg_logp - log1mexp


# ---------------------------------------------------------------------------------------------
# The allow-list.

_IGNORE = Arg("int", IGNORE_INDEX)


def _grpo_args(**extra: Arg) -> dict[str, Arg]:
    return {
        "epsilon": Arg("float", 0.2, at_least(0.0)),
        "epsilon_high": Arg("float", None, at_least(0.0), nullable=True),
        "beta": Arg("float", 0.0, at_least(0.0)),
        "entropy_coef": Arg("float", 0.0, at_least(0.0)),
        "ignore_index": _IGNORE,
        **extra,
    }


def _check_dpo(args: dict[str, Any]) -> None:
    if args["label_smoothing"] > 0 and args["loss_type"] != "sigmoid":
        raise NativeArgError(
            "label_smoothing", "label_smoothing: DPOLoss supports label_smoothing > 0 only with loss_type='sigmoid'"
        )


_RL_INPUTS = ("advantages", "old_logps", "ref_logps")
_SRC = "twinkle/loss/"

NATIVE_LOSSES: dict[str, NativeLossSpec] = {
    "CrossEntropyLoss": NativeLossSpec(
        "CrossEntropyLoss",
        {"ignore_index": _IGNORE, "reduction": Arg("str", "mean", choices=("mean", "sum")), "dft": Arg("bool", False)},
        _cross_entropy,
        source=_SRC + "cross_entropy.py:6",
    ),
    "GRPOLoss": NativeLossSpec(
        "GRPOLoss",
        _grpo_args(),
        _grpo_family(_clipped_objective, _token_ratio, _seq_mean_token_mean),
        call_inputs=_RL_INPUTS,
        source=_SRC + "grpo.py:13",
    ),
    "PPOLoss": NativeLossSpec(
        "PPOLoss",
        _grpo_args(loss_agg_mode=Arg("str", "token-mean", choices=("token-mean", "seq-mean-token-mean"))),
        _grpo_family(_clipped_objective, _token_ratio, _ppo_aggregate),
        call_inputs=_RL_INPUTS,
        source=_SRC + "grpo.py:307",
    ),
    "GSPOLoss": NativeLossSpec(
        "GSPOLoss",
        _grpo_args(),
        _grpo_family(_clipped_objective, _sequence_ratio, _seq_mean_token_mean),
        call_inputs=_RL_INPUTS,
        source=_SRC + "grpo.py:340",
    ),
    "CISPOLoss": NativeLossSpec(
        "CISPOLoss",
        _grpo_args(),
        _grpo_family(_cispo_objective, _token_ratio, _cispo_aggregate, two_sided=False),
        call_inputs=(*_RL_INPUTS, "num_items_in_batch"),
        source=_SRC + "grpo.py:396",
    ),
    "DPOLoss": NativeLossSpec(
        "DPOLoss",
        {
            "beta": Arg("float", 0.1, above(0.0)),
            "label_smoothing": Arg("float", 0.0, within(0.0, 1.0)),
            "ignore_index": _IGNORE,
            "loss_type": Arg("str", "sigmoid", choices=("sigmoid", "hinge", "ipo", "kto_pair")),
            "reference_free": Arg("bool", False),
            "sft_weight": Arg("float", 0.0, at_least(0.0)),
        },
        _dpo,
        call_inputs=("ref_logps", "ref_chosen_logps", "ref_rejected_logps"),
        pairs=True,
        source=_SRC + "dpo.py:101",
        check=_check_dpo,
    ),
    "SimPOLoss": NativeLossSpec(
        "SimPOLoss",
        {"beta": Arg("float", 2.5, above(0.0)), "gamma": Arg("float", 0.5), "ignore_index": _IGNORE},
        _simpo,
        pairs=True,
        source=_SRC + "dpo.py:353",
    ),
    "CPOLoss": NativeLossSpec(
        "CPOLoss",
        {"beta": Arg("float", 0.1, above(0.0)), "bc_coef": Arg("float", 1.0, at_least(0.0)), "ignore_index": _IGNORE},
        _cpo,
        pairs=True,
        source=_SRC + "dpo.py:417",
    ),
    "ORPOLoss": NativeLossSpec(
        "ORPOLoss",
        {"lambda_orpo": Arg("float", 0.1, at_least(0.0)), "ignore_index": _IGNORE},
        _orpo,
        pairs=True,
        source=_SRC + "dpo.py:486",
    ),
    "MSELoss": NativeLossSpec("MSELoss", {}, _mse, needs_logits=True, source=_SRC + "mse.py:6"),
}
