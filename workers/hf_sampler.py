"""The transformers sampler: the trainer's own peft model, each version a pinned adapter.

The trainer and this sampler share one model and one compute thread (the local engine), so a
version's weights are copied once into an adapter of their own and sampled with the decode loop
of workers/sampler.py; the logprobs are then the trainer's for the same weights and tokens. The
LRU holds `capacity` versions; one evicted is built again from its source when next sampled, and
its adapter is reused for the next version of the same shape.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from workers import sampler
from workers.adapter_versions import AdapterSource
from workers.trainer import LoraTrainer
from workers.types import LoraSpec, SampleJob, SampleOutput


class HfSampler:
    def __init__(self, trainer: LoraTrainer, decode: sampler.Decode, capacity: int) -> None:
        self._trainer = trainer
        self._decode = decode
        self._capacity = max(1, capacity)
        self._adapters: OrderedDict[str, str] = OrderedDict()  # version key -> adapter name
        self._spare: list[str] = []  # adapters of forgotten versions, reused before making one
        self._made = 0

    def sample_batch(self, adapter: AdapterSource | None, jobs: Sequence[SampleJob]) -> list[SampleOutput]:
        name = None if adapter is None else self._adapter(adapter)
        with self._trainer.using(name) as model:
            return sampler.sample_batch(
                model, jobs, eos_token_ids=self._trainer.info.eos_token_ids, decode=self._decode,
                pad_token_id=self._trainer.pad_token_id,
            )

    def _adapter(self, source: AdapterSource) -> str:
        if (name := self._adapters.get(source.key)) is not None:
            self._adapters.move_to_end(source.key)
            return name
        weights = source.weights()
        name = self._free_name(weights.spec)
        self._trainer.load_version(name, weights)
        self._adapters[source.key] = name
        return name

    def _free_name(self, spec: LoraSpec) -> str:
        """An adapter for a version about to be built: a spare one (of a forgotten version) or,
        when the LRU is full, the least recently used version's, if it has the same shape (its
        weights are overwritten); else a new one. Outside the tenant pool (pinned): the LRU and
        the spares together hold at most `capacity` adapters."""
        for i, name in enumerate(self._spare):
            if self._fits(name, spec):
                return self._spare.pop(i)
        if len(self._adapters) + len(self._spare) >= self._capacity:
            if self._spare:
                self._trainer.remove_adapter(self._spare.pop(0))
            else:
                _, evicted = self._adapters.popitem(last=False)
                if self._fits(evicted, spec):
                    return evicted
                self._trainer.remove_adapter(evicted)
        self._made += 1
        return f"smp{self._made}"

    def _fits(self, name: str, spec: LoraSpec) -> bool:
        return replace(self._trainer.adapter_spec(name), seed=spec.seed) == spec

    def forget(self, key: str) -> None:
        """The version was released: its adapter stays, as a spare for the next version."""
        if (name := self._adapters.pop(key, None)) is not None:
            self._spare.append(name)

    def cached(self) -> list[str]:
        """The version keys held, least recently used first."""
        return list(self._adapters)

    def close(self) -> None:
        for name in [*self._adapters.values(), *self._spare]:
            self._trainer.remove_adapter(name)
        self._adapters.clear()
        self._spare.clear()
