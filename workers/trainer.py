"""One base model, many LoRA adapters: forward/backward in passes, AdamW steps and checkpoints per
adapter.

The parts: workers/peft_host.py holds the peft model and switches adapters; workers/lora_pool.py
decides which adapters are resident and pages the others out; workers/passes.py splits a request
into passes of bounded size and computes target logprobs in bounded memory. This module is the
compute on top of them, and the checkpoint I/O.

An adapter's gradients and optimizer state are touched by its own operations only; gradients
accumulate across forward_backward calls (and across the passes of one call) until that adapter's
optim_step, as in Tinker. The base model may be on any device and in float32 or bfloat16; LoRA
weights, optimizer state, logprobs and losses are float32 whatever the model's dtype.

Not thread-safe: the engine calls it from one compute thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, PreTrainedModel

from schemas.wire import DatumIn
from workers import adapter_files as files
from workers.adapter_versions import AdapterWeights
from workers.custom_loss import CustomLoss, EvalBudget
from workers.lora_pool import ADAM_SLOTS, Adapter, AdapterPool, new_adamw, optimizer_tensors, restore_optimizer
from workers.losses import LossFn
from workers.packing import PackRule, Segment, plan_packs
from workers.passes import (
    Batch,
    activation_cost,
    checkpointed,
    padded_inputs,
    plan_passes,
    target_logprobs,
    tokens_per_pass,
)
from workers.peft_host import AdapterError, PeftHost, Runs
from workers.types import AdamConfig, BaseModelInfo, ForwardBackwardResult, LoraSpec, PoolStatus

__all__ = ["AdapterError", "LoraTrainer", "Segment", "load_base_model", "resolve_device"]

log = logging.getLogger(__name__)

DEFAULT_PASS_MEMORY = 1 << 30  # activations of one pass on a CPU
DEFAULT_LOGIT_ELEMENTS = 1 << 25  # 128 MiB of float32 logits at a time


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: cuda when there is one, bfloat16 on a GPU, else float32."""
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device")
    precision = dtype or ("float32" if where.type == "cpu" else "bfloat16")
    return where, {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def load_base_model(model_dir: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


Around = Callable[[int], AbstractContextManager[None]]


def _tokens_context(tokens: int) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass
class _DatumResult:
    loss: float
    logprobs: np.ndarray
    metrics: dict[str, float]


@dataclass
class _Part:
    """Rows of a pass that share a loss: one adapter's data (of one pass) and how it is scored."""

    data: list[DatumIn]
    loss: LossFn | CustomLoss
    config: dict[str, float]
    budget: EvalBudget | None  # a custom loss's, shared by the call's datums


class _BeforeBackward(Exception):
    """A loss failed before the model's backward began: no gradient was touched."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class LoraTrainer:
    def __init__(
        self,
        base: PreTrainedModel,
        info: BaseModelInfo,
        *,
        pad_token_id: int = 0,
        max_resident: int | None = None,
        host_budget_bytes: int | None = None,
        spill_dir: Path | None = None,
        max_shells: int = 64,
        pass_memory_bytes: int = DEFAULT_PASS_MEMORY,
        max_tokens_per_pass: int | None = None,
        logit_elements: int = DEFAULT_LOGIT_ELEMENTS,
        custom_loss_seconds: float = 60.0,
        packing: PackRule | None = None,
    ) -> None:
        """Pool options: see AdapterPool. `pass_memory_bytes`: the activations one pass may keep;
        a pass that would keep more runs its decoder layers under activation checkpointing.
        `max_tokens_per_pass`: padded tokens in one pass (a longer datum is a pass of its own;
        None: as many as `pass_memory_bytes` holds, checkpointed). `logit_elements`: logits alive
        at once while computing logprobs. `custom_loss_seconds`: wall-clock limit of a custom
        loss in one call. `packing`: when several adapters' calls share one pass (workers/packing.py)."""
        if (max_tokens_per_pass is not None and max_tokens_per_pass < 1) or logit_elements < 1:
            raise ValueError("max_tokens_per_pass and logit_elements must be at least 1")
        self.info = info
        self.pad_token_id = pad_token_id
        self.pass_memory_bytes = pass_memory_bytes
        self._cost = activation_cost(base.config)
        self._layers = _decoder_layers(base)  # None: this architecture cannot be checkpointed here
        self.max_tokens_per_pass = max_tokens_per_pass or tokens_per_pass(
            self._cost, pass_memory_bytes, checkpointing=self._layers is not None
        )
        self.logit_elements = logit_elements
        self.custom_loss_seconds = custom_loss_seconds
        self.packing = packing or PackRule()
        self.host = PeftHost(base)
        self.model: PeftModel = self.host.model
        self.device = next(base.parameters()).device
        self.pool = AdapterPool(
            self.host, max_resident=max_resident, host_budget_bytes=host_budget_bytes, spill_dir=spill_dir,
            max_shells=max_shells,
        )
        self._split_head = self._head_is_last()

    # ----- adapters ----------------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self.pool

    def adapter_spec(self, name: str) -> LoraSpec:
        """Metadata only: neither pages the adapter in nor counts as a use."""
        return self.pool.spec(name)

    def create_adapter(self, name: str, spec: LoraSpec, *, pinned: bool = False) -> None:
        """`pinned`: keep the adapter outside the pool (always resident, not counted); for the
        sampler's cache, whose size the engine bounds itself."""
        self.host.lora_config(spec)  # checks the spec before anything is paged out
        self.pool.create(name, spec, pinned=pinned)

    def remove_adapter(self, name: str) -> None:
        self.pool.remove(name)

    def page_out(self, name: str) -> None:
        """Move a resident tenant adapter out of the model now (e.g. its session ended); it comes
        back, bit-exact, when next used."""
        self.pool.page_out(name)

    def pool_status(self) -> PoolStatus:
        return self.pool.status()

    def _adapter(self, name: str) -> Adapter:
        return self.pool.get(name)

    @contextmanager
    def using(self, name: str | None) -> Iterator[PeftModel]:
        """The model with adapter `name` active (paged in if it was out; None: the bare base model)."""
        if name is None:
            with self.host.disabled() as model:
                yield model
            return
        adapter = self.pool.get(name)
        self.host.activate(name, adapter.params)
        yield self.model

    # ----- compute -----------------------------------------------------------------------------
    def forward_backward(
        self, name: str, data: list[DatumIn], loss: LossFn | CustomLoss, config: dict[str, float],
        forward_only: bool = False,
    ) -> ForwardBackwardResult:
        return self.forward_backward_groups(name, [data], loss, config, forward_only)[0]

    def forward_backward_groups(
        self,
        name: str,
        groups: list[list[DatumIn]],
        loss: LossFn | CustomLoss,
        config: dict[str, float],
        forward_only: bool = False,
    ) -> list[ForwardBackwardResult]:
        """Several requests' data, one result per group: the gradient is that of all groups' losses
        summed, exactly as if the client had sent them as one request, computed in passes of at
        most max_tokens_per_pass tokens."""
        data = [datum for group in groups for datum in group]
        results: list[_DatumResult | None] = [None] * len(data)
        budget = _budget(loss, self.custom_loss_seconds)
        passes = plan_passes([len(d.tokens) for d in data], self.max_tokens_per_pass)
        with self.using(name) as model:
            # A call that fails in a later pass must not leave the earlier passes' gradients behind.
            saved = _gradients(self.pool.get(name)) if len(passes) > 1 and not forward_only else None
            try:
                for indices in passes:
                    part = _Part([data[i] for i in indices], loss, config, budget)
                    for i, result in zip(indices, self._pass(model, [part], forward_only)[0]):
                        results[i] = result
            except BaseException as exc:
                if saved is not None:
                    _restore_gradients(self.pool.get(name), saved)
                if isinstance(exc, _BeforeBackward):
                    raise exc.cause from None
                raise
        return _per_group(groups, results)  # type: ignore[arg-type]

    def forward_backward_packed(
        self, segments: list[Segment], forward_only: bool = False, around: Around = _tokens_context,
    ) -> list[list[ForwardBackwardResult] | Exception]:
        """Several adapters' calls (one segment per adapter), each getting exactly what
        forward_backward_groups would give it alone: the segments the packing rule groups
        (workers/packing.py plan_packs) in one pass of the base model each, every segment's rows
        routed to its own adapter; the others one after another. A segment that fails fails alone.
        `around(tokens)`: a context each run of the model is wrapped in, given its tokens (the
        engine picks torch threads by them)."""
        outcomes: list[list[ForwardBackwardResult] | Exception | None] = [None] * len(segments)
        for group in plan_packs(self, segments):
            if len(group) > 1:
                try:
                    with around(sum(sum(segments[i].rows) for i in group)):
                        done = self._packed([segments[i] for i in group], forward_only)
                    for i, result in zip(group, done):
                        outcomes[i] = result
                    continue
                except _BeforeBackward as exc:  # one segment's loss refused its data: run them apart
                    log.info("packed_pass_split", extra={"segments": len(group), "error": type(exc.cause).__name__})
            for i in group:
                seg = segments[i]
                try:
                    with around(sum(seg.rows)):
                        outcomes[i] = self.forward_backward_groups(seg.name, seg.groups, seg.loss, seg.config,
                                                                   forward_only)
                except Exception as exc:  # noqa: BLE001 - the caller turns it into this segment's failure
                    outcomes[i] = exc
        return outcomes  # type: ignore[return-value]

    def _packed(self, segments: list[Segment], forward_only: bool) -> list[list[ForwardBackwardResult]]:
        # Fetched in turn, each becomes the most recently used: with at most max_resident of them
        # (plan_packs sees to it), paging one in never pages out another.
        adapters = [self.pool.get(seg.name) for seg in segments]
        parts = [_Part([d for g in seg.groups for d in g], seg.loss, seg.config,
                       _budget(seg.loss, self.custom_loss_seconds)) for seg in segments]
        runs = [(seg.name, len(part.data)) for seg, part in zip(segments, parts)]
        with self.host.routed(runs, [adapter.params for adapter in adapters]) as model:
            done = self._pass(model, parts, forward_only, runs)
        return [_per_group(seg.groups, results) for seg, results in zip(segments, done)]

    def _pass(
        self, model: PeftModel, parts: list[_Part], forward_only: bool, runs: Runs | None = None
    ) -> list[list[_DatumResult]]:
        """One pass: the model's forward (and backward) over the parts' data, each part with its
        own loss. The losses run on a detached copy of the logprobs, so their graphs are freed
        before the model's backward runs; every loss is evaluated before that backward starts,
        so a loss that refuses its data leaves no gradient behind (raised as _BeforeBackward)."""
        data = [datum for part in parts for datum in part.data]
        batch = Batch.build(data, {}, self.pad_token_id, self.device)
        width = max(batch.lengths)
        layers = self._layers if not forward_only and len(data) * width * self._cost.full > self.pass_memory_bytes else None
        with torch.set_grad_enabled(not forward_only), checkpointed(layers or ()):
            lp = self._target_logprobs(model, batch, runs=runs)
            leaf = lp.detach().requires_grad_(not forward_only)
            scored, start = [], 0
            for part in parts:
                rows = slice(start, start + len(part.data))
                start = rows.stop
                try:
                    scored.append(_part_losses(part, leaf[rows], batch.mask[rows], width, forward_only))
                except Exception as exc:
                    raise _BeforeBackward(exc) from exc
        if not forward_only and leaf.grad is not None:
            lp.backward(leaf.grad)
        logprobs = lp.detach().cpu().numpy()
        out, start = [], 0
        for values, metrics in scored:
            out.append([_DatumResult(float(values[j]), logprobs[start + j, : batch.lengths[start + j]].copy(), metrics[j])
                        for j in range(len(values))])
            start += len(values)
        return out

    def _target_logprobs(
        self, model: PeftModel, batch: Batch, temperature: float = 1.0, runs: Runs | None = None
    ) -> torch.Tensor:
        """log p(target) at every position, [B, T] float32, in bounded memory (workers/passes.py),
        from the logits divided by `temperature` (the native Twinkle API's forward kwarg).
        `runs`: the adapters of the rows, in a packed pass (the model is then PeftHost.routed)."""
        if self._split_head:
            lm = self.host.causal_lm
            hidden = lm.get_decoder()(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
            head = lm.get_output_embeddings()
            if not isinstance(head, BaseTunerLayer):  # no adapter trains the head: nothing to route
                runs = None
            if temperature != 1.0:
                out = head
                head = lambda h, **routes: out(h, **routes) / temperature  # noqa: E731
            return target_logprobs(hidden, batch.targets, head, self.info.vocab_size, self.logit_elements, runs)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        if temperature != 1.0:
            logits = logits / temperature
        return target_logprobs(logits, batch.targets, _identity, logits.shape[-1], self.logit_elements)

    def target_logprobs(self, model: PeftModel, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        """`_target_logprobs` for callers of their own passes (workers/native_training.py)."""
        return self._target_logprobs(model, batch, temperature)

    def _head_is_last(self) -> bool:
        """Whether the model's logits are its output embedding applied to its decoder's last hidden
        state (nothing after it, such as logit soft-capping or scaling): only then may the head run
        in chunks. Checked once on a few tokens."""
        lm = self.host.causal_lm
        ids = torch.arange(1, 5, device=self.device).unsqueeze(0) % max(self.info.vocab_size, 1)
        try:
            with torch.no_grad(), self.host.disabled():
                full = lm(input_ids=ids, use_cache=False).logits.float()
                split = lm.get_output_embeddings()(lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
        except Exception:  # no get_decoder / get_output_embeddings for this architecture
            log.warning("chunked_head_unavailable", extra={"architecture": self.info.architecture})
            return False
        same = full.shape == split.shape and torch.allclose(full, split.float(), rtol=1e-3, atol=1e-3)
        if not same:
            log.warning("chunked_head_unavailable", extra={"architecture": self.info.architecture})
        return same

    def optim_step(self, name: str, adam: AdamConfig) -> dict[str, float]:
        adapter = self.pool.get(name)
        params = list(adapter.params.values())
        if adapter.optimizer is None:
            adapter.optimizer = new_adamw(params, adam.learning_rate)
        for group in adapter.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if adam.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, torch.tensor(grad_norm))
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate}

    # ----- checkpoints ---------------------------------------------------------------------
    def save(self, name: str, dest: Path, *, with_optimizer: bool) -> int:
        adapter = self.pool.get(name)
        # save_embedding_layers=False: with lm_head as a target peft would also save the (frozen,
        # tied) output embedding itself; a checkpoint holds the adapter only.
        state = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
        with files.atomic_dir(dest) as tmp:
            files.save_tensors(tmp / files.WEIGHTS_FILE, state)
            self.model.peft_config[name].save_pretrained(str(tmp))
            if with_optimizer:  # empty before the first step: loading it then starts Adam afresh, as it was
                files.save_tensors(tmp / files.OPTIMIZER_FILE, optimizer_tensors(adapter))
            files.write_meta(tmp, base_model=self.info.name, spec=adapter.spec, has_optimizer=with_optimizer)
        return files.folder_size(dest)

    def load(self, name: str, src: Path, *, with_optimizer: bool, pinned: bool = False) -> LoraSpec:
        """Load a checkpoint into adapter `name`, creating it (with the checkpoint's LoRA spec) if
        needed; `pinned` as in create_adapter, for a new adapter. Without `with_optimizer` the
        optimizer starts fresh. A load that fails changes nothing: the checkpoint is read and
        checked in full before the adapter is touched."""
        meta = files.read_meta(src)
        spec = LoraSpec(**meta["lora"])
        if meta["base_model"] != self.info.name:
            raise AdapterError(
                f"checkpoint was trained on base model {meta['base_model']!r}, this server serves {self.info.name!r}"
            )
        # The init seed is irrelevant once weights are loaded: only the LoRA's shape must match.
        existing = self.adapter_spec(name) if self.has_adapter(name) else None
        if existing is not None and replace(existing, seed=spec.seed) != spec:
            raise AdapterError(f"checkpoint has LoRA {spec} but the model was created with {existing}")
        if with_optimizer and not meta["has_optimizer"]:
            raise AdapterError("checkpoint holds no optimizer state; load it without the optimizer")
        weights = files.load_tensors(src / files.WEIGHTS_FILE)
        opt_tensors = files.load_tensors(src / files.OPTIMIZER_FILE) if with_optimizer else None
        created = existing is None
        if created:
            self.create_adapter(name, spec, pinned=pinned)
        try:
            adapter = self.pool.get(name)
            _check_tensors(weights, adapter.params, opt_tensors)
            self._load_weights(name, weights)
        except BaseException:
            if created:
                self.remove_adapter(name)
            raise
        for param in adapter.params.values():
            param.grad = None
        adapter.optimizer = None
        if opt_tensors is not None:
            restore_optimizer(adapter, opt_tensors)
        return spec

    # ----- in-memory versions (the checkpoint engine) -----------------------------------------
    def snapshot(self, name: str) -> AdapterWeights:
        """The adapter's weights as they are now, copied to the host: an immutable version that
        further training never changes. (The pool's parameters are keyed like peft's state dict.)"""
        adapter = self.pool.get(name)
        tensors = {key: param.detach().to("cpu", copy=True) for key, param in adapter.params.items()}
        config = self.model.peft_config[name].to_dict()
        # What peft's save_pretrained writes: sets as lists.
        config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
        return AdapterWeights(adapter.spec, tensors, config)

    def step_of(self, name: str) -> int:
        """How many optimizer steps the adapter's optimizer has taken (0 before the first)."""
        optimizer = self.pool.get(name).optimizer
        for state in (optimizer.state.values() if optimizer is not None else ()):
            if "step" in state:
                return int(state["step"])
        return 0

    def load_version(self, name: str, weights: AdapterWeights) -> None:
        """Pinned adapter `name` holding a version's weights (a sampler's copy): made if needed,
        else overwritten in place (a sampler reuses an evicted version's adapter: copying weights
        is far cheaper than peft adding layers)."""
        created = not self.has_adapter(name)
        if not created and replace(self.adapter_spec(name), seed=weights.spec.seed) != weights.spec:
            raise AdapterError(f"adapter {name} has LoRA {self.adapter_spec(name)}, the version has {weights.spec}")
        if created:
            self.create_adapter(name, weights.spec, pinned=True)
        params = self.pool.get(name).params
        try:
            _check_tensors(weights.tensors, params, None)
        except BaseException:
            if created:
                self.remove_adapter(name)
            raise
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(weights.tensors[key])

    def _load_weights(self, name: str, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise AdapterError(f"checkpoint has unexpected tensors: {unexpected[:3]}")


def _check_tensors(
    weights: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    opt: dict[str, torch.Tensor] | None,
) -> None:
    """Checkpoint tensors must match the adapter's parameters in names and shapes."""
    if set(weights) != set(params):
        raise AdapterError("checkpoint tensors do not match the adapter's layers")
    for key, param in params.items():
        if weights[key].shape != param.shape:
            raise AdapterError(
                f"checkpoint tensor {key} has shape {tuple(weights[key].shape)}, expected {tuple(param.shape)}"
            )
    if opt is None:
        return
    saved = [key for key in params if f"step/{key}" in opt]
    expected = {f"{slot}/{key}" for key in saved for slot in ADAM_SLOTS}
    if set(opt) != expected or any(
        opt[f"{slot}/{key}"].shape != params[key].shape for key in saved for slot in ("exp_avg", "exp_avg_sq")
    ):
        raise files.CheckpointFormatError("optimizer state does not match the adapter's layers")



def _decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module] | None:
    try:
        layers = model.get_decoder().layers
    except (AttributeError, ValueError):
        return None
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _gradients(adapter: Adapter) -> dict[str, torch.Tensor | None]:
    return {key: None if p.grad is None else p.grad.clone() for key, p in adapter.params.items()}


def _restore_gradients(adapter: Adapter, saved: dict[str, torch.Tensor | None]) -> None:
    for key, param in adapter.params.items():
        param.grad = saved[key]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _float_inputs(loss: LossFn) -> dict[str, float]:
    names = {k: 0.0 for k in loss.required_inputs if k != "target_tokens"}
    return {**names, **loss.optional_inputs}


def _budget(loss: LossFn | CustomLoss, seconds: float) -> EvalBudget | None:
    return EvalBudget.per_call(seconds) if isinstance(loss, CustomLoss) else None


def _part_losses(
    part: _Part, lp: torch.Tensor, mask: torch.Tensor, width: int, forward_only: bool
) -> tuple[list[float], list[dict[str, float]]]:
    """Per datum of the part, its loss and metrics; unless `forward_only`, the loss's gradient is
    accumulated into `lp` (a view of the pass's detached logprobs)."""
    loss = part.loss
    if isinstance(loss, CustomLoss):
        lengths = [len(d.tokens) for d in part.data]
        return _custom_losses(loss, lp, lengths, part.data, part.budget, backward=not forward_only)
    inputs = padded_inputs(part.data, _float_inputs(loss), width, lp.device)
    per_datum = loss.body(lp, inputs, mask, {**loss.config_defaults, **part.config})
    if not forward_only and per_datum.requires_grad:
        per_datum.sum().backward()
    return per_datum.detach().cpu().tolist(), _sampler_gaps(lp.detach(), inputs, mask, loss)


def _per_group(groups: list[list[DatumIn]], results: list[_DatumResult]) -> list[ForwardBackwardResult]:
    out, start = [], 0
    for group in groups:
        out.append(_group_result(results[start : start + len(group)]))
        start += len(group)
    return out


def _custom_losses(
    loss: CustomLoss, lp: torch.Tensor, lengths: list[int], data: list[DatumIn], budget: EvalBudget | None,
    *, backward: bool,
) -> tuple[list[float], list[dict[str, float]]]:
    """A custom loss runs per datum on the unpadded logprobs and the inputs as the client sent
    them (dtype and shape kept). Each datum's graph is differentiated and freed before the next
    one runs, so at most one datum's intermediates are alive."""
    values, metrics = [], []
    for j, n in enumerate(lengths):
        given = data[j].loss_fn_inputs  # one that is missing is named by evaluate
        inputs = {k: torch.from_numpy(np.asarray(given[k])) for k in loss.input_names if k in given}
        value, datum_metrics = loss.evaluate(lp[j, :n], inputs, budget)
        if backward and value.requires_grad:
            value.backward()
        values.append(float(value.detach()))
        metrics.append({k: float(v) for k, v in datum_metrics.items()})
    return values, metrics


def _sampler_gaps(lp: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor, loss: LossFn
                  ) -> list[dict[str, float]]:
    """Per datum, for the losses that take the sampler's logprobs: the mean absolute difference
    between them and this forward's logprobs over the sampled tokens (those whose sampler logprob
    is not 0: prompt positions carry 0). Near 0 when sampler and trainer agree on the weights."""
    if "logprobs" not in loss.required_inputs:
        return [{} for _ in range(lp.shape[0])]
    sampler = inputs["logprobs"]
    sampled = (sampler != 0) & (mask > 0) & torch.isfinite(sampler)
    gap = torch.where(sampled, (lp - sampler).abs(), torch.zeros_like(lp))
    means = (gap.sum(dim=-1) / sampled.sum(dim=-1).clamp(min=1)).cpu().tolist()
    return [{"sampler_logprob_gap:mean": float(m)} for m in means]


def _group_result(results: list[_DatumResult]) -> ForwardBackwardResult:
    """One request's result. loss:sum is a float64 sum of the float32 per-datum losses: when the
    SDK splits a call into chunks it adds the chunks' sums, which then match the unsplit call.
    Custom metrics follow the SDK's reduction: `:sum` summed, `:mean` averaged over datums."""
    metrics: dict[str, float] = {"loss:sum": float(np.sum([r.loss for r in results], dtype=np.float64))}
    for key in results[0].metrics if results else ():
        total = float(np.sum([r.metrics[key] for r in results], dtype=np.float64))
        metrics[key] = total / len(results) if key.endswith(":mean") else total
    return ForwardBackwardResult(outputs=[{"logprobs": r.logprobs} for r in results], metrics=metrics)
