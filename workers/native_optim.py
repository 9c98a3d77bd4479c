"""The native Twinkle API's optimizers, LR schedulers, gradient accumulation and training metrics.

Re-implemented from the semantics of twinkle-kit 0.5.1 (`twinkle/model/transformers/transformers.py`,
`twinkle/model/optimizer_group.py`, `twinkle/module/scheduler/`, `twinkle/utils/grad_clip.py`,
`twinkle/metric/`; docs/native-losses.md has the line numbers); twinkle is never imported.
Twinkle builds `optimizer_cls` / `scheduler_cls` from any attribute of `torch.optim` /
`torch.optim.lr_scheduler` (or a plugin); here only the names in `OPTIMIZERS` / `SCHEDULERS` exist,
each with a table of the kwargs it takes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from workers.native_args import Arg, NativeArgError, above, at_least, parse_args, parse_value, unknown_name, within

DEFAULT_LR = 1e-5  # Twinkle's set_optimizer default learning rate
DEFAULT_WEIGHT_DECAY = 0.01  # ...and weight decay, for every optimizer (Adam and SGD included)

# Parameter names that get no weight decay (searched in the lower-cased full name), as Twinkle's
# _create_param_group; parameters of torch.nn.LayerNorm modules get none either.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = [re.compile(p) for p in NO_DECAY_PATTERNS]

NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


# ---------------------------------------------------------------------------------------------
# Optimizers.


def is_no_decay(name: str) -> bool:
    """True for a parameter Twinkle exempts from weight decay by its name (biases, norms)."""
    lowered = name.lower()
    return any(p.search(lowered) for p in _NO_DECAY)


def layer_norm_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that live in torch.nn.LayerNorm modules (also exempt, by type)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters())
    return names


def param_groups(params: NamedParams, lr: float, weight_decay: float, extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Twinkle's two groups, always both (the second may be empty): decayed, then not decayed.
    Only parameters that require grad are kept."""
    exempt = set(extra_no_decay)
    decay: list[tuple[str, torch.nn.Parameter]] = []
    no_decay: list[tuple[str, torch.nn.Parameter]] = []
    for name, p in params:
        if p.requires_grad:
            (no_decay if is_no_decay(name) or name in exempt else decay).append((name, p))
    return [_group(decay, lr, weight_decay), _group(no_decay, lr, 0.0)]


def _group(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> dict:
    return {
        "params": [p for _, p in named],
        "param_names": [n for n, _ in named],
        "weight_decay": weight_decay,
        "lr": lr,
    }


_BETAS = Arg("pair", (0.9, 0.999), within(0.0, 1.0, high_open=True))
_ADAM_ARGS = {
    "lr": Arg("float", DEFAULT_LR, at_least(0.0)),
    "weight_decay": Arg("float", DEFAULT_WEIGHT_DECAY, at_least(0.0)),
    "betas": _BETAS,
    "eps": Arg("float", 1e-8, at_least(0.0)),
    "amsgrad": Arg("bool", False),
    "maximize": Arg("bool", False),
}


@dataclass(frozen=True)
class OptimizerSpec:
    cls: type[Optimizer]
    args: dict[str, Arg]
    check: Callable[[dict[str, Any]], None] | None = None


def _check_sgd(args: dict[str, Any]) -> None:
    if args["nesterov"] and (args["momentum"] <= 0 or args["dampening"] != 0):
        raise NativeArgError("nesterov", "nesterov: SGD's Nesterov momentum needs momentum > 0 and dampening = 0")


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec(torch.optim.AdamW, _ADAM_ARGS),
    "Adam": OptimizerSpec(torch.optim.Adam, {**_ADAM_ARGS, "decoupled_weight_decay": Arg("bool", False)}),
    "SGD": OptimizerSpec(
        torch.optim.SGD,
        {
            "lr": Arg("float", DEFAULT_LR, at_least(0.0)),
            "weight_decay": Arg("float", DEFAULT_WEIGHT_DECAY, at_least(0.0)),
            "momentum": Arg("float", 0.0, at_least(0.0)),
            "dampening": Arg("float", 0.0, at_least(0.0)),
            "nesterov": Arg("bool", False),
            "maximize": Arg("bool", False),
        },
        _check_sgd,
    ),
}


def build_optimizer(
    name: str, params_with_names: NamedParams, extra_no_decay: Iterable[str] = (), /, **kwargs: Any
) -> Optimizer:
    """`set_optimizer(optimizer_cls=name, **kwargs)` over (name, parameter) pairs, e.g. an adapter's
    peft parameters. `extra_no_decay`: names exempt by module type (`layer_norm_param_names`).
    The leading arguments are positional-only, so a client's kwarg of the same name is refused."""
    spec = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise unknown_name("optimizer_cls", "optimizer", name, OPTIMIZERS)
    args = parse_args(name, spec.args, kwargs)
    if spec.check is not None:
        spec.check(args)
    groups = param_groups(params_with_names, args["lr"], args["weight_decay"], extra_no_decay)
    # Twinkle hands the given kwargs to the constructor as well: they become its defaults.
    given = {k: args[k] for k in kwargs}
    return spec.cls(groups, **given)


_OPTIM_PARAMS = {
    "lr": Arg("float", rule=at_least(0.0)),
    "weight_decay": Arg("float", None, at_least(0.0), nullable=True),
    "eps": Arg("float", None, at_least(0.0), nullable=True),
    "betas": Arg("pair", None, within(0.0, 1.0, high_open=True), nullable=True),
}


def apply_optim_params(optimizer: Optimizer, optim_params: Mapping[str, Any]) -> None:
    """`step(optim_params={...})`: per-step hyperparameters, Adam and AdamW only. `lr` is required;
    weight_decay replaces only non-zero decays (the no-decay group keeps 0)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise NativeArgError(
            "optim_params",
            f"optim_params: only Adam and AdamW take per-step parameters, not {type(optimizer).__name__}",
        )
    if not isinstance(optim_params, Mapping):
        raise NativeArgError("optim_params", "optim_params: expected an object")
    args = parse_args("optim_params", _OPTIM_PARAMS, optim_params)
    for group in optimizer.param_groups:
        group["lr"] = args["lr"]
        if group["weight_decay"] > 0.0 and args["weight_decay"] is not None:
            group["weight_decay"] = args["weight_decay"]
        for key in ("eps", "betas"):
            if args[key] is not None:
                group[key] = args[key]


# ---------------------------------------------------------------------------------------------
# LR schedulers: torch's step-based ones and Twinkle's two warmup schedules.


def cosine_warmup_factor(step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> float:
    """Linear warmup from 0, then a cosine of `num_cycles` periods over the remaining steps,
    floored at 0. With num_cycles=0.5 the factor rises again after num_training_steps."""
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress)))


def linear_warmup_factor(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    """Linear warmup from 0, then a straight line down to 0 at num_training_steps, and 0 after."""
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))


class CosineWarmupScheduler(LambdaLR):
    def __init__(self, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5):
        self.num_warmup_steps, self.num_training_steps, self.num_cycles = (
            num_warmup_steps,
            num_training_steps,
            num_cycles,
        )
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return cosine_warmup_factor(step, self.num_warmup_steps, self.num_training_steps, self.num_cycles)


class LinearWarmupScheduler(LambdaLR):
    def __init__(self, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int):
        self.num_warmup_steps, self.num_training_steps = num_warmup_steps, num_training_steps
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return linear_warmup_factor(step, self.num_warmup_steps, self.num_training_steps)


def _check_one_cycle(args: dict[str, Any]) -> None:
    if args["total_steps"] is None and (args["epochs"] is None or args["steps_per_epoch"] is None):
        raise NativeArgError("total_steps", "total_steps: OneCycleLR needs total_steps, or epochs and steps_per_epoch")


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type[LRScheduler]
    args: dict[str, Arg]
    check: Callable[[dict[str, Any]], None] | None = None


_WARMUP = {"num_warmup_steps": Arg("int", rule=at_least(0)), "num_training_steps": Arg("int", rule=at_least(0))}
_LR = torch.optim.lr_scheduler

# Left out: LambdaLR and MultiplicativeLR (they take a callable), SequentialLR and ChainedScheduler
# (they take scheduler objects), ReduceLROnPlateau (its step needs a metric); `last_epoch` (resuming
# goes through the scheduler's state dict) and CyclicLR's `scale_fn` (a callable).
SCHEDULERS: dict[str, SchedulerSpec] = {
    "CosineWarmupScheduler": SchedulerSpec(
        CosineWarmupScheduler, {**_WARMUP, "num_cycles": Arg("float", 0.5, at_least(0.0))}
    ),
    "LinearWarmupScheduler": SchedulerSpec(LinearWarmupScheduler, dict(_WARMUP)),
    "StepLR": SchedulerSpec(
        _LR.StepLR, {"step_size": Arg("int", rule=at_least(1)), "gamma": Arg("float", 0.1, above(0.0))}
    ),
    "MultiStepLR": SchedulerSpec(
        _LR.MultiStepLR, {"milestones": Arg("ints", rule=at_least(0)), "gamma": Arg("float", 0.1, above(0.0))}
    ),
    "ConstantLR": SchedulerSpec(
        _LR.ConstantLR, {"factor": Arg("float", 1 / 3, within(0.0, 1.0)), "total_iters": Arg("int", 5, at_least(0))}
    ),
    "LinearLR": SchedulerSpec(
        _LR.LinearLR,
        {
            "start_factor": Arg("float", 1 / 3, within(0.0, 1.0, low_open=True)),
            "end_factor": Arg("float", 1.0, within(0.0, 1.0)),
            "total_iters": Arg("int", 5, at_least(0)),
        },
    ),
    "ExponentialLR": SchedulerSpec(_LR.ExponentialLR, {"gamma": Arg("float", rule=above(0.0))}),
    "PolynomialLR": SchedulerSpec(
        _LR.PolynomialLR, {"total_iters": Arg("int", 5, at_least(1)), "power": Arg("float", 1.0, at_least(0.0))}
    ),
    "CosineAnnealingLR": SchedulerSpec(
        _LR.CosineAnnealingLR, {"T_max": Arg("int", rule=at_least(1)), "eta_min": Arg("float", 0.0, at_least(0.0))}
    ),
    "CosineAnnealingWarmRestarts": SchedulerSpec(
        _LR.CosineAnnealingWarmRestarts,
        {
            "T_0": Arg("int", rule=at_least(1)),
            "T_mult": Arg("int", 1, at_least(1)),
            "eta_min": Arg("float", 0.0, at_least(0.0)),
        },
    ),
    "CyclicLR": SchedulerSpec(
        _LR.CyclicLR,
        {
            "base_lr": Arg("float", rule=at_least(0.0)),
            "max_lr": Arg("float", rule=at_least(0.0)),
            "step_size_up": Arg("int", 2000, at_least(1)),
            "step_size_down": Arg("int", None, at_least(1), nullable=True),
            "mode": Arg("str", "triangular", choices=("triangular", "triangular2", "exp_range")),
            "gamma": Arg("float", 1.0, above(0.0)),
            "cycle_momentum": Arg("bool", True),
            "base_momentum": Arg("float", 0.8, within(0.0, 1.0)),
            "max_momentum": Arg("float", 0.9, within(0.0, 1.0)),
        },
    ),
    "OneCycleLR": SchedulerSpec(
        _LR.OneCycleLR,
        {
            "max_lr": Arg("float", rule=above(0.0)),
            "total_steps": Arg("int", None, at_least(1), nullable=True),
            "epochs": Arg("int", None, at_least(1), nullable=True),
            "steps_per_epoch": Arg("int", None, at_least(1), nullable=True),
            "pct_start": Arg("float", 0.3, within(0.0, 1.0)),
            "anneal_strategy": Arg("str", "cos", choices=("cos", "linear")),
            "cycle_momentum": Arg("bool", True),
            "base_momentum": Arg("float", 0.85, within(0.0, 1.0)),
            "max_momentum": Arg("float", 0.95, within(0.0, 1.0)),
            "div_factor": Arg("float", 25.0, above(0.0)),
            "final_div_factor": Arg("float", 1e4, above(0.0)),
            "three_phase": Arg("bool", False),
        },
        _check_one_cycle,
    ),
}


def build_scheduler(name: str, optimizer: Optimizer | None, /, **kwargs: Any) -> LRScheduler:
    """`set_lr_scheduler(scheduler_cls=name, **kwargs)` on an optimizer set before."""
    spec = SCHEDULERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise unknown_name("scheduler_cls", "LR scheduler", name, SCHEDULERS)
    args = parse_args(name, spec.args, kwargs)
    if spec.check is not None:
        spec.check(args)
    optimizer = _require(optimizer)
    try:
        return spec.cls(optimizer, **args)
    except ValueError as e:  # torch's own checks across arguments (e.g. CyclicLR's momentum)
        raise NativeArgError("scheduler_cls", f"scheduler_cls: {name}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and clipping.

_GAS = Arg("int", rule=at_least(1))
_MAX_NORM = Arg("float", rule=above(0.0))


def _norm_type(value: Any) -> float:
    if value in ("inf", "Infinity") or value == math.inf:
        return math.inf
    return parse_value("norm_type", "norm_type", Arg("float", rule=above(0.0)), value)


@dataclass
class GradientAccumulator:
    """One adapter's accumulation state, as Twinkle's optimizer group keeps it.

    The clip/step/zero_grad/lr_step calls act only on a "sync" call: always with one accumulation
    step; with N > 1, when (backwards - 1) % N == 0 and backwards > 1, so the first optimizer step
    comes after N + 1 micro-batches and every N after that. A `gradient_accumulation_steps` given
    to any call replaces the stored one from then on."""

    gradient_accumulation_steps: int = 1
    cur_step: int = 0  # backward passes so far
    num_tokens: float = 0.0  # what the accumulated gradients are divided by at the next clip
    last_grad_norm: float = 0.0

    def should_sync(self, gradient_accumulation_steps: int | None = None) -> bool:
        if gradient_accumulation_steps is not None:
            self.gradient_accumulation_steps = parse_value(
                "gradient_accumulation_steps", "gradient_accumulation_steps", _GAS, gradient_accumulation_steps
            )
        n = self.gradient_accumulation_steps
        return n == 1 or ((self.cur_step - 1) % n == 0 and self.cur_step > 1)

    def add_loss(self, num_tokens: float) -> None:
        """After a training loss: its LossResult.num_tokens, or 1 for a loss that is a mean (0)."""
        self.num_tokens += num_tokens if num_tokens else 1.0

    def add_backward(self, gradient_accumulation_steps: int | None = None) -> bool:
        """After the backward of a forward_backward; True when this micro-batch completes a step."""
        self.cur_step += 1
        return self.should_sync(gradient_accumulation_steps)

    def clip_grad_norm(
        self,
        params: Iterable[torch.nn.Parameter],
        /,
        max_grad_norm: float = 1.0,
        norm_type: Any = 2,
        gradient_accumulation_steps: int | None = None,
    ) -> float | None:
        """On a sync call: divide the gradients by the tokens counted since the last clip, clip
        them, and return their norm before clipping (None on a micro-step)."""
        max_norm = parse_value("max_grad_norm", "max_grad_norm", _MAX_NORM, max_grad_norm)
        p_norm = _norm_type(norm_type)
        if not self.should_sync(gradient_accumulation_steps):
            return None
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        divisor = self.num_tokens if self.num_tokens > 0 else 1.0
        for g in grads:
            g.div_(divisor)
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=p_norm)) if grads else 0.0
        self.last_grad_norm, self.num_tokens = norm, 0.0
        return norm

    def step(
        self,
        optimizer: Optimizer | None,
        /,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> bool:
        if not self.should_sync(gradient_accumulation_steps):
            return False
        _require(optimizer)
        if optim_params:
            apply_optim_params(optimizer, optim_params)
        optimizer.step()
        return True

    def zero_grad(self, optimizer: Optimizer | None, /, gradient_accumulation_steps: int | None = None) -> bool:
        if not self.should_sync(gradient_accumulation_steps):
            return False
        _require(optimizer).zero_grad(set_to_none=True)
        return True

    def lr_step(self, scheduler: LRScheduler | None, /, gradient_accumulation_steps: int | None = None) -> bool:
        if not self.should_sync(gradient_accumulation_steps):
            return False
        if scheduler is not None:
            scheduler.step()
        return True

    def clip_grad_and_step(
        self,
        params: Iterable[torch.nn.Parameter],
        optimizer: Optimizer | None,
        scheduler: LRScheduler | None,
        /,
        max_grad_norm: float = 1.0,
        norm_type: Any = 2,
        gradient_accumulation_steps: int | None = None,
        optim_params: Mapping[str, Any] | None = None,
    ) -> float | None:
        """`clip_grad_and_step`: clip, step, zero_grad, lr_step; all skipped on a micro-step.
        The wire's kwargs go after the positional-only objects (Twinkle hands `optim_params` on to
        its step)."""
        norm = self.clip_grad_norm(params, max_grad_norm, norm_type, gradient_accumulation_steps)
        self.step(optimizer, None, optim_params)
        self.zero_grad(optimizer)
        self.lr_step(scheduler)
        return norm

    def metric_context(self, optimizer: Optimizer | None, loss_reduction: str) -> MetricContext:
        """What Twinkle hands its metrics when it accumulates a forward."""
        return MetricContext(
            lrs=current_lrs(optimizer),
            step=self.cur_step - 1,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            grad_norm=self.last_grad_norm,
            loss_reduction=loss_reduction,
        )


def _require(optimizer: Optimizer | None) -> Optimizer:
    # Twinkle answers a 500 (an assert) here; a missing set_optimizer is the client's mistake.
    if optimizer is None:
        raise NativeArgError("optimizer_cls", "optimizer_cls: no optimizer is set: call set_optimizer first")
    return optimizer


def current_lrs(optimizer: Optimizer | None) -> list[float]:
    if optimizer is None:
        return []
    default = optimizer.defaults.get("lr")
    return [group.get("lr", default) for group in optimizer.param_groups]


# ---------------------------------------------------------------------------------------------
# Training metrics (`calculate_metric`): Twinkle's LossMetric, Accuracy and TrainMetric.


@dataclass(frozen=True)
class MetricContext:
    lrs: list[float]
    step: int
    gradient_accumulation_steps: int
    grad_norm: float
    loss_reduction: str  # "sum": the loss metric divides by tokens, else by forwards


@dataclass
class ForwardRecord:
    """One forward (or forward_backward) as the metrics see it."""

    label_tokens: int  # labels >= 0: the token count when a summed loss reports none
    loss: float | None = None  # None until a loss is computed on it (forward_only)
    num_tokens: float | None = None  # the loss's LossResult.num_tokens
    correct: int | None = None  # next-token accuracy counts, only when logits were returned
    total: int | None = None


def accuracy_counts(
    predicted: torch.Tensor, labels: torch.Tensor, completion_mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """(correct, counted) of argmax predictions [B, T] against labels: over completion_mask if the
    inputs have one, else over labels != -100."""
    mask = completion_mask.bool() if completion_mask is not None else labels != -100
    return int(((predicted == labels) & mask).sum()), int(mask.sum())


@dataclass
class _Sums:
    loss: float = 0.0
    count: int = 0
    tokens: float = 0.0
    grad_norm: float = 0.0
    correct: int = 0
    total: int = 0


@dataclass
class MetricAccumulator:
    """One status (training or evaluation) of an adapter. Twinkle accumulates a forward lazily:
    when the next forward starts, or at calculate_metric, with the learning rates, step and grad
    norm of *that* moment (after the optimizer step that followed it)."""

    clock: Callable[[], float] = time.time
    pending: ForwardRecord | None = None
    sums: _Sums = field(default_factory=_Sums)
    lrs: list[float] | None = None
    step: int = 0
    last_step: int = 0
    gradient_accumulation_steps: int = 1
    start_time: float = field(default=-1.0)
    reset_time: float = field(default=-1.0)

    def __post_init__(self) -> None:
        self.start_time = self.reset_time = self.clock()

    def forward(self, ctx: MetricContext, record: ForwardRecord) -> None:
        """A new forward: the previous one is accumulated first."""
        self._accumulate(ctx)
        self.pending = record

    def add_loss(self, loss: float, num_tokens: float) -> None:
        """A loss computed on the last forward (Twinkle adds repeated losses up)."""
        if self.pending is not None:
            self.pending.loss = (self.pending.loss or 0.0) + loss
            self.pending.num_tokens = num_tokens

    def calculate(self, ctx: MetricContext) -> dict[str, str | int | float]:
        """Everything since the last call, as Twinkle's calculate_metric answers it; then reset."""
        self._accumulate(ctx)
        results = {**self._loss_results(), **self._accuracy_results(), **self._train_results()}
        self.sums = _Sums()
        self.pending = None
        return results

    def _accumulate(self, ctx: MetricContext) -> None:
        r, s = self.pending, self.sums
        if r is None:
            return
        self.pending = None
        if r.loss is not None:
            if ctx.loss_reduction == "sum":
                s.tokens += r.num_tokens if r.num_tokens is not None else r.label_tokens
            s.grad_norm = ctx.grad_norm
            s.loss += r.loss
            s.count += 1
        if r.correct is not None and r.total is not None:
            s.correct, s.total = s.correct + r.correct, s.total + r.total
        self.lrs, self.step = list(ctx.lrs), ctx.step
        self.gradient_accumulation_steps = ctx.gradient_accumulation_steps

    def _loss_results(self) -> dict[str, str]:
        s = self.sums
        avg = s.loss / s.tokens if s.tokens > 0 else (s.loss / s.count if s.count > 0 else 0.0)
        out = {"loss": f"{avg:.4f}"}
        if s.grad_norm > 0:
            out["grad_norm"] = f"{s.grad_norm:.6f}"
        return out

    def _accuracy_results(self) -> dict[str, str | int]:
        s = self.sums
        if s.total <= 0:
            return {}
        return {"accuracy": f"{s.correct / s.total:.2f}", "correct_tokens": s.correct, "total_tokens": s.total}

    def _train_results(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {}
        lrs = [f"{lr:.6e}" for lr in self.lrs or []]
        if len(lrs) == 1:
            out["learning rate"] = lrs[0]
        else:
            out.update({f"learning rate(param group {i + 1})": lr for i, lr in enumerate(lrs)})
        now = self.clock()
        interval, elapsed = now - self.reset_time, now - self.start_time
        gas = self.gradient_accumulation_steps
        out["iters"] = self.step // gas
        # Twinkle picks the unit by the time since the last call but prints the time since the start.
        out["total time elapse"] = f"{elapsed:.0f} seconds" if interval < 60 else f"{elapsed / 60:.1f} minutes"
        out["speed"] = f"{(self.step - self.last_step) / max(interval, 1e-9) / gas:.2f} iters/s"
        self.reset_time, self.last_step = now, self.step
        return out
