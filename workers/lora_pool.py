"""The LoRA pool: which adapters live in the model, and the paged-out state of the others.

With `max_resident`, at most that many tenant (training) adapters are in the model at once. Any
use of an adapter first makes it resident, paging out the least recently used other tenant
adapter when the pool is full. Paging out keeps an adapter's whole training state (LoRA weights,
the gradients accumulated since its last optim_step, the AdamW moments and steps, the LoRA spec)
in host memory, or past `host_budget_bytes` in one safetensors file per adapter under
`spill_dir`; paging in restores it all bit for bit, so a paged run computes exactly what an
unpaged one does. Pinned adapters (the engine's sampling cache) are outside the pool: always
resident, never counted, never paged.

A paged-out adapter leaves a hollow shell behind: its peft modules stay in the model with their
tensors' storage released, so paging it back in is a few tensor copies instead of peft
re-injecting LoRA modules into every target layer (about 93% of a page-in's time on SmolLM2 when
it does). Shells hold no tensor memory and an inactive adapter takes no part in a forward pass;
what they cost is Python module objects (about 1.6 MB each on SmolLM2-135M), so they are capped at
`max_shells` and the least recently paged lose theirs first.

The pool knows nothing of peft: it makes and deletes an adapter's modules through the `Slots`
callbacks it is given (workers/peft_host.py in the trainer). Not thread-safe.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.peft_host import AdapterError, Params
from workers.types import LoraSpec, PoolStatus

SPILL_SUFFIX = ".spill.safetensors"
LOCK_FILE = ".alive"  # locked by the live pool that spills into its folder
ADAM_SLOTS = ("exp_avg", "exp_avg_sq", "step")


class Slots(Protocol):
    """Where adapters live: called to make an adapter's modules (on creation, or on a page-in
    with no shell left) and to delete them (on removal, or when a shell is trimmed)."""

    def add(self, name: str, spec: LoraSpec) -> Params: ...

    def delete(self, name: str) -> None: ...


@dataclass
class Adapter:
    spec: LoraSpec
    params: Params
    optimizer: torch.optim.AdamW | None = None
    pinned: bool = False  # outside the pool: never paged out, not counted in max_resident


@dataclass
class _Paged:
    """A paged-out adapter's whole state, as flat tensors keyed "weight/<key>", "grad/<key>" (only
    the LoRA tensors that had a gradient) and the optimizer's "exp_avg/<key>", "exp_avg_sq/<key>",
    "step/<key>" (see optimizer_tensors): in host memory, or in a spill file."""

    spec: LoraSpec
    has_optimizer: bool  # an AdamW existed (perhaps still without state): it comes back as it was
    tensors: dict[str, torch.Tensor] | None  # None once spilled
    nbytes: int
    path: Path | None = None  # the spill file, once spilled
    shell: Params | None = None  # its hollow peft parameters, while kept


class AdapterPool:
    def __init__(
        self,
        slots: Slots,
        *,
        max_resident: int | None = None,
        host_budget_bytes: int | None = None,
        spill_dir: Path | None = None,
        max_shells: int = 64,
    ) -> None:
        """`max_resident`: tenant adapters kept in the model (None: all). `host_budget_bytes`: the
        paged-out adapters' bytes kept in host memory before the least recently paged ones spill
        to disk under `spill_dir` (None: no limit). `max_shells`: paged-out adapters that keep
        their hollow modules. Each pool spills into a folder of its own under `spill_dir`, locked
        while it lives; folders of pools that are gone are deleted (paged state does not outlive
        its process), those of live ones (another process on the same data dir) are left alone."""
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if max_shells < 0:
            raise ValueError("max_shells must be at least 0")
        if host_budget_bytes is not None and spill_dir is None:
            raise ValueError("host_budget_bytes needs a spill_dir")
        self._slots = slots
        self.max_resident = max_resident
        self.host_budget_bytes = host_budget_bytes
        self.max_shells = max_shells
        self.spill_dir: Path | None = None
        self._spill_lock: int | None = None  # held for the life of the pool
        if spill_dir is not None:
            self.spill_dir, self._spill_lock = _claim_spill_dir(spill_dir)
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()  # resident, least recently used first
        self._paged: OrderedDict[str, _Paged] = OrderedDict()  # paged out, least recently paged first
        self._page_ins = self._page_outs = self._spills = 0

    # ----- membership --------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._adapters or name in self._paged

    def spec(self, name: str) -> LoraSpec:
        """Metadata only: neither pages the adapter in nor counts as a use."""
        state = self._adapters.get(name) or self._paged.get(name)
        if state is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        return state.spec

    def create(self, name: str, spec: LoraSpec, *, pinned: bool = False) -> Adapter:
        if name in self:
            raise AdapterError(f"adapter {name!r} already exists")
        if not pinned:
            self._make_room()
        adapter = self._adapters[name] = Adapter(spec=spec, params=self._slots.add(name, spec), pinned=pinned)
        return adapter

    def remove(self, name: str) -> None:
        paged = self._paged.pop(name, None)
        if paged is not None and paged.path is not None:
            paged.path.unlink(missing_ok=True)
        if self._adapters.pop(name, None) is not None or (paged is not None and paged.shell is not None):
            self._slots.delete(name)

    def get(self, name: str) -> Adapter:
        """Adapter `name`, resident (paged in if it was out) and now the most recently used."""
        if name in self._paged:
            self._page_in(name)
        if name not in self._adapters:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self._adapters.move_to_end(name)
        return self._adapters[name]

    def page_out(self, name: str) -> None:
        """Move a resident tenant adapter out of the model now; no-op if it is out or pinned."""
        if name in self._adapters and not self._adapters[name].pinned:
            self._page_out(name)

    def status(self) -> PoolStatus:
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

    # ----- paging ------------------------------------------------------------------------------
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
        tensors.update({key: t.to("cpu", copy=True) for key, t in optimizer_tensors(adapter).items()})
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
            else:  # the fresh init is overwritten below
                params, added = self._slots.add(name, paged.spec), True
            adapter = Adapter(spec=paged.spec, params=params)
            for key, param in adapter.params.items():
                param.data = tensors[f"weight/{key}"].to(param.device, copy=True)
                grad = tensors.get(f"grad/{key}")
                param.grad = None if grad is None else grad.to(param.device, copy=True)
            if paged.has_optimizer:
                restore_optimizer(adapter, tensors)
        except BaseException:  # the adapter stays paged out, as it was
            if added:
                self._slots.delete(name)
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
        """Delete the modules of the least recently paged adapters beyond `max_shells` shells."""
        shells = [name for name, paged in self._paged.items() if paged.shell is not None]
        for name in shells[: max(0, len(shells) - self.max_shells)]:
            self._slots.delete(name)
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
        path = self.spill_dir / f"{uuid.uuid4().hex}{SPILL_SUFFIX}"
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


def _claim_spill_dir(root: Path) -> tuple[Path, int]:
    """A new spill folder under `root` and the open lock file that marks it alive. Folders whose
    lock nobody holds belong to pools that are gone: removed, with loose files of older versions."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"*{SPILL_SUFFIX}*"):
        stale.unlink()
    for other in root.iterdir():
        if other.is_dir() and (fd := _try_lock(other / LOCK_FILE)) is not None:
            shutil.rmtree(other, ignore_errors=True)
            os.close(fd)
    mine = root / uuid.uuid4().hex
    mine.mkdir()
    fd = _try_lock(mine / LOCK_FILE)
    assert fd is not None, mine
    return mine, fd


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _hollow(params: Params) -> None:
    """Release the parameters' storage (and gradients), keeping the Parameter objects, and with
    them the modules that hold them, in place."""
    for param in params.values():
        param.grad = None
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def optimizer_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The AdamW state as flat tensors keyed "<slot>/<param key>" (empty before the first step)."""
    out: dict[str, torch.Tensor] = {}
    if adapter.optimizer is None:
        return out
    for key, param in adapter.params.items():
        state = adapter.optimizer.state.get(param)
        if not state:
            continue
        for slot in ADAM_SLOTS:
            out[f"{slot}/{key}"] = torch.as_tensor(state[slot]).reshape(-1) if slot == "step" else state[slot]
    return out


def new_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """An adapter's AdamW. foreach: one kernel per step for all the adapter's small tensors
    instead of a Python loop over them (torch picks it only on CUDA by itself): 2.7x faster on a
    CPU for 60 LoRA tensors, with the same results."""
    return torch.optim.AdamW(params, lr=lr, foreach=True)


def restore_optimizer(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> None:
    """AdamW with the given state; the hyperparameters are set by every optim_step. The moments
    go to their parameter's device; `step` stays a host tensor, as AdamW keeps it (not fused or
    capturable)."""
    adapter.optimizer = new_adamw(list(adapter.params.values()), lr=0.0)
    for key, param in adapter.params.items():
        if f"step/{key}" not in tensors:
            continue
        adapter.optimizer.state[param] = {
            "step": tensors[f"step/{key}"].reshape(()).to("cpu", copy=True),
            "exp_avg": tensors[f"exp_avg/{key}"].to(param.device, copy=True),
            "exp_avg_sq": tensors[f"exp_avg_sq/{key}"].to(param.device, copy=True),
        }
