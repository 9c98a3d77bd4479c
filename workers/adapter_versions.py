"""Immutable adapter versions: what a sampler is given to find a version's weights.

A version is made by every save for sampling. Its weights never change, so a sampler caches what
it built from them (a peft adapter, a vLLM LoRA) under the version's key and reuses it until its
LRU evicts it; an evicted version is built again from its source, never reported missing while the
version lives. The weights come either from memory (an ephemeral save: never written to disk)
or from a checkpoint folder (a named save).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from workers import adapter_files as files
from workers.types import LoraSpec, SampleJob, SampleOutput


@dataclass(frozen=True)
class AdapterWeights:
    """A version's LoRA tensors (peft's names, no adapter name in them, on the CPU) and the peft
    config that describes them (adapter_config.json's content)."""

    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    peft_config: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write_peft(self, dest: Path) -> None:
        """A folder plain peft and vLLM load: adapter_config.json + adapter_model.safetensors."""
        dest.mkdir(parents=True, exist_ok=True)
        files.save_tensors(dest / files.WEIGHTS_FILE, self.tensors)
        (dest / files.CONFIG_FILE).write_text(json.dumps(self.peft_config, indent=1))


@dataclass(frozen=True)
class AdapterSource:
    """Where a sampler finds the weights of version `key` (the same key always means the same
    weights). `folder`: a checkpoint folder holding them (peft layout) or None; `weights`: loads
    them into memory (from the in-memory version, or from `folder`), with their LoraSpec."""

    key: str
    weights: Callable[[], AdapterWeights]
    folder: Path | None = None


def read_weights(folder: Path) -> AdapterWeights:
    """A checkpoint folder's adapter weights (the optimizer state, if any, is not read)."""
    try:
        config = json.loads((folder / files.CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise files.CheckpointFormatError(f"{files.CONFIG_FILE} unreadable: {exc}") from exc
    return AdapterWeights(files.read_spec(folder), files.load_tensors(folder / files.WEIGHTS_FILE), config)


class SamplerBackend(Protocol):
    """A sampler of one base model (workers/hf_sampler.py, workers/vllm_sampler.py): samples
    jobs with a version's weights (None: the bare base model), keeping the versions it built in an
    LRU of its own."""

    def sample_batch(self, adapter: AdapterSource | None, jobs: Sequence[SampleJob]) -> list[SampleOutput]: ...

    def forget(self, key: str) -> None:
        """Drop what was built from version `key` (it was released)."""
        ...

    def close(self) -> None: ...
