"""The base model with its peft LoRA adapters: adding and deleting adapters, and switching the
active one in O(layers).

Only the active adapter takes part in a forward pass. The model stays in eval mode (LoRA dropout
is 0 and the base has no dropout in use), which keeps a forward pass bit-identical whether it
serves training or sampling. Not thread-safe: one compute thread uses it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from workers.types import LoraSpec

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# peft keeps one always-present adapter so that "no adapter" (base-model sampling) is expressible
# by disabling the LoRA layers even when every tenant adapter has been removed. It is never trained.
IDLE_ADAPTER = "idle"

Params = dict[str, torch.nn.Parameter]  # peft state-dict key -> parameter
Runs = list[tuple[str, int]]  # (adapter, how many consecutive rows it takes), in row order


class AdapterError(ValueError):
    """A request that cannot be applied to this adapter (user error)."""


class PeftHost:
    """A PeftModel over `base` and the peft side of its adapters."""

    def __init__(self, base: PreTrainedModel) -> None:
        self._module_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        idle = LoraConfig(r=1, lora_alpha=1, target_modules=[self.targets(LoraSpec(1, 0))[0]])
        with quiet_peft():
            self.model: PeftModel = get_peft_model(base, idle, adapter_name=IDLE_ADAPTER)
        self.model.eval()
        self._layers: list[BaseTunerLayer] | None = None  # the model's LoRA layers; None: to be listed

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers model inside peft's wrappers (its LoRA layers included)."""
        return self.model.base_model.model

    def targets(self, spec: LoraSpec) -> list[str]:
        wanted = (
            (ATTN_MODULES if spec.train_attn else ())
            + (MLP_MODULES if spec.train_mlp else ())
            + (UNEMBED_MODULES if spec.train_unembed else ())
        )
        targets = [m for m in wanted if m in self._module_names]
        if not targets:
            raise AdapterError("LoRA config selects no layers: enable train_attn, train_mlp or train_unembed")
        return targets

    def lora_config(self, spec: LoraSpec) -> LoraConfig:
        """The peft config of a spec; raises AdapterError for a spec that selects nothing."""
        return LoraConfig(
            r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=self.targets(spec), bias="none"
        )

    def add(self, name: str, spec: LoraSpec) -> Params:
        """Inject adapter `name`'s LoRA modules; returns its parameters."""
        config = self.lora_config(spec)
        # peft initialises LoRA A from the global RNG: seed a private fork so the init depends
        # on the spec's seed only and nobody else's random state is disturbed.
        with torch.random.fork_rng(devices=[]), quiet_peft():
            torch.manual_seed(spec.seed)
            self.model.add_adapter(name, config)
        self.model.eval()
        self._layers = None  # a new target module type adds LoRA layers
        return self.params(name)

    def delete(self, name: str) -> None:
        self.activate(IDLE_ADAPTER)  # deleting the active adapter makes peft warn
        self.model.delete_adapter(name)
        self._layers = None

    def params(self, name: str) -> Params:
        marker = f".{name}."
        return {
            param_name.replace(marker, "."): param
            for param_name, param in self.model.named_parameters()
            if marker in param_name and ".lora_" in param_name
        }

    def activate(self, name: str, params: Params | None = None) -> None:
        """peft's set_adapter in O(layers). peft's also sets requires_grad on every adapter of every
        layer, O(layers × adapters): 300 ms a switch with 64 adapters on SmolLM2. An inactive adapter
        takes no part in a forward pass, so its flags don't matter; the active one's (`params`) must
        be on."""
        for layer in self._lora_layers():
            layer._active_adapter = [name]
        self.model.active_adapter = self.model.base_model.active_adapter = name
        for param in (params or {}).values():
            param.requires_grad_(True)

    @contextmanager
    def disabled(self) -> Iterator[PeftModel]:
        """The bare base model: peft's disable_adapter(), but O(layers) for the reason in activate."""
        layers = self._lora_layers()
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield self.model
        finally:
            for layer in layers:
                layer._disable_adapters = False

    @contextmanager
    def routed(self, runs: Runs, params: list[Params]) -> Iterator[PeftModel]:
        """The model with each row of a batch going through its own adapter: `runs` says which
        adapter takes how many consecutive rows, and every LoRA layer adds each adapter's delta to
        its own rows only (ranks and target modules may differ). A backward that recomputes
        checkpointed layers must run inside too: the recomputation routes again. `params`: the
        adapters' parameters, which must take gradients. (peft's own mixed-adapter batches,
        `adapter_names`, gather and scatter every adapter's rows by index: their backward costs
        a full-size tensor per adapter and layer, twice the pass here with 8 adapters.)"""
        for adapter in params:
            for param in adapter.values():
                param.requires_grad_(True)
        layers = self._lora_layers()
        # Every target this host makes (workers/peft_host.py targets) is a linear layer.
        assert all(isinstance(layer, LoraLinear) for layer in layers), "only LoRA linear layers can be routed"
        for layer in layers:
            layer.forward = functools.partial(_routed_forward, layer, runs)
        try:
            yield self.model
        finally:
            for layer in layers:
                del layer.forward  # back to the class's

    def _lora_layers(self) -> list[BaseTunerLayer]:
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers


def _routed_forward(layer: LoraLinear, runs: Runs, x: torch.Tensor, *args: object, routes: Runs | None = None,
                    **kwargs: object) -> torch.Tensor:
    """A LoRA linear layer over rows of several adapters: the base layer once, then each adapter
    on its own consecutive rows (split and concatenated: views forward, one copy backward).
    `routes`: instead of the pass's runs, for a caller that feeds the layer rows of its own (the
    chunked head: runs of flattened states)."""
    result = layer.base_layer(x, *args, **kwargs)
    runs = routes or runs
    delta = _grouped_delta(layer, runs, x)
    if delta is None:
        deltas = []
        for (name, _), rows in zip(runs, x.split([n for _, n in runs])):
            if name in layer.lora_A:
                lora_a = layer.lora_A[name]
                deltas.append(layer.lora_B[name](lora_a(rows.to(lora_a.weight.dtype))) * layer.scaling[name])
            else:  # this adapter has no LoRA on this layer
                deltas.append(torch.zeros((*rows.shape[:-1], result.shape[-1]), dtype=result.dtype,
                                          device=result.device))
        delta = torch.cat(deltas)
    return result + delta.to(result.dtype)


def _grouped_delta(layer: LoraLinear, runs: Runs, x: torch.Tensor) -> torch.Tensor | None:
    """Every adapter's delta in two batched products, when the adapters all have this layer, one
    rank and as many rows each (e.g. tenants stepping the same batch shape); None otherwise. Two
    products per adapter and layer, forward and backward, made a packed pass of eight 16-token
    segments cost 45-60% more than the same rows on one adapter (49-51 against 31-34 ms); with the
    batched ones, 17-20% (35-40 ms; bench/packing.py, docs/packing.md)."""
    if len(runs) < 2 or len({n for _, n in runs}) != 1 or any(name not in layer.lora_A for name, _ in runs):
        return None
    a = [layer.lora_A[name].weight for name, _ in runs]  # [rank, in] each
    if len({w.shape for w in a}) != 1:
        return None
    k = len(runs)
    stacked_a = torch.stack(a)  # [k, rank, in]
    stacked_b = torch.stack([layer.lora_B[name].weight for name, _ in runs])  # [k, out, rank]
    scale = torch.tensor([layer.scaling[name] for name, _ in runs], dtype=stacked_a.dtype, device=stacked_a.device)
    rows = x.to(stacked_a.dtype).reshape(k, -1, x.shape[-1])  # each adapter's consecutive rows
    delta = torch.bmm(torch.bmm(rows, stacked_a.transpose(1, 2)), stacked_b.transpose(1, 2)) * scale.view(k, 1, 1)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


@contextmanager
def quiet_peft() -> Iterator[None]:
    # peft warns that lm_head is tied to the embeddings; the LoRA delta applies to the output
    # projection only, which is what Tinker's train_unembed means.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
        yield
