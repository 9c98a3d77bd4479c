"""One base model, many LoRA adapters: forward/backward, AdamW steps and checkpoints per adapter.

Adapters are peft adapters on one shared PeftModel. Only the active adapter takes part in a forward
pass, so an adapter's gradients and optimizer state are touched by its own operations only;
gradients accumulate across forward_backward calls until that adapter's optim_step, as in Tinker.
The model stays in eval mode (LoRA dropout is 0 and the base has no dropout in use), which keeps
a forward pass bit-identical whether it serves training or sampling.

The LoRA pool: with `max_resident`, at most that many tenant (training) adapters are peft adapters
in the model at once. Any operation on an adapter first makes it resident, paging out the least
recently used other tenant adapter when the pool is full. Paging out keeps an adapter's whole
training state (LoRA weights, the gradients accumulated since its last optim_step, the AdamW
moments and steps, the LoRA spec) in host memory, or past `host_budget_bytes` in one safetensors
file per adapter under `spill_dir`; paging in restores it all bit for bit, so a paged run computes
exactly what an unpaged one does. Pinned adapters (the engine's sampling cache) are outside the
pool: always resident, never counted, never paged.

A paged-out adapter leaves a hollow shell behind: its peft modules stay in the model with their
tensors' storage released, so paging it back in is a few tensor copies instead of peft re-injecting
LoRA modules into every target layer (about 93% of a page-in's time on SmolLM2 when it does).
Shells hold no tensor memory and an inactive adapter takes no part in a forward pass; what they
cost is Python module objects (about 1.6 MB each on SmolLM2-135M), so they are capped at `max_shells` and the
least recently paged lose theirs first. (Switching adapters is therefore done here in O(layers):
peft's own set_adapter walks every adapter of every layer.)

Not thread-safe: the engine calls it from one compute thread.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from schemas.wire import DatumIn
from workers import adapter_files as files
from workers.custom_loss import CustomLoss
from workers.losses import LossFn
from workers.types import AdamConfig, BaseModelInfo, ForwardBackwardResult, LoraSpec, PoolStatus

log = logging.getLogger(__name__)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# peft keeps one always-present adapter so that "no adapter" (base-model sampling) is expressible
# by disabling the LoRA layers even when every tenant adapter has been removed. It is never trained.
_IDLE_ADAPTER = "idle"
_SPILL_SUFFIX = ".spill.safetensors"


class AdapterError(ValueError):
    """A request that cannot be applied to this adapter (user error)."""


@dataclass
class _Adapter:
    spec: LoraSpec
    params: dict[str, torch.nn.Parameter]  # peft state-dict key -> parameter
    optimizer: torch.optim.AdamW | None = None
    pinned: bool = False  # outside the pool: never paged out, not counted in max_resident


@dataclass
class _Paged:
    """A paged-out adapter's whole state, as flat tensors keyed "weight/<key>", "grad/<key>" (only
    the LoRA tensors that had a gradient) and the optimizer's "exp_avg/<key>", "exp_avg_sq/<key>",
    "step/<key>" (checkpoint keys, see _optimizer_tensors): in host memory, or in a spill file."""

    spec: LoraSpec
    has_optimizer: bool  # an AdamW existed (perhaps still without state): it comes back as it was
    tensors: dict[str, torch.Tensor] | None  # None once spilled
    nbytes: int
    path: Path | None = None  # the spill file, once spilled
    shell: dict[str, torch.nn.Parameter] | None = None  # its hollow peft parameters, while kept


def _hollow(params: dict[str, torch.nn.Parameter]) -> None:
    """Release the parameters' storage (and gradients), keeping the Parameter objects, and with
    them the peft modules that hold them, in place."""
    for param in params.values():
        param.grad = None
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def load_base_model(model_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


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
    ) -> None:
        """`max_resident`: tenant adapters kept in the model (None: all). `host_budget_bytes`: the
        paged-out adapters' bytes kept in host memory before the least recently paged ones spill
        to `spill_dir` (None: no limit). `max_shells`: paged-out adapters that keep their hollow peft
        modules for a fast page-in. The trainer owns `spill_dir`: spill files left there by
        an earlier process are deleted (paged state does not outlive the process)."""
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if max_shells < 0:
            raise ValueError("max_shells must be at least 0")
        if host_budget_bytes is not None and spill_dir is None:
            raise ValueError("host_budget_bytes needs a spill_dir")
        self.info = info
        self.pad_token_id = pad_token_id
        self.max_resident = max_resident
        self.host_budget_bytes = host_budget_bytes
        self.spill_dir = spill_dir
        self.max_shells = max_shells
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
            for stale in spill_dir.glob(f"*{_SPILL_SUFFIX}*"):
                stale.unlink()
        self._module_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        idle = LoraConfig(r=1, lora_alpha=1, target_modules=[self._targets(LoraSpec(1, 0))[0]])
        with _quiet_peft():
            self.model: PeftModel = get_peft_model(base, idle, adapter_name=_IDLE_ADAPTER)
        self.model.eval()
        self._layers: list[BaseTunerLayer] | None = None  # the model's LoRA layers; None: to be listed
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # resident, least recently used first
        self._paged: OrderedDict[str, _Paged] = OrderedDict()  # paged out, least recently paged first
        self._page_ins = self._page_outs = self._spills = 0

    # ----- adapter lifecycle -------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters or name in self._paged

    def adapter_spec(self, name: str) -> LoraSpec:
        """Metadata only: neither pages the adapter in nor counts as a use."""
        state = self._adapters.get(name) or self._paged.get(name)
        if state is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        return state.spec

    def create_adapter(self, name: str, spec: LoraSpec, *, pinned: bool = False) -> None:
        """`pinned`: keep the adapter outside the pool (always resident, not counted); for the
        sampler's cache, whose size the engine bounds itself."""
        if self.has_adapter(name):
            raise AdapterError(f"adapter {name!r} already exists")
        config = self._lora_config(spec)  # checks the spec before anything is paged out
        if not pinned:
            self._make_room()
        self._add_peft_adapter(name, config, spec.seed)
        self._adapters[name] = _Adapter(spec=spec, params=self._collect_params(name), pinned=pinned)

    def remove_adapter(self, name: str) -> None:
        paged = self._paged.pop(name, None)
        if paged is not None and paged.path is not None:
            paged.path.unlink(missing_ok=True)
        if self._adapters.pop(name, None) is not None or (paged is not None and paged.shell is not None):
            self._delete_peft_adapter(name)

    def page_out(self, name: str) -> None:
        """Move a resident tenant adapter out of the model now (e.g. its session ended); it comes
        back, bit-exact, when next used. No-op for an adapter that is already out."""
        if name in self._adapters and not self._adapters[name].pinned:
            self._page_out(name)

    def pool_status(self) -> PoolStatus:
        paged = self._paged.values()
        return PoolStatus(
            max_resident=self.max_resident,
            resident=tuple(name for name, a in self._adapters.items() if not a.pinned),
            pinned=sum(a.pinned for a in self._adapters.values()),
            paged_in_host=sum(p.tensors is not None for p in paged),
            paged_on_disk=sum(p.tensors is None for p in paged),
            host_bytes=self._host_bytes(),
            page_ins=self._page_ins,
            page_outs=self._page_outs,
            spills=self._spills,
        )

    def _lora_config(self, spec: LoraSpec) -> LoraConfig:
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=0.0,
            target_modules=self._targets(spec),
            bias="none",
        )

    def _add_peft_adapter(self, name: str, config: LoraConfig, seed: int) -> None:
        # peft initialises LoRA A from the global RNG: seed a private fork so the init depends
        # on the spec's seed only and nobody else's random state is disturbed.
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(seed)
            self.model.add_adapter(name, config)
        self.model.eval()
        self._layers = None  # a new target module type adds LoRA layers

    def _delete_peft_adapter(self, name: str) -> None:
        self._activate(_IDLE_ADAPTER)  # deleting the active adapter makes peft warn
        self.model.delete_adapter(name)
        self._layers = None

    def _lora_layers(self) -> list[BaseTunerLayer]:
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def _activate(self, name: str) -> None:
        """peft's set_adapter in O(layers). peft's also sets requires_grad on every adapter of every
        layer, O(layers × adapters): 300 ms a switch with 64 adapters on SmolLM2. An inactive adapter
        takes no part in a forward pass, so its flags don't matter; the active one's must be on."""
        for layer in self._lora_layers():
            layer._active_adapter = [name]
        self.model.active_adapter = self.model.base_model.active_adapter = name
        if name in self._adapters:
            for param in self._adapters[name].params.values():
                param.requires_grad_(True)

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
        """Adapter `name`, resident (paged in if it was out) and now the most recently used."""
        if name in self._paged:
            self._page_in(name)
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self._touch(name)
        return self._adapters[name]

    # ----- the pool --------------------------------------------------------------------------
    def _touch(self, name: str) -> None:
        self._adapters.move_to_end(name)

    def _make_room(self) -> None:
        """Page out least recently used tenant adapters until one more fits."""
        if self.max_resident is None:
            return
        tenants = [name for name, adapter in self._adapters.items() if not adapter.pinned]
        for name in tenants[: max(0, len(tenants) - self.max_resident + 1)]:
            self._page_out(name)

    def _page_out(self, name: str) -> None:
        adapter = self._adapters[name]
        assert not adapter.pinned, name
        tensors = {f"weight/{key}": p.detach().to("cpu", copy=True) for key, p in adapter.params.items()}
        tensors.update(
            {f"grad/{key}": p.grad.to("cpu", copy=True) for key, p in adapter.params.items() if p.grad is not None}
        )
        tensors.update({key: t.to("cpu", copy=True) for key, t in self._optimizer_tensors(adapter).items()})
        _hollow(adapter.params)
        self._paged[name] = _Paged(
            spec=adapter.spec,
            has_optimizer=adapter.optimizer is not None,
            tensors=tensors,
            nbytes=sum(t.nbytes for t in tensors.values()),
            shell=adapter.params,
        )
        del self._adapters[name]
        self._page_outs += 1
        self._trim_shells()
        self._spill_over_budget()

    def _page_in(self, name: str) -> None:
        paged = self._paged.pop(name)  # out of the spill and shell candidates while room is made for it
        added = False
        try:
            tensors = paged.tensors if paged.tensors is not None else self._read_spill(name, paged)
            self._make_room()
            if paged.shell is not None:
                params = paged.shell
            else:
                # The fresh init is overwritten below; the seed only keeps the global RNG out of it.
                self._add_peft_adapter(name, self._lora_config(paged.spec), paged.spec.seed)
                added = True
                params = self._collect_params(name)
            adapter = _Adapter(spec=paged.spec, params=params)
            for key, param in adapter.params.items():
                param.data = tensors[f"weight/{key}"].to(param.device, copy=True)
                grad = tensors.get(f"grad/{key}")
                param.grad = None if grad is None else grad.to(param.device, copy=True)
            if paged.has_optimizer:
                self._restore_optimizer(adapter, tensors)
        except BaseException:  # the adapter stays paged out, as it was
            if added:
                self._delete_peft_adapter(name)
            elif paged.shell is not None:
                _hollow(paged.shell)
            self._paged[name] = paged
            self._paged.move_to_end(name, last=False)
            raise
        self._adapters[name] = adapter
        if paged.path is not None:
            paged.path.unlink(missing_ok=True)
        self._page_ins += 1

    def _trim_shells(self) -> None:
        """Delete the peft modules of the least recently paged adapters beyond `max_shells` shells."""
        shells = [name for name, paged in self._paged.items() if paged.shell is not None]
        for name in shells[: max(0, len(shells) - self.max_shells)]:
            self._delete_peft_adapter(name)
            self._paged[name].shell = None

    def _host_bytes(self) -> int:
        return sum(p.nbytes for p in self._paged.values() if p.tensors is not None)

    def _spill_over_budget(self) -> None:
        """Move the least recently paged adapters from host memory to disk until the rest fit."""
        if self.host_budget_bytes is None:
            return
        for name, paged in self._paged.items():
            if self._host_bytes() <= self.host_budget_bytes:
                return
            if paged.tensors is not None:
                self._spill(name, paged)

    def _spill(self, name: str, paged: _Paged) -> None:
        assert self.spill_dir is not None and paged.tensors is not None
        path = self.spill_dir / f"{uuid.uuid4().hex}{_SPILL_SUFFIX}"
        tmp = path.with_name(path.name + ".tmp")
        meta = {"adapter": name, "lora": json.dumps(asdict(paged.spec)), "has_optimizer": str(paged.has_optimizer)}
        try:
            save_file({k: t.contiguous() for k, t in paged.tensors.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)  # no fsync: the file only has to outlive this process's page-out
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paged.tensors, paged.path = None, path
        self._spills += 1

    def _read_spill(self, name: str, paged: _Paged) -> dict[str, torch.Tensor]:
        assert paged.path is not None
        with safe_open(str(paged.path), framework="pt", device="cpu") as fh:
            if fh.metadata().get("adapter") != name:
                raise RuntimeError(f"spill file {paged.path} does not hold adapter {name!r}")
            return {key: fh.get_tensor(key) for key in fh.keys()}

    @contextmanager
    def using(self, name: str | None) -> Iterator[PeftModel]:
        """The model with adapter `name` active (None: the bare base model)."""
        if name is None:  # peft's disable_adapter(), but O(layers) for the reason given in _activate
            layers = self._lora_layers()
            for layer in layers:
                layer._disable_adapters = True
            try:
                yield self.model
            finally:
                for layer in layers:
                    layer._disable_adapters = False
            return
        self._adapter(name)  # pages it in
        self._activate(name)
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
            adapter = self._adapter(name)
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
        """AdamW with the given state; the hyperparameters are set by every optim_step. The moments
        go to their parameter's device; `step` stays a host tensor, as AdamW keeps it (not fused or
        capturable)."""
        adapter.optimizer = torch.optim.AdamW(list(adapter.params.values()), lr=0.0)
        for key, param in adapter.params.items():
            if f"step/{key}" not in tensors:
                continue
            adapter.optimizer.state[param] = {
                "step": tensors[f"step/{key}"].reshape(()).to("cpu", copy=True),
                "exp_avg": tensors[f"exp_avg/{key}"].to(param.device, copy=True),
                "exp_avg_sq": tensors[f"exp_avg_sq/{key}"].to(param.device, copy=True),
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
