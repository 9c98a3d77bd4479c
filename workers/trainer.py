"""One base model, many LoRA adapters: forward/backward, AdamW steps and checkpoints per adapter.

Adapters are peft adapters on one shared PeftModel. Only the active adapter takes part in a forward
pass, so an adapter's gradients and optimizer state are touched by its own operations only;
gradients accumulate across forward_backward calls until that adapter's optim_step, as in Tinker.
The model stays in eval mode (LoRA dropout is 0 and the base has no dropout in use), which keeps
a forward pass bit-identical whether it serves training or sampling.

Not thread-safe: the engine calls it from one compute thread.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel

from schemas.wire import DatumIn
from workers import adapter_files as files
from workers.custom_loss import CustomLoss
from workers.losses import LossFn
from workers.types import AdamConfig, BaseModelInfo, ForwardBackwardResult, LoraSpec

log = logging.getLogger(__name__)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# peft keeps one always-present adapter so that "no adapter" (base-model sampling) is expressible
# with disable_adapter() even when every tenant adapter has been removed. It is never trained.
_IDLE_ADAPTER = "idle"


class AdapterError(ValueError):
    """A request that cannot be applied to this adapter (user error)."""


@dataclass
class _Adapter:
    spec: LoraSpec
    params: dict[str, torch.nn.Parameter]  # peft state-dict key -> parameter
    optimizer: torch.optim.AdamW | None = None


def load_base_model(model_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


class LoraTrainer:
    def __init__(self, base: PreTrainedModel, info: BaseModelInfo, *, pad_token_id: int = 0) -> None:
        self.info = info
        self.pad_token_id = pad_token_id
        self._module_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        idle = LoraConfig(r=1, lora_alpha=1, target_modules=[self._targets(LoraSpec(1, 0))[0]])
        with _quiet_peft():
            self.model: PeftModel = get_peft_model(base, idle, adapter_name=_IDLE_ADAPTER)
        self.model.eval()
        self._adapters: dict[str, _Adapter] = {}

    # ----- adapter lifecycle -------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    def adapter_spec(self, name: str) -> LoraSpec:
        return self._adapter(name).spec

    def create_adapter(self, name: str, spec: LoraSpec) -> None:
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} already exists")
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=self._targets(spec),
            bias="none",
        )
        # peft initialises LoRA A from the global RNG: seed a private fork so the init depends
        # on the spec's seed only and nobody else's random state is disturbed.
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(spec.seed)
            self.model.add_adapter(name, config)
        self.model.eval()
        self._adapters[name] = _Adapter(spec=spec, params=self._collect_params(name))

    def remove_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            self.model.set_adapter(_IDLE_ADAPTER)  # deleting the active adapter makes peft warn
            self.model.delete_adapter(name)

    def _targets(self, spec: LoraSpec) -> list[str]:
        wanted = (
            (ATTN_MODULES if spec.train_attn else ())
            + (MLP_MODULES if spec.train_mlp else ())
            + (UNEMBED_MODULES if spec.train_unembed else ())
        )
        targets = [m for m in wanted if m in self._module_names]
        if not targets:
            raise AdapterError("LoRA config selects no layers: enable train_attn, train_mlp or train_unembed")
        return targets

    def _collect_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        marker = f".{name}."
        return {
            param_name.replace(marker, "."): param
            for param_name, param in self.model.named_parameters()
            if marker in param_name and ".lora_" in param_name
        }

    def _adapter(self, name: str) -> _Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not loaded") from None

    @contextmanager
    def using(self, name: str | None) -> Iterator[PeftModel]:
        """The model with adapter `name` active (None: the bare base model)."""
        if name is None:
            with self.model.disable_adapter():
                yield self.model
            return
        self._adapter(name)
        self.model.set_adapter(name)
        yield self.model

    # ----- compute -------------------------------------------------------------------------
    def forward_backward(
        self,
        name: str,
        data: list[DatumIn],
        loss: LossFn,
        config: dict[str, float],
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
        """Several requests' data in one pass, with one result per group: the gradient is that of
        all groups' losses summed, exactly as if the client had sent them as one request."""
        data = [datum for group in groups for datum in group]
        float_inputs = _float_inputs(loss) if isinstance(loss, LossFn) else {}
        batch = _Batch.build(data, float_inputs, self.pad_token_id)
        bounds = [int(b) for b in np.cumsum([0, *(len(g) for g in groups)])]
        spans = list(zip(bounds[:-1], bounds[1:]))
        with self.using(name) as model, torch.set_grad_enabled(not forward_only):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            target_lp = logprobs.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
            if isinstance(loss, CustomLoss):
                losses = [_custom_group(loss, target_lp, batch.lengths, data, a, b) for a, b in spans]
            else:
                per_datum = loss.body(target_lp, batch.inputs, batch.mask, {**loss.config_defaults, **config})
                # Reported as a float64 sum of the float32 per-datum losses: when the SDK splits a
                # call into chunks it adds the chunks' sums, which then match the unsplit call.
                losses = [(per_datum[a:b].sum(), {"loss:sum": float(per_datum[a:b].detach().double().sum())})
                          for a, b in spans]
            total = torch.stack([group_loss for group_loss, _ in losses]).sum()
            if not forward_only and total.requires_grad:
                total.backward()
        lp = target_lp.detach().numpy()
        outputs = [{"logprobs": lp[i, :n].copy()} for i, n in enumerate(batch.lengths)]
        return [
            ForwardBackwardResult(outputs=outputs[a:b], metrics={"loss:sum": float(group_loss.detach()), **metrics})
            for (a, b), (group_loss, metrics) in zip(spans, losses)
        ]

    def optim_step(self, name: str, adam: AdamConfig) -> dict[str, float]:
        adapter = self._adapter(name)
        params = list(adapter.params.values())
        if adapter.optimizer is None:
            adapter.optimizer = torch.optim.AdamW(params, lr=adam.learning_rate)
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
        adapter = self._adapter(name)
        # save_embedding_layers=False: with lm_head as a target peft would also save the (frozen,
        # tied) output embedding itself; a checkpoint holds the adapter only.
        state = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
        with files.atomic_dir(dest) as tmp:
            files.save_tensors(tmp / files.WEIGHTS_FILE, state)
            self.model.peft_config[name].save_pretrained(str(tmp))
            if with_optimizer:  # empty before the first step: loading it then starts Adam afresh, as it was
                files.save_tensors(tmp / files.OPTIMIZER_FILE, self._optimizer_tensors(adapter))
            files.write_meta(tmp, base_model=self.info.name, spec=adapter.spec, has_optimizer=with_optimizer)
        return files.folder_size(dest)

    def load(self, name: str, src: Path, *, with_optimizer: bool) -> LoraSpec:
        """Load a checkpoint into adapter `name`, creating it (with the checkpoint's LoRA spec) if
        needed. Without `with_optimizer` the optimizer starts fresh. A load that fails changes
        nothing: the checkpoint is read and checked in full before the adapter is touched."""
        meta = files.read_meta(src)
        spec = LoraSpec(**meta["lora"])
        if meta["base_model"] != self.info.name:
            raise AdapterError(
                f"checkpoint was trained on base model {meta['base_model']!r}, this server serves {self.info.name!r}"
            )
        # The init seed is irrelevant once weights are loaded: only the LoRA's shape must match.
        existing = self._adapters.get(name)
        if existing is not None and replace(existing.spec, seed=spec.seed) != spec:
            raise AdapterError(f"checkpoint has LoRA {spec} but the model was created with {existing.spec}")
        if with_optimizer and not meta["has_optimizer"]:
            raise AdapterError("checkpoint holds no optimizer state; load it without the optimizer")
        weights = files.load_tensors(src / files.WEIGHTS_FILE)
        opt_tensors = files.load_tensors(src / files.OPTIMIZER_FILE) if with_optimizer else None
        created = existing is None
        if created:
            self.create_adapter(name, spec)
        try:
            adapter = self._adapters[name]
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
            self._restore_optimizer(adapter, opt_tensors)
        return spec

    def _load_weights(self, name: str, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise AdapterError(f"checkpoint has unexpected tensors: {unexpected[:3]}")

    def _optimizer_tensors(self, adapter: _Adapter) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if adapter.optimizer is None:
            return out
        for key, param in adapter.params.items():
            state = adapter.optimizer.state.get(param)
            if not state:
                continue
            for slot in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{slot}/{key}"] = torch.as_tensor(state[slot]).reshape(-1) if slot == "step" else state[slot]
        return out

    def _restore_optimizer(self, adapter: _Adapter, tensors: dict[str, torch.Tensor]) -> None:
        adapter.optimizer = torch.optim.AdamW(list(adapter.params.values()), lr=0.0)
        for key, param in adapter.params.items():
            if f"step/{key}" not in tensors:
                continue
            adapter.optimizer.state[param] = {
                "step": tensors[f"step/{key}"].reshape(()).clone(),
                "exp_avg": tensors[f"exp_avg/{key}"].clone(),
                "exp_avg_sq": tensors[f"exp_avg_sq/{key}"].clone(),
            }


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
    expected = {f"{slot}/{key}" for key in saved for slot in ("exp_avg", "exp_avg_sq", "step")}
    if set(opt) != expected or any(
        opt[f"{slot}/{key}"].shape != params[key].shape for key in saved for slot in ("exp_avg", "exp_avg_sq")
    ):
        raise files.CheckpointFormatError("optimizer state does not match the adapter's layers")


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None  # None when every datum has the same length
    targets: torch.Tensor  # [B, T] long
    inputs: dict[str, torch.Tensor]  # per-token float inputs, [B, T], zero padded
    mask: torch.Tensor  # [B, T] float, 1 on real positions
    lengths: list[int]

    @classmethod
    def build(cls, data: list[DatumIn], float_inputs: dict[str, float], pad_token_id: int) -> "_Batch":
        """`float_inputs`: the per-token float inputs to pad, each with the value that fills it for
        a datum that left it out."""
        lengths = [len(d.tokens) for d in data]
        width = max(lengths)
        mask = torch.zeros(len(data), width)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1.0
        inputs = {
            key: _pad(
                [d.loss_fn_inputs.get(key) for d in data], lengths, width, 0, torch.float32,
                missing=fill,
            )
            for key, fill in float_inputs.items()
        }
        return cls(
            input_ids=_pad([d.tokens for d in data], lengths, width, pad_token_id, torch.long),
            attention_mask=None if len(set(lengths)) == 1 else mask.long(),
            targets=_pad([d.loss_fn_inputs["target_tokens"] for d in data], lengths, width, 0, torch.long),
            inputs=inputs,
            mask=mask,
            lengths=lengths,
        )


def _pad(
    rows: list[np.ndarray | None],
    lengths: list[int],
    width: int,
    pad: float,
    dtype: torch.dtype,
    missing: float = 0.0,
) -> torch.Tensor:
    """Right-pad rows to `width`; a missing row (an optional input the client left out) is filled
    with `missing` over its datum's length."""
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row is None:
            out[i, :n] = missing
        else:
            out[i, :n] = torch.from_numpy(np.ascontiguousarray(row).reshape(-1)[:n]).to(dtype)
    return out


def _float_inputs(loss: LossFn) -> dict[str, float]:
    names = {k: 0.0 for k in loss.required_inputs if k != "target_tokens"}
    return {**names, **loss.optional_inputs}


def _custom_group(
    loss: CustomLoss, target_lp: torch.Tensor, lengths: list[int], data: list[DatumIn], a: int, b: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """A custom loss runs per datum on the unpadded logprobs and the inputs as the client sent
    them (dtype and shape kept), reduced over the group as the SDK's own runner does."""
    lps = [target_lp[i, : lengths[i]] for i in range(a, b)]
    inputs = [{k: torch.from_numpy(np.asarray(data[i].loss_fn_inputs[k])) for k in loss.input_names}
              for i in range(a, b)]
    total, metrics = loss.batch(lps, inputs)
    return total, {k: float(v) for k, v in metrics.items()}


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft warns that lm_head is tied to the embeddings; the LoRA delta applies to the output
    # projection only, which is what Tinker's train_unembed means.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
        yield
