"""The transformers sampler's version cache (workers/hf_sampler.py): a version samples with the
weights it was made with, an evicted or forgotten one is rebuilt from its source (never an
error), and adapters are reused rather than made per version."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lora import perturb_b
from workers.adapter_versions import AdapterSource
from workers.hf_sampler import HfSampler
from workers.trainer import LoraTrainer, load_base_model
from workers.types import BaseModelInfo, LoraSpec, SampleJob, SampleParams

INFO = BaseModelInfo(name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=4096, max_context_length=4096,
                     eos_token_ids=(2,))
GREEDY = SampleJob(prompt=[5, 6, 7, 8], num_samples=1, params=SampleParams(max_tokens=6, temperature=0.0, stop_at_eos=False))
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)


class Versions:
    """Versions of one training adapter, each perturbed differently; counts the loads."""

    def __init__(self, trainer: LoraTrainer) -> None:
        self.trainer, self.loads = trainer, 0
        trainer.create_adapter("trnversions", LoraSpec(rank=4, seed=0))
        self.weights = {}
        for i in range(4):
            perturb_b(trainer, "trnversions", seed=100 + i)
            self.weights[f"v{i}"] = trainer.snapshot("trnversions")

    def source(self, key: str) -> AdapterSource:
        def load():
            self.loads += 1
            return self.weights[key]

        return AdapterSource(key, load)


@pytest.fixture()
def versions(trainer: LoraTrainer):
    made = Versions(trainer)
    yield made
    trainer.remove_adapter("trnversions")


def tokens(sampler: HfSampler, source: AdapterSource | None) -> list[int]:
    return sampler.sample_batch(source, [GREEDY])[0].sequences[0].tokens


def test_each_version_samples_its_own_weights_through_evictions(trainer: LoraTrainer, versions: Versions) -> None:
    alone = {}
    for key in versions.weights:  # each version in a cache of its own: the reference
        own = HfSampler(trainer, str, capacity=1)
        alone[key] = tokens(own, versions.source(key))
        own.close()
    assert len({tuple(t) for t in alone.values()}) > 1  # the versions really differ
    sampler = HfSampler(trainer, str, capacity=2)
    for key in ["v0", "v1", "v2", "v0", "v3", "v1", "v1"]:
        assert tokens(sampler, versions.source(key)) == alone[key], key
    sampler.close()


def test_a_cached_version_is_not_loaded_again_and_an_evicted_one_is(trainer: LoraTrainer, versions: Versions) -> None:
    sampler = HfSampler(trainer, str, capacity=2)
    for key in ["v0", "v1", "v0", "v1"]:
        tokens(sampler, versions.source(key))
    assert versions.loads == 2
    tokens(sampler, versions.source("v2"))  # evicts v0
    assert sampler.cached() == ["v1", "v2"]
    tokens(sampler, versions.source("v0"))
    assert versions.loads == 4
    sampler.close()


def test_adapters_are_reused_not_made_per_version(trainer: LoraTrainer, versions: Versions) -> None:
    sampler = HfSampler(trainer, str, capacity=2)
    before = trainer.pool_status().pinned
    for key in ["v0", "v1", "v2", "v3"]:
        tokens(sampler, versions.source(key))
        sampler.forget(key)  # released: its adapter becomes a spare
    assert trainer.pool_status().pinned - before <= 2
    sampler.close()
    assert trainer.pool_status().pinned == before


def test_the_bare_base_model_needs_no_version(trainer: LoraTrainer) -> None:
    sampler = HfSampler(trainer, str, capacity=1)
    assert len(tokens(sampler, None)) == GREEDY.params.max_tokens
    assert sampler.cached() == []
