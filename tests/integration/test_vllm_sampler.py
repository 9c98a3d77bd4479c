"""The vLLM sampler (workers/vllm_sampler.py) on tiny-qwen3, against the hf sampler and the trainer.

Runs in .venv-vllm only (`make test-vllm`); elsewhere the module is skipped. One engine serves the
whole module, with an LRU of one adapter version, so every switch of version evicts and reloads.

What vLLM cannot honour is asserted as vLLM's behaviour instead: the tokens a seed draws are
vLLM's own (reproducible within vLLM, not equal to the hf sampler's), and logprobs agree with the
trainer's within ATOL (another set of kernels), not bit for bit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.support.lora import perturb_b
from workers import sampler as hf
from workers.adapter_versions import AdapterSource, read_weights
from workers.peft_host import AdapterError
from workers.trainer import LoraTrainer, load_base_model
from workers.types import BaseModelInfo, LoraSpec, PromptScoring, SampleJob, SampleOutput, SampleParams
from workers.vllm_sampler import FULL_PROMPT_CELLS, TMPFS, TMPFS_PREFIX, import_vllm

try:
    import_vllm()
except RuntimeError:
    pytest.skip("vllm is not installed (make install-vllm)", allow_module_level=True)

from workers.vllm_sampler import VllmSampler  # noqa: E402

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    # vLLM's own imports, nothing of ours.
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_op.*:FutureWarning"),
]
INFO = BaseModelInfo(
    name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=4096, max_context_length=4096, eos_token_ids=(2,)
)
PROMPT = [5, 100, 200, 300, 17, 2048, 9, 4000]
# Measured fp32 gap between vLLM's logprobs and the trainer's on this model: ~1e-6 (docs/vllm.md).
ATOL = 1e-4
NO_STOP = dict(stop_at_eos=False)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    """The reference: the trainer's model, with adapters "a" and "b" (B != 0) and "head" (lm_head only)."""
    trainer = LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)
    for seed, (name, spec) in enumerate([
        ("a", LoraSpec(rank=8, seed=1)),
        ("b", LoraSpec(rank=16, seed=2)),
        ("head", LoraSpec(rank=8, seed=3, train_attn=False, train_mlp=False, train_unembed=True)),
    ]):
        trainer.create_adapter(name, spec)
        perturb_b(trainer, name, seed)
    return trainer


@pytest.fixture(scope="module")
def versions(trainer: LoraTrainer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterSource]:
    """In-memory versions of every adapter, and "a" again as a named checkpoint (folder)."""
    found = {}
    for name in ("a", "b", "head"):
        weights = trainer.snapshot(name)
        found[name] = AdapterSource(f"mem-{name}", lambda w=weights: w)
    folder = tmp_path_factory.mktemp("ckpt") / "a"
    trainer.save("a", folder, with_optimizer=False)
    found["a-named"] = AdapterSource("named-a", lambda: read_weights(folder), folder)
    return found


@pytest.fixture(scope="module")
def vllm_sampler(tiny_model_dir: Path):
    sampler = VllmSampler(tiny_model_dir, INFO, max_loras=1, max_cpu_loras=1)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def decode(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=False)


def job(max_tokens: int = 8, n: int = 1, scoring: PromptScoring | None = None, topk: int = 0, prompt=PROMPT,
        **params) -> SampleJob:
    return SampleJob(prompt=prompt, num_samples=n, params=SampleParams(max_tokens=max_tokens, **params),
                     scoring=scoring or PromptScoring(), topk_sample=topk)


def hf_sample(trainer: LoraTrainer, adapter: str | None, jobs: list[SampleJob], decode) -> list[SampleOutput]:
    with trainer.using(adapter) as model:
        return hf.sample_batch(model, jobs, eos_token_ids=INFO.eos_token_ids, decode=decode)


def trainer_logprobs(trainer: LoraTrainer, adapter: str | None, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) from one full forward of the trainer's model; NaN at 0."""
    with torch.no_grad(), trainer.using(adapter) as model:
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    lps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    return np.concatenate([[np.nan], lps.numpy()])


def tmp_dirs() -> list[Path]:
    root = TMPFS / f"{TMPFS_PREFIX}{os.getpid()}"
    return sorted(root.iterdir()) if root.is_dir() else []


# ------------------------------------------------------------------------------------------------
# logprobs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "a", "head"])
def test_sampled_logprobs_are_the_trainers(vllm_sampler, trainer, versions, version) -> None:
    """Temperature 0.7 with top-k/top-p shapes the draw only: the logprobs are the raw model's.
    "head" is an lm_head-only LoRA (train_unembed): vLLM applies it too."""
    source = versions[version] if version else None
    out = vllm_sampler.sample_batch(source, [job(12, n=3, temperature=0.7, top_k=50, top_p=0.9, seed=3, **NO_STOP)])
    for seq in out[0].sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        expected = trainer_logprobs(trainer, version, PROMPT + seq.tokens)[len(PROMPT):]
        np.testing.assert_allclose(seq.logprobs, expected, atol=ATOL, rtol=0)


def test_prompt_logprobs_topk_and_last_n_match_the_hf_sampler(vllm_sampler, trainer, decode) -> None:
    jobs = [
        job(1, scoring=PromptScoring(logprobs=True, topk=5)),
        job(1, scoring=PromptScoring(logprobs=True, topk=3, last_n=3)),
        job(1, scoring=PromptScoring(topk=2)),
    ]
    got = vllm_sampler.sample_batch(None, jobs)
    want = hf_sample(trainer, None, jobs, decode)
    for g, w in zip(got, want):
        if w.prompt_logprobs is None:
            assert g.prompt_logprobs is None
        else:
            assert len(g.prompt_logprobs) == len(PROMPT) and math.isnan(g.prompt_logprobs[0])
            np.testing.assert_allclose(g.prompt_logprobs, w.prompt_logprobs, atol=ATOL, rtol=0)  # NaN where NaN
        assert g.topk_prompt.token_ids.shape == w.topk_prompt.token_ids.shape
        np.testing.assert_array_equal(g.topk_prompt.token_ids, w.topk_prompt.token_ids)
        np.testing.assert_allclose(g.topk_prompt.logprobs, w.topk_prompt.logprobs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[0].prompt_logprobs[1:], trainer_logprobs(trainer, None, PROMPT)[1:], atol=ATOL)


def test_target_prompt_logprobs_and_alt_tokens_match_the_hf_sampler(vllm_sampler, trainer, decode) -> None:
    """Both come from the full prompt distribution vLLM returns; the alt draws use the hf sampler's
    generator on it, so equal logits (within float rounding) draw the same tokens."""
    n = len(PROMPT)
    ids = np.full((n - 1, 3), -1, dtype=np.int64)
    ids[:, 0] = PROMPT[1:]
    ids[:, 1] = (np.array(PROMPT[1:]) * 7 + 3) % INFO.vocab_size
    ids[0, 2] = 5
    jobs = [
        job(1, scoring=PromptScoring(target_ids=ids, alt_tokens_k=4), temperature=1.0, seed=123),
        job(1, scoring=PromptScoring(alt_tokens_k=2), temperature=0.0),
    ]
    got = vllm_sampler.sample_batch(None, jobs)
    want = hf_sample(trainer, None, jobs, decode)
    np.testing.assert_allclose(got[0].target_prompt_logprobs, want[0].target_prompt_logprobs, atol=ATOL, rtol=0)
    assert np.all(got[0].target_prompt_logprobs[1:, 2] == 0.0)  # -1 cells
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.alt_tokens, w.alt_tokens)
        np.testing.assert_allclose(g.alt_logprobs, w.alt_logprobs, atol=ATOL, rtol=0)


def test_full_prompt_distribution_is_refused_past_its_cap(vllm_sampler) -> None:
    long_prompt = [7] * (FULL_PROMPT_CELLS // INFO.vocab_size + 1)
    for scoring, option in [(PromptScoring(target_ids=np.zeros((len(long_prompt) - 1, 1), np.int64)),
                             "target_prompt_logprobs"),
                            (PromptScoring(alt_tokens_k=1), "prompt_alt_tokens_k")]:
        with pytest.raises(AdapterError, match=f"{option}.*vllm sampler"):
            vllm_sampler.sample_batch(None, [job(1, scoring=scoring, prompt=long_prompt)])


def test_topk_sample_logprobs(vllm_sampler, trainer, decode) -> None:
    jobs = [job(6, topk=3, temperature=0.0, **NO_STOP)]
    got = vllm_sampler.sample_batch(None, jobs)[0].sequences[0]
    want = hf_sample(trainer, None, jobs, decode)[0].sequences[0]
    assert got.topk.token_ids.shape == (6, 3)
    np.testing.assert_array_equal(got.topk.token_ids[:, 0], got.tokens)  # greedy: the top-1 is the token
    np.testing.assert_allclose(got.topk.logprobs[:, 0], got.logprobs, atol=1e-6)
    np.testing.assert_array_equal(got.topk.token_ids, want.topk.token_ids)
    np.testing.assert_allclose(got.topk.logprobs, want.topk.logprobs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# stops, rows and seeds
# ------------------------------------------------------------------------------------------------


def test_greedy_tokens_match_the_hf_sampler_and_stop_tokens_are_kept(vllm_sampler, trainer, decode) -> None:
    """Greedy decoding picks the argmax of the same logits: the same tokens as the hf sampler
    (a near-tie within float rounding could differ; none on this model and prompt)."""
    free = vllm_sampler.sample_batch(None, [job(8, n=2, temperature=0.0, **NO_STOP)])[0]
    assert free.sequences[0].tokens == free.sequences[1].tokens  # greedy rows are one row
    first = free.sequences[0]
    assert first.stop_reason == "length" and len(first.tokens) == 8
    assert first.tokens == hf_sample(trainer, None, [job(8, temperature=0.0, **NO_STOP)], decode)[0].sequences[0].tokens
    stop_at = first.tokens[2]
    stopped_job = job(8, temperature=0.0, stop_tokens=(stop_at,), **NO_STOP)
    stopped = vllm_sampler.sample_batch(None, [stopped_job])[0].sequences[0]
    assert stopped.stop_reason == "stop" and stopped.tokens == first.tokens[: first.tokens.index(stop_at) + 1]
    assert len(stopped.logprobs) == len(stopped.tokens)
    want = hf_sample(trainer, None, [stopped_job], decode)[0].sequences[0]
    assert (stopped.tokens, stopped.stop_reason) == (want.tokens, want.stop_reason)


def test_eos_stops_only_with_stop_at_eos(vllm_sampler, monkeypatch) -> None:
    """The model's EOS ids (BaseModelInfo) end a row only with stop_at_eos; vLLM's own idea of EOS
    plays no part. The tiny model never picks its EOS, so its first greedy token plays the part."""
    first = vllm_sampler.sample_batch(None, [job(4, temperature=0.0, **NO_STOP)])[0].sequences[0].tokens[0]
    monkeypatch.setattr(vllm_sampler, "_info", BaseModelInfo(**{**INFO.__dict__, "eos_token_ids": (first,)}))
    on = vllm_sampler.sample_batch(None, [job(4, temperature=0.0)])[0].sequences[0]
    off = vllm_sampler.sample_batch(None, [job(4, temperature=0.0, stop_at_eos=False)])[0].sequences[0]
    assert (on.tokens, on.stop_reason) == ([first], "stop")
    assert len(off.tokens) == 4 and off.stop_reason == "length"


def test_stop_strings_end_the_row_where_the_hf_sampler_does(vllm_sampler, trainer, decode) -> None:
    free = vllm_sampler.sample_batch(None, [job(10, temperature=0.0, **NO_STOP)])[0].sequences[0].tokens
    # A stop string that the text first contains once token 4 is decoded.
    end = next(i for i in range(4, 10) if decode(free[:i]) != decode(free[: i - 1]))
    text = decode(free[:end])
    stop = next(text[-w:] for w in range(1, len(text) + 1) if text[-w:] not in decode(free[: end - 1]))
    stop_job = job(10, temperature=0.0, stop_strings=(stop,), **NO_STOP)
    got = vllm_sampler.sample_batch(None, [stop_job])[0].sequences[0]
    want = hf_sample(trainer, None, [stop_job], decode)[0].sequences[0]
    assert got.tokens == want.tokens == free[:end]
    assert got.stop_reason == want.stop_reason == "stop"
    # With stop strings the prompt is scored by a request of its own (undecoded): the same answer.
    scored_job = job(10, temperature=0.0, stop_strings=(stop,), scoring=PromptScoring(logprobs=True, topk=2), **NO_STOP)
    scored = vllm_sampler.sample_batch(None, [scored_job])[0]
    assert scored.sequences[0].tokens == free[:end]
    np.testing.assert_allclose(scored.prompt_logprobs, trainer_logprobs(trainer, None, PROMPT), atol=ATOL)
    assert scored.topk_prompt.token_ids.shape == (len(PROMPT), 2)


def test_num_samples_rows_and_seeds(vllm_sampler) -> None:
    """A seed gives the same rows again (vLLM's own draws); rows of one request differ."""
    def run(seed: int) -> list[list[int]]:
        return [s.tokens for s in vllm_sampler.sample_batch(None, [job(8, n=4, seed=seed, **NO_STOP)])[0].sequences]

    rows = run(7)
    assert len(rows) == 4 and all(len(r) == 8 for r in rows)
    assert len({tuple(r) for r in rows}) == 4
    assert run(7) == rows
    assert run(8) != rows
    # Batched with other requests, a request's rows are still its seed's.
    batched = vllm_sampler.sample_batch(None, [job(5, n=2, seed=1, **NO_STOP), job(8, n=4, seed=7, **NO_STOP)])
    assert [s.tokens for s in batched[1].sequences] == rows


def test_max_tokens_zero_scores_the_prompt_only(vllm_sampler, trainer) -> None:
    out = vllm_sampler.sample_batch(None, [job(0, n=2, scoring=PromptScoring(logprobs=True)), job(0, n=3)])
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in out[0].sequences] == [([], [], "length")] * 2
    np.testing.assert_allclose(out[0].prompt_logprobs, trainer_logprobs(trainer, None, PROMPT), atol=ATOL)
    assert len(out[1].sequences) == 3 and out[1].prompt_logprobs is None


# ------------------------------------------------------------------------------------------------
# adapter versions
# ------------------------------------------------------------------------------------------------


def prompt_logprobs(vllm_sampler, source: AdapterSource | None) -> np.ndarray:
    out = vllm_sampler.sample_batch(source, [job(1, scoring=PromptScoring(logprobs=True))])[0]
    return np.array(out.prompt_logprobs)


def test_an_adapter_version_changes_the_outputs_as_in_the_trainer(vllm_sampler, trainer, versions) -> None:
    base = prompt_logprobs(vllm_sampler, None)
    for name, source in [("a", versions["a"]), ("a", versions["a-named"]), ("b", versions["b"])]:
        got = prompt_logprobs(vllm_sampler, source)
        assert np.nanmax(np.abs(got - base)) > 1e-3, name  # the adapter is really applied
        np.testing.assert_allclose(got, trainer_logprobs(trainer, name, PROMPT), atol=ATOL, rtol=0)
    greedy = job(8, temperature=0.0, **NO_STOP)
    assert vllm_sampler.sample_batch(versions["a"], [greedy]) != vllm_sampler.sample_batch(None, [greedy])


def test_versions_alternate_through_an_lru_of_one(vllm_sampler, trainer, versions) -> None:
    """Each switch evicts the other version (vLLM's LoRA and its tmpfs folder) and loads it again."""
    for name in ["a", "b", "a", "b", "head", "a"]:
        got = prompt_logprobs(vllm_sampler, versions[name])
        np.testing.assert_allclose(got, trainer_logprobs(trainer, name, PROMPT), atol=ATOL, rtol=0)
        assert vllm_sampler.cached() == [versions[name].key]
        assert len(tmp_dirs()) == 1  # the evicted version's folder is gone


def test_forget_releases_the_lora_and_its_tmpfs_folder(vllm_sampler, trainer, versions) -> None:
    prompt_logprobs(vllm_sampler, versions["b"])
    [folder] = tmp_dirs()
    assert (folder / "adapter_model.safetensors").is_file()
    assert os.statvfs(folder).f_fsid == os.statvfs(TMPFS).f_fsid  # on the tmpfs, not on disk
    vllm_sampler.forget(versions["b"].key)
    assert not folder.exists() and vllm_sampler.cached() == [] and tmp_dirs() == []
    vllm_sampler.forget(versions["b"].key)  # unknown by now: nothing to do
    vllm_sampler.forget("never-seen")
    np.testing.assert_allclose(prompt_logprobs(vllm_sampler, versions["b"]), trainer_logprobs(trainer, "b", PROMPT),
                               atol=ATOL)


def test_a_named_version_is_read_from_its_folder_without_a_copy(vllm_sampler, versions) -> None:
    for key in list(vllm_sampler.cached()):
        vllm_sampler.forget(key)
    prompt_logprobs(vllm_sampler, versions["a-named"])
    assert vllm_sampler.cached() == ["named-a"] and tmp_dirs() == []


def test_the_base_model_after_an_adapter_is_the_bare_base(vllm_sampler, trainer, versions) -> None:
    """vLLM's CPU LoRA logits path would give a base request the lm_head delta of the adapter in
    its last slot; the sampler's patch (workers/vllm_sampler.py) keeps the base bare."""
    prompt_logprobs(vllm_sampler, versions["head"])
    np.testing.assert_allclose(prompt_logprobs(vllm_sampler, None), trainer_logprobs(trainer, None, PROMPT),
                               atol=ATOL)
    seq = vllm_sampler.sample_batch(None, [job(6, seed=4, **NO_STOP)])[0].sequences[0]
    np.testing.assert_allclose(seq.logprobs, trainer_logprobs(trainer, None, PROMPT + seq.tokens)[len(PROMPT):],
                               atol=ATOL)


def test_a_rank_above_max_lora_rank_is_refused(vllm_sampler, tiny_model_dir) -> None:
    big = LoraTrainer(load_base_model(tiny_model_dir), INFO)
    big.create_adapter("big", LoraSpec(rank=128, seed=0))
    weights = big.snapshot("big")
    before = tmp_dirs()
    with pytest.raises(AdapterError, match="max_lora_rank"):
        vllm_sampler.sample_batch(AdapterSource("big", lambda: weights), [job(1)])
    assert "big" not in vllm_sampler.cached() and set(tmp_dirs()) <= set(before)
