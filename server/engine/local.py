"""The embedded engine: the whole compute plane in this process, on one worker thread.

Every torch call happens on that thread and never on the event loop, so the server keeps answering
(long-polls, heartbeats, submissions) while a step runs. The thread gets the configured number of
torch threads; the rest of the process is kept to one (two processes that both use both cores run
slower than one: docs/cpu-threads.md, "One compute-heavy process gets two threads").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from schemas.wire import ForwardBackwardCall
from server.config import Settings
from server.errors import OperationFailed
from server.kinds import Lane
from workers.adapter_files import encrypt_folder, folder_size
from workers.adapter_versions import AdapterSource, AdapterWeights, SamplerBackend, read_weights
from workers.base_models import resolve_base_model
from workers.custom_loss import CustomLoss, compile_graph
from workers.guard import Failure, failure_of, guarded
from workers.hf_sampler import HfSampler
from workers.losses import LossFn, get_loss
from workers.native_training import NativeTraining
from workers.packing import PackRule, Segment
from workers.peft_host import AdapterError
from workers.storage import CheckpointStore, FolderStore
from workers.trainer import LoraTrainer, load_base_model, resolve_device
from workers.types import (
    AdamConfig,
    BaseModelInfo,
    ComputeOptions,
    CustomLossSpec,
    ForwardBackwardResult,
    LoraSpec,
    ModelCalls,
    PoolStatus,
    SampleJob,
    SampleOutput,
    SampleTarget,
    VersionInfo,
)

log = logging.getLogger(__name__)
CUSTOM_LOSS_CACHE = 256  # compiled custom losses kept per engine
SMALL_PASS_TOKENS = 32  # forward/backward work up to this runs on one torch thread (CPU)
T = TypeVar("T")
Fetch = Callable[[], AdapterWeights]


class LocalEngine:
    # One compute thread: one call at a time in all. The lanes still take turns for it, so a
    # sample waits for the step under way and not for every training tenant's turn.
    lanes: Mapping[Lane, int] = {Lane.TRAINING: 1, Lane.SAMPLING: 1}
    max_calls: int | None = 1

    def __init__(
        self, model_dir: Callable[[], Path], base_model_name: str, options: ComputeOptions, store: CheckpointStore
    ) -> None:
        # A callable, resolved on the compute thread: resolving may convert a GGUF file (tens of
        # seconds), which must not block the event loop.
        self._model_dir = model_dir
        self._name = base_model_name
        self._options = options
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._pool_status: PoolStatus | None = None  # a snapshot, refreshed after every compute call
        self._trainer: LoraTrainer | None = None
        self._on_cpu = True  # set when the base model is placed
        self._tokenizer = None
        self._versions: dict[str, AdapterWeights] = {}  # in-memory versions made here, until released
        self._sampler: SamplerBackend | None = None
        self._native: NativeTraining | None = None  # the native Twinkle API's per-adapter training state
        self._custom_losses: OrderedDict[str, CustomLoss] = OrderedDict()  # least recently used first

    async def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """`fn` on the compute thread; a Failure it ends in is raised here as OperationFailed."""
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self._pool, functools.partial(self._run, fn, *args, **kwargs))
        if isinstance(outcome, Failure):
            raise OperationFailed(outcome.message, outcome.category, outcome.field)
        return outcome

    @classmethod
    def from_settings(cls, settings: Settings, model: str, *, torch_threads: int | None = None) -> LocalEngine:
        """The engine of base model `model` as the settings describe it (`torch_threads`: instead
        of the settings' own, for a process that is not the one compute-heavy process)."""
        data_dir = settings.data_dir.resolve()
        options = ComputeOptions(
            torch_threads=torch_threads or settings.torch_threads,
            device=settings.device,
            dtype=settings.dtype,
            pass_memory_bytes=None if settings.pass_memory_mb is None else settings.pass_memory_mb * 2**20,
            max_tokens_per_pass=settings.max_tokens_per_pass,
            custom_loss_seconds=settings.custom_loss_seconds,
            max_resident_adapters=settings.max_resident_adapters,
            host_budget_bytes=settings.host_adapter_budget_mb * 2**20,
            spill_dir=data_dir / "lora-spill",
            sampler=settings.sampler,
            sampler_cache_versions=settings.sampler_cache_versions,
            max_lora_rank=settings.max_lora_rank,
            packing=settings.packing,
        )
        return cls(
            lambda: resolve_base_model(model, data_dir, allow_download=settings.allow_download), model, options,
            FolderStore(data_dir),
        )

    def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T | Failure:
        """On the compute thread: the call, then a fresh snapshot of the pool for status readers
        (reading the trainer from another thread while it works would not be safe)."""
        try:
            return guarded(fn, *args, **kwargs)
        finally:
            if self._trainer is not None:
                self._pool_status = self._trainer.pool_status()

    def pool_status(self) -> PoolStatus | None:
        return self._pool_status

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self) -> BaseModelInfo:
        # Not through _call: a model that cannot be loaded stops the server with its own message
        # (what was tried, what to install), not as a request's failure.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def start_blocking(self) -> BaseModelInfo:
        """`start` for a caller without an event loop (a Ray Serve replica's constructor)."""
        return self._pool.submit(self._load).result()

    def _load(self) -> BaseModelInfo:
        started = time.perf_counter()
        opts = self._options
        torch.set_num_threads(opts.torch_threads)
        hf_logging.disable_progress_bar()  # the server logs JSON lines; no tqdm bars in them
        device, dtype = resolve_device(opts.device, opts.dtype)
        self._on_cpu = device.type == "cpu"
        model_dir = self._model_dir()
        base = load_base_model(model_dir, device=device, dtype=dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        info = BaseModelInfo(
            name=self._name,
            architecture=type(base).__name__,
            vocab_size=base.config.vocab_size,
            max_context_length=getattr(base.config, "max_position_embeddings", 2048),
            eos_token_ids=_eos_ids(base, self._tokenizer),
        )
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._trainer = LoraTrainer(
            base, info, pad_token_id=pad, max_resident=opts.max_resident_adapters,
            host_budget_bytes=opts.host_budget_bytes, spill_dir=opts.spill_dir,
            pass_memory_bytes=opts.pass_memory_bytes or _pass_memory(device),
            max_tokens_per_pass=opts.max_tokens_per_pass, custom_loss_seconds=opts.custom_loss_seconds,
            packing=PackRule(mode=opts.packing),
        )
        self._sampler = self._make_sampler(model_dir, info, dtype)
        log.info("base_model_loaded", extra={"model": self._name, "device": str(device), "dtype": str(dtype),
                                             "sampler": opts.sampler,
                                             "tokens_per_pass": self._trainer.max_tokens_per_pass,
                                             "seconds": round(time.perf_counter() - started, 2)})
        return info

    def _make_sampler(self, model_dir: Path, info: BaseModelInfo, dtype: torch.dtype) -> SamplerBackend:
        opts = self._options
        if opts.sampler == "vllm":
            from workers.vllm_sampler import VllmSampler  # needs .venv-vllm (make install-vllm)

            return VllmSampler(model_dir, info, dtype=str(dtype).removeprefix("torch."),
                               max_cpu_loras=opts.sampler_cache_versions, max_lora_rank=opts.max_lora_rank)
        return HfSampler(self.trainer, self._decode, opts.sampler_cache_versions)

    async def stop(self) -> None:
        if self._sampler is not None:
            await self._call(self._sampler.close)
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def _samplers(self) -> SamplerBackend:
        assert self._sampler is not None, "engine not started"
        return self._sampler

    @property
    def trainer(self) -> LoraTrainer:
        assert self._trainer is not None, "engine not started"
        return self._trainer

    # ----- training (each method's work runs on the compute thread, trainer access included) -----
    async def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        await self._call(lambda: self.trainer.create_adapter(_adapter_name(model_id), spec))

    async def forward_backward(
        self, model_id: str, calls: list[ForwardBackwardCall], custom: CustomLossSpec | None = None
    ) -> list[ForwardBackwardResult]:
        return await self._call(self._forward_backward, model_id, calls, custom)

    def _forward_backward(
        self, model_id: str, calls: list[ForwardBackwardCall], custom: CustomLossSpec | None
    ) -> list[ForwardBackwardResult]:
        seg = self._segment(ModelCalls(model_id, calls, custom))
        with self._threads_for(sum(seg.rows)):
            return self.trainer.forward_backward_groups(seg.name, seg.groups, seg.loss, seg.config,
                                                        calls[0].forward_only)

    async def forward_backward_packed(self, items: list[ModelCalls]) -> list[list[ForwardBackwardResult] | Failure]:
        return await self._call(self._forward_backward_packed, items)

    def _forward_backward_packed(self, items: list[ModelCalls]) -> list[list[ForwardBackwardResult] | Failure]:
        """Each model's calls as one segment of a packed call (workers/packing.py); a model whose
        calls cannot even be set up (unknown adapter or loss) fails alone."""
        outcomes: list[list[ForwardBackwardResult] | Failure | None] = [None] * len(items)
        segments, where = [], []
        for i, item in enumerate(items):
            seg = guarded(self._segment, item)
            if isinstance(seg, Failure):
                outcomes[i] = seg
            else:
                segments.append(seg)
                where.append(i)
        forward_only = items[0].calls[0].forward_only
        done = self.trainer.forward_backward_packed(segments, forward_only, self._threads_for) if segments else []
        for i, outcome in zip(where, done):
            outcomes[i] = failure_of(outcome, "forward_backward_packed") if isinstance(outcome, Exception) else outcome
        return outcomes  # type: ignore[return-value]

    def _segment(self, item: ModelCalls) -> Segment:
        """A model's calls as the trainer takes them: its adapter, one group per call, the loss."""
        first = item.calls[0]
        if item.custom is not None:
            loss: LossFn | CustomLoss = self._custom_loss(item.custom)
        elif (builtin := get_loss(first.loss_fn)) is not None:
            loss = builtin
        else:
            raise AdapterError(f"unknown loss_fn {first.loss_fn!r}")
        config = {k: float(v) for k, v in first.loss_fn_config.items() if not isinstance(v, str)}
        return Segment(self._require(item.model_id), [call.data for call in item.calls], loss, config)

    @contextmanager
    def _threads_for(self, tokens: int) -> Iterator[None]:
        """One torch thread for a small CPU pass: a second thread's start and sync cost more than it
        saves there, and it takes the core the event loop and the client need (docs/cpu-threads.md,
        "Small passes run on one thread")."""
        if not self._on_cpu or tokens > SMALL_PASS_TOKENS or self._options.torch_threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self._options.torch_threads)

    def _custom_loss(self, spec: CustomLossSpec) -> CustomLoss:
        """Compiled once per loss_id (compiling checks the whole graph; the result is immutable),
        the most recently used CUSTOM_LOSS_CACHE kept: compiling again is cheap, growing is not."""
        if (compiled := self._custom_losses.get(spec.loss_id)) is None:
            inputs = [{"name": name, "rank": rank} for name, rank in spec.inputs]
            compiled = self._custom_losses[spec.loss_id] = compile_graph(spec.graph, inputs, spec.name)
            while len(self._custom_losses) > CUSTOM_LOSS_CACHE:
                self._custom_losses.popitem(last=False)
        self._custom_losses.move_to_end(spec.loss_id)
        return compiled

    async def optim_step(self, model_id: str, adam: AdamConfig) -> dict[str, float]:
        return await self._call(self._optim_step, model_id, adam)

    async def optim_steps(self, steps: list[tuple[str, AdamConfig]]) -> list[dict[str, float] | Failure]:
        return await self._call(self._optim_steps, steps)

    def _optim_steps(self, steps: list[tuple[str, AdamConfig]]) -> list[dict[str, float] | Failure]:
        return [guarded(self._optim_step, model_id, adam) for model_id, adam in steps]

    def _optim_step(self, model_id: str, adam: AdamConfig) -> dict[str, float]:
        return self.trainer.optim_step(self._require(model_id), adam)

    async def save(self, model_id: str, ref: str, *, with_optimizer: bool, encrypt_to: list[str] | None = None) -> int:
        return await self._call(self._save, model_id, ref, with_optimizer, encrypt_to)

    def _save(self, model_id: str, ref: str, with_optimizer: bool, encrypt_to: list[str] | None) -> int:
        folder = self._store.local_path(ref)
        name = self._require(model_id)
        size = self.trainer.save(name, folder, with_optimizer=with_optimizer)
        # A native adapter's optimizer, scheduler and counters (workers/native_training.py).
        if with_optimizer and self._native_training.write_state(name, folder):
            size = folder_size(folder)
        if encrypt_to:
            try:
                size = encrypt_folder(folder, encrypt_to)
            except BaseException:  # no plaintext of a checkpoint meant to be encrypted may stay behind
                shutil.rmtree(folder, ignore_errors=True)
                raise
        self._store.publish(ref)
        return size

    async def load(self, model_id: str, ref: str, *, with_optimizer: bool) -> LoraSpec:
        return await self._call(self._load_checkpoint, model_id, ref, with_optimizer)

    def _load_checkpoint(self, model_id: str, ref: str, with_optimizer: bool) -> LoraSpec:
        name, folder = _adapter_name(model_id), self._store.local_path(ref)
        spec = self.trainer.load(name, folder, with_optimizer=with_optimizer)
        if with_optimizer:
            self._native_training.read_state(name, folder)
        return spec

    async def unload(self, model_id: str) -> None:
        await self._call(self._unload, model_id)

    def _unload(self, model_id: str) -> None:
        self.trainer.remove_adapter(_adapter_name(model_id))
        self._native_training.forget(_adapter_name(model_id))

    async def native(self, model_id: str, op: str, kwargs: dict[str, Any]) -> Any:
        return await self._call(lambda: self._native_training.call(self._require(model_id), op, kwargs))

    @property
    def _native_training(self) -> NativeTraining:
        if self._native is None:
            self._native = NativeTraining(self.trainer)
        return self._native

    async def page_out(self, model_id: str) -> None:
        await self._call(lambda: self.trainer.page_out(_adapter_name(model_id)))

    def _require(self, model_id: str) -> str:
        name = _adapter_name(model_id)
        if not self.trainer.has_adapter(name):
            raise AdapterError(
                f"model {model_id} has no weights in memory (it was unloaded, or the server restarted since it "
                "was created); create a new training client from one of its checkpoints"
            )
        return name

    # ----- adapter versions and sampling -------------------------------------------------------
    async def snapshot(self, model_id: str, key: str) -> VersionInfo:
        return await self._call(self._snapshot, model_id, key)

    def _snapshot(self, model_id: str, key: str) -> VersionInfo:
        weights, info = self._capture(model_id)
        self._versions[key] = weights
        return info

    async def capture(self, model_id: str) -> tuple[AdapterWeights, VersionInfo]:
        """The model's adapter weights now, as a new immutable version, not kept here (a Ray
        trainer replica hands them to the object store)."""
        return await self._call(self._capture, model_id)

    def _capture(self, model_id: str) -> tuple[AdapterWeights, VersionInfo]:
        name = self._require(model_id)
        weights = self.trainer.snapshot(name)
        return weights, VersionInfo(nbytes=weights.nbytes, step=self.trainer.step_of(name))

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=False)

    async def release(self, key: str) -> None:
        await self._call(self._release, key)

    def _release(self, key: str) -> None:
        self._versions.pop(key, None)
        self._samplers.forget(key)

    async def sample_batch(
        self, target: SampleTarget | None, jobs: list[SampleJob], fetch: Fetch | None = None
    ) -> list[SampleOutput]:
        """`fetch`: where a sampler replica gets an in-memory version it does not hold (the Ray
        object store); called only when the version is not cached here."""
        return await self._call(self._sample_batch, target, jobs, fetch)

    def _sample_batch(self, target: SampleTarget | None, jobs: list[SampleJob], fetch: Fetch | None) -> list[SampleOutput]:
        source = None if target is None else self._source(target, fetch)
        return self._samplers.sample_batch(source, jobs)

    def _source(self, target: SampleTarget, fetch: Fetch | None) -> AdapterSource:
        folder = None if target.ref is None else self._store.local_path(target.ref)

        def weights() -> AdapterWeights:
            if (held := self._versions.get(target.key)) is not None:
                return held
            if folder is not None:
                return read_weights(folder)
            if fetch is not None:
                return fetch()
            raise AdapterError(f"adapter version {target.key} is no longer held: it was released")

        return AdapterSource(target.key, weights, folder)


def _pass_memory(device: torch.device) -> int:
    """The default activation budget of one pass: 1 GiB on a CPU, a quarter of a GPU's memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 1 << 30


def _adapter_name(model_id: str) -> str:
    # peft adapter names become module keys: keep them short, dot-free and distinct from "lora_".
    return "trn" + hashlib.sha1(model_id.encode()).hexdigest()[:16]


def _eos_ids(model: torch.nn.Module, tokenizer: object) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
