"""The native Twinkle API's training operations on the shared trainer, one adapter at a time.

Each native adapter is a LoRA adapter of the trainer's pool (the same base model, pool, paging
and checkpoints as Tinker's), plus the state Twinkle keeps beside it: the loss chosen by
set_loss, an optimizer and LR scheduler chosen by name, the gradient-accumulation counters and the
training/evaluation metrics (workers/native_losses.py, workers/native_optim.py). Operations take
and return plain data (lists, numbers, strings), so the same call crosses to a Ray replica.

The optimizer holds the adapter's parameters. The pool may page the adapter out and back in with
new parameter objects; the optimizer and scheduler are then rebuilt around the new ones with
their state (`_bind`). Their state stays in host memory meanwhile.

Runs on the engine's compute thread, like every trainer access.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from schemas.wire import DatumIn
from workers.native_args import NativeArgError
from workers.native_losses import IGNORE_INDEX, NativeLoss, build_loss, default_loss
from workers.native_optim import (
    ForwardRecord,
    GradientAccumulator,
    MetricAccumulator,
    build_optimizer,
    build_scheduler,
)
from workers.passes import Batch
from workers.trainer import LoraTrainer

STATE_FILE = "native_state.pt"  # in a checkpoint folder saved with its optimizer


@dataclass
class NativeAdapter:
    loss: NativeLoss = field(default_factory=default_loss)
    optimizer_args: tuple[str, dict[str, Any]] | None = None
    optimizer: Optimizer | None = None
    scheduler_args: tuple[str, dict[str, Any]] | None = None
    scheduler: LRScheduler | None = None
    acc: GradientAccumulator = field(default_factory=GradientAccumulator)
    train: MetricAccumulator = field(default_factory=MetricAccumulator)
    eval: MetricAccumulator = field(default_factory=MetricAccumulator)
    bound: tuple[int, ...] = ()  # ids of the parameters the optimizer holds
    consumed_train_samples: int = 0  # what the client says it has consumed, as of its last save
    pending: PendingForward | None = None  # the last `forward`, for calculate_loss and backward

    def metrics(self, is_training: bool) -> MetricAccumulator:
        return self.train if is_training else self.eval


@dataclass
class PendingForward:
    """Twinkle's split step (forward, calculate_loss, backward) keeps a graph between calls; here
    the forward's inputs are kept instead and `backward` computes the forward again with its graph,
    so no activations wait across requests (nor break when the pool pages the adapter out)."""

    features: Features
    temperature: float
    logps: torch.Tensor  # [B, T], detached
    loss_kwargs: dict[str, Any] | None = None  # set by calculate_loss


@dataclass(frozen=True)
class Features:
    """A batch of InputFeatures: token ids and next-token aligned labels (-100: not trained)."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    @staticmethod
    def parse(inputs: Any, vocab_size: int) -> Features:
        if not isinstance(inputs, list) or not inputs:
            raise NativeArgError("inputs", "inputs: a non-empty list of InputFeatures ({input_ids, labels})")
        ids, labels = [], []
        for i, feature in enumerate(inputs):
            if not isinstance(feature, Mapping):
                raise NativeArgError("inputs", f"inputs[{i}]: an InputFeature object, got {type(feature).__name__}")
            row = _int_list(feature.get("input_ids"), f"inputs[{i}].input_ids", 0, vocab_size)
            lab = _int_list(feature.get("labels"), f"inputs[{i}].labels", IGNORE_INDEX, vocab_size)
            if not row:
                raise NativeArgError("inputs", f"inputs[{i}].input_ids: empty")
            if len(lab) != len(row):
                raise NativeArgError(
                    "inputs", f"inputs[{i}].labels: {len(lab)} labels for {len(row)} input_ids; they are next-token "
                    "aligned (labels[t] is predicted at position t, -100 where nothing is trained)")
            if any(t != IGNORE_INDEX and t < 0 for t in lab):
                raise NativeArgError("inputs", f"inputs[{i}].labels: ids must be in [0, {vocab_size}) or -100")
            ids.append(row)
            labels.append(lab)
        return Features(ids, labels)

    def labels_tensor(self) -> torch.Tensor:
        width = max(len(r) for r in self.labels)
        return torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in self.labels], dtype=torch.long)

    def data(self) -> list[DatumIn]:
        return [
            DatumIn(tokens=np.asarray(ids, np.int64),
                    loss_fn_inputs={"target_tokens": np.maximum(np.asarray(lab, np.int64), 0)})
            for ids, lab in zip(self.input_ids, self.labels)
        ]


def _int_list(value: Any, where: str, low: int, high: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise NativeArgError("inputs", f"{where}: a list of integer token ids")
    if any(v >= high or (v < 0 and v != low) for v in value):
        raise NativeArgError("inputs", f"{where}: ids must be in [0, {high})")
    return value


class NativeTraining:
    def __init__(self, trainer: LoraTrainer) -> None:
        self._trainer = trainer
        self._states: dict[str, NativeAdapter] = {}

    def forget(self, name: str) -> None:
        self._states.pop(name, None)

    def call(self, name: str, op: str, kwargs: dict[str, Any]) -> Any:
        """Run native op `op` on adapter `name` with the request's kwargs (adapter_name removed)."""
        handler = OPS.get(op)
        if handler is None:
            raise NativeArgError("op", f"op: unknown model operation {op!r}; allowed: {', '.join(sorted(OPS))}")
        state = self._states.setdefault(name, NativeAdapter())
        self._bind(name, state)
        return handler(self, name, state, dict(kwargs))

    # ----- configuration -------------------------------------------------------------------------
    def _configure(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        steps = kw.pop("gradient_accumulation_steps", None)
        if steps is not None:
            state.acc.should_sync(steps)  # checks and stores it

    def _set_loss(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        state.loss = build_loss(kw.pop("loss_cls", None), **kw)

    def _set_optimizer(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        cls = kw.pop("optimizer_cls", None)
        state.optimizer = build_optimizer(cls, self._named_params(name), (), **kw)
        state.optimizer_args, state.scheduler, state.scheduler_args = (cls, kw), None, None
        state.bound = self._param_ids(name)

    def _set_lr_scheduler(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        if state.optimizer is None:
            raise NativeArgError("scheduler_cls", "scheduler_cls: set an optimizer first (set_optimizer)")
        cls = kw.pop("scheduler_cls", None)
        state.scheduler = build_scheduler(cls, state.optimizer, **kw)
        state.scheduler_args = (cls, kw)

    def _named_params(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        # Active: only the active adapter's parameters require grad, and optimizers keep only those.
        with self._trainer.using(name):
            return list(self._trainer.pool.get(name).params.items())

    def _param_ids(self, name: str) -> tuple[int, ...]:
        return tuple(id(p) for _, p in self._named_params(name))

    def _bind(self, name: str, state: NativeAdapter) -> None:
        """Rebuild the optimizer (and scheduler) around the adapter's current parameters if the pool
        paged it in with new ones, keeping their state."""
        if state.optimizer is None or state.optimizer_args is None or self._param_ids(name) == state.bound:
            return
        cls, kw = state.optimizer_args
        saved = state.optimizer.state_dict()
        state.optimizer = build_optimizer(cls, self._named_params(name), (), **kw)
        state.optimizer.load_state_dict(saved)
        if state.scheduler is not None and state.scheduler_args is not None:
            sched_state = state.scheduler.state_dict()
            state.scheduler = build_scheduler(state.scheduler_args[0], state.optimizer, **state.scheduler_args[1])
            state.scheduler.load_state_dict(sched_state)
        state.bound = self._param_ids(name)

    # ----- forward and backward ------------------------------------------------------------------
    def _forward_backward(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, Any]:
        return self._forward(name, state, kw, train=True)

    def _forward_only(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, Any]:
        return self._forward(name, state, kw, train=False)

    def _forward(self, name: str, state: NativeAdapter, kw: dict[str, Any], *, train: bool) -> dict[str, Any]:
        features = Features.parse(kw.pop("inputs", None), self._trainer.info.vocab_size)
        temperature = _positive(kw.pop("temperature", 1.0), "temperature")
        kw.pop("return_logits", None)  # logits are never sent back (their size); logps are
        steps = kw.pop("gradient_accumulation_steps", None)
        labels = features.labels_tensor()
        loss_inputs = state.loss.prepare(labels, kw) if train else None
        metrics = state.metrics(train)
        metrics.forward(state.acc.metric_context(state.optimizer, state.loss.reduction),
                        ForwardRecord(label_tokens=int((labels >= 0).sum())))
        with self._trainer.using(name) as model, torch.set_grad_enabled(train):
            batch = Batch.build(features.data(), {}, self._trainer.pad_token_id, self._trainer.device)
            lp = self._trainer.target_logprobs(model, batch, temperature)
            logps = lp.detach().float().cpu()
            if not train:
                return {"logps": _rows(logps, features), "logits": None}
            leaf = lp.detach().requires_grad_(True)
            result = state.loss(leaf, labels.to(leaf.device), loss_inputs)
            value = float(result.loss.detach())
            if not math.isfinite(value):
                raise NativeArgError("inputs", f"inputs: the loss is {value} (non-finite); nothing was applied")
            result.loss.backward()
            if leaf.grad is not None:
                lp.backward(leaf.grad)
        state.acc.add_loss(result.num_tokens)
        state.acc.add_backward(steps)
        metrics.add_loss(value, result.num_tokens)
        extra = {k: v for k, v in result.metrics.items() if isinstance(v, float) and math.isfinite(v)}
        return {"loss": value, "logps": _rows(logps, features), "logits": None,
                "num_tokens": int(result.num_tokens), **extra}

    # ----- Twinkle's split step: forward, calculate_loss, backward -------------------------------
    def _forward_split(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, Any]:
        features = Features.parse(kw.pop("inputs", None), self._trainer.info.vocab_size)
        temperature = _positive(kw.pop("temperature", 1.0), "temperature")
        kw.pop("return_logits", None)
        _only(kw, "forward", ())
        with self._trainer.using(name) as model, torch.no_grad():
            batch = Batch.build(features.data(), {}, self._trainer.pad_token_id, self._trainer.device)
            logps = self._trainer.target_logprobs(model, batch, temperature).float().cpu()
        state.pending = PendingForward(features, temperature, logps)
        return {"logps": _rows(logps, features), "logits": None}

    def _calculate_loss(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> float:
        pending = self._pending(state)
        labels = pending.features.labels_tensor()
        inputs = state.loss.prepare(labels, kw)
        value = float(state.loss(pending.logps, labels, inputs).loss)
        if not math.isfinite(value):
            raise NativeArgError("inputs", f"inputs: the loss is {value} (non-finite)")
        pending.loss_kwargs = kw
        return value

    def _backward(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        pending = self._pending(state)
        if pending.loss_kwargs is None:
            raise NativeArgError("op", "op: call calculate_loss after forward, then backward")
        steps = kw.pop("gradient_accumulation_steps", None)
        _only(kw, "backward", ())
        inputs = [{"input_ids": i, "labels": lab} for i, lab in zip(pending.features.input_ids, pending.features.labels)]
        state.pending = None
        self._forward(name, state, {"inputs": inputs, "temperature": pending.temperature,
                                    "gradient_accumulation_steps": steps, **pending.loss_kwargs}, train=True)

    @staticmethod
    def _pending(state: NativeAdapter) -> PendingForward:
        if state.pending is None:
            raise NativeArgError("op", "op: no forward to use: call forward first")
        return state.pending

    # ----- small ones: state dict, processor and metric choices ----------------------------------
    def _get_state_dict(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, list]:
        _only(kw, "get_state_dict", ())
        return {key: p.detach().float().cpu().tolist() for key, p in self._trainer.pool.get(name).params.items()}

    def _set_processor(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        """InputProcessor's options: padding is this server's business (rows are padded per pass)."""
        cls = kw.pop("processor_cls", "InputProcessor")
        if cls != "InputProcessor":
            raise NativeArgError("processor_cls", f"processor_cls: unknown {cls!r}; allowed: InputProcessor")
        _only(kw, "set_processor", ("padding_side", "padding_free"))

    def _add_metric(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        """The loss and training metrics are always kept; accuracy needs the logits, never kept here."""
        cls = kw.pop("metric_cls", None)
        kw.pop("is_training", None)
        if cls not in ("LossMetric", "TrainMetric"):
            raise NativeArgError("metric_cls", f"metric_cls: {cls!r} is not available; allowed: LossMetric, "
                                 "TrainMetric (both always on; Accuracy needs logits, which are not kept)")
        _only(kw, "add_metric", ())

    # ----- optimizer steps -----------------------------------------------------------------------
    def _params(self, name: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named_params(name)]

    def _clip_grad_and_step(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        _only(kw, "clip_grad_and_step", (*CLIP_ARGS, *OPTIM_PARAMS))
        optim_params = {k: kw.pop(k) for k in OPTIM_PARAMS if k in kw}
        state.acc.clip_grad_and_step(self._params(name), state.optimizer, state.scheduler, **kw,
                                     optim_params=optim_params or None)

    def _clip_grad_norm(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> str:
        _only(kw, "clip_grad_norm", CLIP_ARGS)
        # The client's type is a string (str(None) on an accumulation micro-step, as Twinkle's).
        return str(state.acc.clip_grad_norm(self._params(name), **kw))

    def _step(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        _only(kw, "step", ("gradient_accumulation_steps", *OPTIM_PARAMS))
        state.acc.step(state.optimizer, kw.pop("gradient_accumulation_steps", None), kw or None)

    def _zero_grad(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        _only(kw, "zero_grad", ("gradient_accumulation_steps",))
        state.acc.zero_grad(state.optimizer, **kw)

    def _lr_step(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> None:
        _only(kw, "lr_step", ("gradient_accumulation_steps",))
        state.acc.lr_step(state.scheduler, **kw)

    # ----- metrics and configuration reports -----------------------------------------------------
    def _calculate_metric(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, Any]:
        is_training = bool(kw.pop("is_training", True))
        ctx = state.acc.metric_context(state.optimizer, state.loss.reduction)
        return state.metrics(is_training).calculate(ctx)

    def _get_train_configs(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> str:
        spec = self._trainer.adapter_spec(name)
        optimizer = state.optimizer_args[0] if state.optimizer_args else None
        scheduler = state.scheduler_args[0] if state.scheduler_args else None
        return (f"lora rank={spec.rank} alpha={spec.alpha} attn={spec.train_attn} mlp={spec.train_mlp} "
                f"unembed={spec.train_unembed}; loss={state.loss.name}({state.loss.args}); optimizer={optimizer}; "
                f"lr_scheduler={scheduler}; gradient_accumulation_steps={state.acc.gradient_accumulation_steps}")

    def _progress(self, name: str, state: NativeAdapter, kw: dict[str, Any]) -> dict[str, int]:
        """What resume_from_checkpoint answers; `consumed_train_samples` (from a save) is recorded first."""
        _only(kw, "progress", ("consumed_train_samples",))
        consumed = kw.get("consumed_train_samples")
        if consumed is not None:
            if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
                raise NativeArgError("consumed_train_samples", "consumed_train_samples: a count (an integer >= 0)")
            state.consumed_train_samples = consumed
        return {"cur_step": state.acc.cur_step, "consumed_train_samples": state.consumed_train_samples,
                "gradient_accumulation_steps": state.acc.gradient_accumulation_steps}

    # ----- the state a save with its optimizer keeps ---------------------------------------------
    def write_state(self, name: str, folder: Path) -> bool:
        """Beside a checkpoint's weights: the loss, optimizer, scheduler and counters; False (nothing
        written) if the adapter was never used through the native API."""
        state = self._states.get(name)
        if state is None:
            return False
        torch.save({
            "loss": [state.loss.name, state.loss.args],
            "optimizer": None if state.optimizer_args is None else list(state.optimizer_args),
            "optimizer_state": None if state.optimizer is None else state.optimizer.state_dict(),
            "scheduler": None if state.scheduler_args is None else list(state.scheduler_args),
            "scheduler_state": None if state.scheduler is None else state.scheduler.state_dict(),
            "counters": [state.acc.cur_step, state.acc.gradient_accumulation_steps, state.consumed_train_samples],
        }, folder / STATE_FILE)
        return True

    def read_state(self, name: str, folder: Path) -> None:
        """Restore what write_state kept (weights are the trainer's business); a checkpoint without
        it (saved through Tinker, or without its optimizer) leaves a fresh state."""
        path = folder / STATE_FILE
        state = self._states[name] = NativeAdapter()
        if not path.is_file():
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)  # plain data and tensors only
        state.loss = build_loss(saved["loss"][0], **saved["loss"][1])
        if saved["optimizer"] is not None:
            cls, kw = saved["optimizer"]
            state.optimizer = build_optimizer(cls, self._named_params(name), (), **kw)
            state.optimizer.load_state_dict(saved["optimizer_state"])
            state.optimizer_args, state.bound = (cls, kw), self._param_ids(name)
        if saved["scheduler"] is not None and state.optimizer is not None:
            cls, kw = saved["scheduler"]
            state.scheduler = build_scheduler(cls, state.optimizer, **kw)
            state.scheduler.load_state_dict(saved["scheduler_state"])
            state.scheduler_args = (cls, kw)
        state.acc.cur_step, state.acc.gradient_accumulation_steps, state.consumed_train_samples = saved["counters"]


CLIP_ARGS = ("max_grad_norm", "norm_type", "gradient_accumulation_steps")
OPTIM_PARAMS = ("lr", "weight_decay", "eps", "betas")


def _only(kw: Mapping[str, Any], op: str, allowed: Sequence[str]) -> None:
    for key in kw:
        if key not in allowed:
            raise NativeArgError(key, f"{key}: {op} takes no argument {key!r}; allowed: {', '.join(allowed)}")


def _positive(value: Any, field_name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise NativeArgError(field_name, f"{field_name}: a positive number, got {value!r}")
    return float(value)


def _rows(logps: torch.Tensor, features: Features) -> list[list[float]]:
    """[B, T_max] logprobs as plain lists (padding positions 0.0: strict JSON has no NaN)."""
    out = logps.tolist()
    for row, ids in zip(out, features.input_ids):
        for t in range(len(ids), len(row)):
            row[t] = 0.0
    return out


Handler = Callable[[NativeTraining, str, NativeAdapter, dict[str, Any]], Any]
OPS: dict[str, Handler] = {
    "configure": NativeTraining._configure,
    "set_loss": NativeTraining._set_loss,
    "set_optimizer": NativeTraining._set_optimizer,
    "set_lr_scheduler": NativeTraining._set_lr_scheduler,
    "forward_backward": NativeTraining._forward_backward,
    "forward_only": NativeTraining._forward_only,
    "clip_grad_and_step": NativeTraining._clip_grad_and_step,
    "clip_grad_norm": NativeTraining._clip_grad_norm,
    "step": NativeTraining._step,
    "zero_grad": NativeTraining._zero_grad,
    "lr_step": NativeTraining._lr_step,
    "calculate_metric": NativeTraining._calculate_metric,
    "get_train_configs": NativeTraining._get_train_configs,
    "progress": NativeTraining._progress,
    "forward": NativeTraining._forward_split,
    "calculate_loss": NativeTraining._calculate_loss,
    "backward": NativeTraining._backward,
    "get_state_dict": NativeTraining._get_state_dict,
    "set_processor": NativeTraining._set_processor,
    "add_metric": NativeTraining._add_metric,
}
# The ops the server calls itself (add_adapter_to_model's settings, a save's and a resume's progress);
# the rest are the model app's ops a client names.
INTERNAL_OPS = frozenset({"configure", "progress"})
CLIENT_OPS = frozenset(OPS) - INTERNAL_OPS
