"""Token sampling (workers/sampler.py) on the real tiny-qwen3 with a LoRA adapter active.

References are plain full forward passes (no KV cache) over prompt + sampled tokens: the sampled
logprobs must be the model's own log_softmax of the chosen tokens, whatever the temperature.
The random tiny model is close to uniform over its 4096 tokens, so random sampling practically
never repeats a token and seeds are easy to tell apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from workers import sampler
from workers.guard import Failure, guarded
from workers.sampler import sample, sample_batch
from workers.trainer import LoraTrainer, load_base_model
from workers.types import (
    GREEDY_BELOW,
    TOPK_EMPTY_ID,
    TOPK_EMPTY_LOGPROB,
    BaseModelInfo,
    LoraSpec,
    PromptScoring,
    SampleJob,
    SampleOutput,
    SampleParams,
)

EOS = 2
PROMPT = [5, 100, 200, 300, 17, 2048]
INFO = BaseModelInfo(
    name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=4096, max_context_length=4096, eos_token_ids=(EOS,)
)
ADAPTER = "sampling"


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    trainer = LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)
    trainer.create_adapter(ADAPTER, LoraSpec(rank=4, seed=3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0: the adapter really changes the distribution
        for key, param in trainer._adapter(ADAPTER).params.items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return trainer


@pytest.fixture(scope="module")
def decode(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=False)


@pytest.fixture(scope="module")
def run(trainer: LoraTrainer, decode):
    def run(
        params: SampleParams,
        num_samples: int = 1,
        *,
        prompt=PROMPT,
        adapter: str | None = ADAPTER,
        eos=(EOS,),
        prompt_logprobs: bool = False,
    ) -> SampleOutput:
        with trainer.using(adapter) as model:
            return sample(
                model, prompt, num_samples, params, eos_token_ids=eos, decode=decode,
                want_prompt_logprobs=prompt_logprobs,
            )

    return run


def full_logprobs(trainer: LoraTrainer, tokens: list[int], adapter: str | None = ADAPTER) -> torch.Tensor:
    """log_softmax over the vocabulary at every position of one uncached forward pass, in float64."""
    with torch.no_grad(), trainer.using(adapter) as model:
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def scored(trainer: LoraTrainer, prompt: list[int], tokens: list[int], adapter: str | None = ADAPTER) -> np.ndarray:
    """Logprob of each sampled token given everything before it."""
    lp = full_logprobs(trainer, prompt + tokens, adapter)
    n = len(prompt)
    return np.array([float(lp[n - 1 + i, t]) for i, t in enumerate(tokens)])


def seq(params: SampleParams, run, **kw):
    out = run(params, **kw)
    assert len(out.sequences) == 1
    return out.sequences[0]


# ----- greedy -----------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_is_the_argmax(trainer, run) -> None:
    params = SampleParams(max_tokens=12, temperature=0.0, stop_at_eos=False)
    a, b = seq(params, run), seq(params, run)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert len(a.tokens) == 12 and a.stop_reason == "length"
    lp = full_logprobs(trainer, PROMPT + a.tokens)
    n = len(PROMPT)
    for i, tok in enumerate(a.tokens):
        row = lp[n - 1 + i]
        assert tok == int(row.argmax()), f"position {i}"
    np.testing.assert_allclose(a.logprobs, scored(trainer, PROMPT, a.tokens), atol=1e-4, rtol=0)


def test_greedy_ignores_the_seed_and_depends_on_the_adapter(trainer, run) -> None:
    with_adapter = seq(SampleParams(max_tokens=8, temperature=0.0, seed=1, stop_at_eos=False), run)
    other_seed = seq(SampleParams(max_tokens=8, temperature=0.0, seed=2, stop_at_eos=False), run)
    assert with_adapter.tokens == other_seed.tokens
    base = seq(SampleParams(max_tokens=8, temperature=0.0, stop_at_eos=False), run, adapter=None)
    lp = full_logprobs(trainer, PROMPT + base.tokens, adapter=None)
    assert all(t == int(lp[len(PROMPT) - 1 + i].argmax()) for i, t in enumerate(base.tokens))
    assert base.tokens != with_adapter.tokens


def test_top_k_1_and_tiny_top_p_equal_greedy(run) -> None:
    greedy = seq(SampleParams(max_tokens=10, temperature=0.0, stop_at_eos=False), run)
    top1 = seq(SampleParams(max_tokens=10, temperature=1.0, top_k=1, seed=5, stop_at_eos=False), run)
    tiny_p = seq(SampleParams(max_tokens=10, temperature=1.0, top_p=1e-9, seed=6, stop_at_eos=False), run)
    assert top1.tokens == greedy.tokens
    assert tiny_p.tokens == greedy.tokens
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-5])
def test_a_temperature_below_the_floor_is_greedy(run, temperature: float) -> None:
    """Logits / 1e-40 overflow float32 to inf; without the floor softmax gives NaN and the CDF
    picks an arbitrary token."""
    assert SampleParams(max_tokens=1, temperature=temperature).temperature == 0.0
    greedy = seq(SampleParams(max_tokens=10, temperature=0.0, stop_at_eos=False), run)
    tiny = seq(SampleParams(max_tokens=10, temperature=temperature, seed=3, stop_at_eos=False), run)
    assert tiny.tokens == greedy.tokens
    assert SampleParams(max_tokens=1, temperature=GREEDY_BELOW).temperature == GREEDY_BELOW


def test_nan_weights_fail_the_sample_as_a_user_error(tiny_model_dir: Path, decode) -> None:
    broken = LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)
    broken.create_adapter("nan", LoraSpec(rank=2, seed=0))
    with torch.no_grad():  # a diverged run: every weight of the adapter NaN
        for param in broken._adapter("nan").params.values():
            param.fill_(float("nan"))
    for params, prompt_logprobs in ((SampleParams(max_tokens=4, temperature=1.0, seed=1), False),
                                    (SampleParams(max_tokens=0), True)):
        with broken.using("nan") as model:
            failed = guarded(sample, model, PROMPT, 1, params, eos_token_ids=(EOS,), decode=decode,
                             want_prompt_logprobs=prompt_logprobs)
        assert isinstance(failed, Failure) and failed.category == "user" and "NaN" in failed.message


# ----- seeds ------------------------------------------------------------------------------------
def test_same_seed_same_tokens_different_seed_differs(run) -> None:
    p = dict(max_tokens=16, temperature=1.0, stop_at_eos=False)
    a = seq(SampleParams(**p, seed=42), run)
    b = seq(SampleParams(**p, seed=42), run)
    c = seq(SampleParams(**p, seed=43), run)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    # Sampling at temperature 1 over a near-uniform vocabulary is not greedy decoding.
    assert a.tokens != seq(SampleParams(max_tokens=16, temperature=0.0, stop_at_eos=False), run).tokens


def test_seed_beyond_int64_and_global_rng_untouched(run) -> None:
    state = torch.get_rng_state()
    a = seq(SampleParams(max_tokens=6, temperature=1.0, seed=2**64 + 12345, stop_at_eos=False), run)
    b = seq(SampleParams(max_tokens=6, temperature=1.0, seed=2**64 + 12345, stop_at_eos=False), run)
    assert a.tokens == b.tokens and len(a.tokens) == 6
    assert torch.equal(torch.get_rng_state(), state), "sampling must use a private generator"
    # Without a seed, two requests are (with overwhelming probability) different.
    c = seq(SampleParams(max_tokens=6, temperature=1.0, stop_at_eos=False), run)
    d = seq(SampleParams(max_tokens=6, temperature=1.0, stop_at_eos=False), run)
    assert c.tokens != d.tokens


# ----- num_samples ------------------------------------------------------------------------------
def test_num_samples_rows_are_independent_and_each_consistent(trainer, run) -> None:
    out = run(SampleParams(max_tokens=10, temperature=1.0, seed=7, stop_at_eos=False), num_samples=4)
    assert len(out.sequences) == 4
    rows = [s.tokens for s in out.sequences]
    assert len({tuple(r) for r in rows}) == 4
    for s in out.sequences:
        assert len(s.tokens) == len(s.logprobs) == 10 and s.stop_reason == "length"
        # Each row continues its own prefix: its logprobs match an uncached pass over that row.
        np.testing.assert_allclose(s.logprobs, scored(trainer, PROMPT, s.tokens), atol=1e-4, rtol=0)
    again = run(SampleParams(max_tokens=10, temperature=1.0, seed=7, stop_at_eos=False), num_samples=4)
    assert [s.tokens for s in again.sequences] == rows
    other = run(SampleParams(max_tokens=10, temperature=1.0, seed=8, stop_at_eos=False), num_samples=4)
    assert all(s.tokens != r for s, r in zip(other.sequences, rows))


def test_num_samples_greedy_rows_are_all_the_greedy_sequence(run) -> None:
    one = seq(SampleParams(max_tokens=8, temperature=0.0, stop_at_eos=False), run)
    three = run(SampleParams(max_tokens=8, temperature=0.0, stop_at_eos=False), num_samples=3)
    for s in three.sequences:
        assert s.tokens == one.tokens
        np.testing.assert_allclose(s.logprobs, one.logprobs, atol=1e-5, rtol=0)


# ----- logprobs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_sampled_logprobs_are_the_models_own(trainer, run, temperature: float) -> None:
    s = seq(SampleParams(max_tokens=12, temperature=temperature, seed=11, stop_at_eos=False), run)
    ref = scored(trainer, PROMPT, s.tokens)
    np.testing.assert_allclose(s.logprobs, ref, atol=1e-4, rtol=0)
    # Temperature-scaled logprobs would be clearly different (the logits are not flat).
    lp_t = full_logprobs(trainer, PROMPT + s.tokens)
    if temperature != 1.0:
        n = len(PROMPT)
        scaled = [
            float(torch.log_softmax(lp_t[n - 1 + i] / temperature, -1)[t]) for i, t in enumerate(s.tokens)
        ]
        assert np.abs(np.array(s.logprobs) - np.array(scaled)).max() > 1e-2


def test_prompt_logprobs_match_a_forward_pass(trainer, run) -> None:
    out = run(SampleParams(max_tokens=1, temperature=0.0), prompt_logprobs=True)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(PROMPT)
    assert math.isnan(out.prompt_logprobs[0])
    lp = full_logprobs(trainer, PROMPT)
    ref = [float(lp[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))]
    np.testing.assert_allclose(out.prompt_logprobs[1:], ref, atol=1e-4, rtol=0)
    assert run(SampleParams(max_tokens=1)).prompt_logprobs is None
    single = run(SampleParams(max_tokens=1, temperature=0.0), prompt=[7], prompt_logprobs=True)
    assert len(single.prompt_logprobs) == 1 and math.isnan(single.prompt_logprobs[0])


# ----- top-k / top-p ----------------------------------------------------------------------------
def test_top_k_only_picks_among_the_k_best(trainer, run) -> None:
    k = 3
    out = run(SampleParams(max_tokens=8, temperature=1.5, top_k=k, seed=21, stop_at_eos=False), num_samples=3)
    n = len(PROMPT)
    for s in out.sequences:
        lp = full_logprobs(trainer, PROMPT + s.tokens)
        for i, t in enumerate(s.tokens):
            rank = int((lp[n - 1 + i] > lp[n - 1 + i, t]).sum())
            assert rank < k, f"token {t} at {i} has rank {rank}"


def test_top_p_only_picks_from_the_nucleus(trainer, run) -> None:
    top_p, temperature = 0.02, 0.8
    params = SampleParams(max_tokens=8, temperature=temperature, top_p=top_p, seed=22, stop_at_eos=False)
    out = run(params, num_samples=3)
    n = len(PROMPT)
    sizes = []
    for s in out.sequences:
        lp = full_logprobs(trainer, PROMPT + s.tokens)
        for i, t in enumerate(s.tokens):
            probs = torch.softmax(lp[n - 1 + i] / temperature, -1).numpy()
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass ranked strictly above each token
            nucleus = set(order[before < top_p].tolist())
            sizes.append(len(nucleus))
            # A float-rounding margin around the boundary token.
            margin = set(order[before < top_p + 1e-6].tolist())
            assert t in margin, f"token {t} at {i} outside the top-p nucleus"
    assert 1 < min(sizes) and max(sizes) < 4096 // 4  # the filter was neither trivial nor empty


def test_sampling_frequencies_follow_temperature_and_top_k(trainer, run) -> None:
    """Many one-token samples: empirical frequencies ≈ softmax(top-k logits / T)."""
    k, temperature, n = 4, 0.2, 2000
    out = run(SampleParams(max_tokens=1, temperature=temperature, top_k=k, seed=23, stop_at_eos=False), num_samples=n)
    lp = full_logprobs(trainer, PROMPT)[-1]
    top = torch.topk(lp, k)
    expected = torch.softmax(top.values / temperature, -1).numpy()
    counts = np.array([sum(s.tokens[0] == int(t) for s in out.sequences) for t in top.indices])
    assert counts.sum() == n
    freq = counts / n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-3), (freq, expected)
    assert expected.max() < 0.9  # the check is not vacuous: several tokens have real mass
    # ... and it tells temperatures apart: at temperature 1 the frequencies would be far off.
    untempered = torch.softmax(top.values, -1).numpy()
    assert np.any(np.abs(freq - untempered) > 10 * sigma)


# ----- stopping ---------------------------------------------------------------------------------
def _free_run(run, seed: int = 31, n: int = 12):
    s = seq(SampleParams(max_tokens=n, temperature=1.0, seed=seed, stop_at_eos=False), run)
    assert len(s.tokens) == n and s.stop_reason == "length"
    return s


def test_stop_token_is_kept_as_last_token(run) -> None:
    free = _free_run(run)
    stop = free.tokens[5]
    cut = free.tokens.index(stop) + 1  # the first occurrence stops
    s = seq(SampleParams(max_tokens=12, temperature=1.0, seed=31, stop_tokens=(stop,), stop_at_eos=False), run)
    assert s.tokens == free.tokens[:cut] and s.tokens[-1] == stop
    assert s.logprobs == free.logprobs[:cut]
    assert s.stop_reason == "stop"


def test_eos_stops_only_with_stop_at_eos(run) -> None:
    free = _free_run(run, seed=32)
    eos = free.tokens[3]
    cut = free.tokens.index(eos) + 1
    params = dict(max_tokens=12, temperature=1.0, seed=32)
    stopped = seq(SampleParams(**params, stop_at_eos=True), run, eos=(eos,))
    assert stopped.tokens == free.tokens[:cut] and stopped.stop_reason == "stop"
    running = seq(SampleParams(**params, stop_at_eos=False), run, eos=(eos,))
    assert running.tokens == free.tokens and running.stop_reason == "length"


def test_stop_at_eos_false_runs_to_max_tokens_even_on_eos(trainer, run) -> None:
    """With greedy decoding the eos we declare is the model's favourite: it comes at step 0."""
    greedy = seq(SampleParams(max_tokens=5, temperature=0.0, stop_at_eos=False), run)
    first = greedy.tokens[0]
    s = seq(SampleParams(max_tokens=5, temperature=0.0, stop_at_eos=False), run, eos=(first,))
    assert s.tokens == greedy.tokens and s.stop_reason == "length"
    s = seq(SampleParams(max_tokens=5, temperature=0.0, stop_at_eos=True), run, eos=(first,))
    assert s.tokens == [first] and s.stop_reason == "stop"


def test_stop_string(run, decode) -> None:
    free = _free_run(run, seed=33)
    # A stop string that first appears in the text of token 6 (which need not be a whole token).
    target = next(i for i in range(4, 12) if decode([free.tokens[i]]).strip())
    piece = decode([free.tokens[target]]).strip()[:2]
    cut = next(m for m in range(1, 13) if piece in decode(free.tokens[:m]))
    s = seq(
        SampleParams(max_tokens=12, temperature=1.0, seed=33, stop_strings=(piece,), stop_at_eos=False), run
    )
    assert s.stop_reason == "stop"
    assert s.tokens == free.tokens[:cut]
    assert piece in decode(s.tokens) and piece not in decode(s.tokens[:-1])


def test_stop_string_that_never_appears(run) -> None:
    free = _free_run(run, seed=34, n=8)
    s = seq(
        SampleParams(max_tokens=8, temperature=1.0, seed=34, stop_strings=("\x00never\x00",), stop_at_eos=False), run
    )
    assert s.tokens == free.tokens and s.stop_reason == "length"


def test_stop_only_finishes_its_own_row(run) -> None:
    """One row stops early; the others keep sampling exactly as without the stop token."""
    params = dict(max_tokens=10, temperature=1.0, seed=35, stop_at_eos=False)
    free = run(SampleParams(**params), num_samples=3).sequences
    stop = free[1].tokens[2]
    out = run(SampleParams(**params, stop_tokens=(stop,)), num_samples=3).sequences
    for f, s in zip(free, out):
        if stop in f.tokens:
            cut = f.tokens.index(stop) + 1
            assert s.tokens == f.tokens[:cut] and s.stop_reason == "stop"
        else:
            assert s.tokens == f.tokens and s.stop_reason == "length"
    assert out[1].stop_reason == "stop" and len(out[1].tokens) <= 3


# ----- edge cases -------------------------------------------------------------------------------
def test_max_tokens_zero(trainer, run) -> None:
    out = run(SampleParams(max_tokens=0), num_samples=2, prompt_logprobs=True)
    assert [s.tokens for s in out.sequences] == [[], []]
    assert [s.logprobs for s in out.sequences] == [[], []]
    assert all(s.stop_reason == "length" for s in out.sequences)
    assert len(out.prompt_logprobs) == len(PROMPT) and math.isnan(out.prompt_logprobs[0])


def test_sampled_logprobs_equal_what_the_trainer_computes(trainer, run) -> None:
    """The importance-sampling contract: sampler logprobs == learner logprobs for the same tokens."""
    from schemas.wire import DatumIn
    from workers.losses import get_loss

    s = seq(SampleParams(max_tokens=10, temperature=0.7, seed=41, stop_at_eos=False), run)
    full = PROMPT + s.tokens
    datum = DatumIn(
        tokens=np.array(full[:-1], dtype=np.int64),
        loss_fn_inputs={"target_tokens": np.array(full[1:], dtype=np.int64)},
    )
    res = trainer.forward_backward(ADAPTER, [datum], get_loss("cross_entropy"), {}, forward_only=True)
    learner = res.outputs[0]["logprobs"][len(PROMPT) - 1 :]
    np.testing.assert_allclose(s.logprobs, learner, atol=1e-4, rtol=0)


# =================================================================================================
# Prompt scoring options (SampleRequest: prompt_logprobs_last_n, topk_prompt_logprobs,
# target_prompt_logprobs, prompt_alt_tokens_k) and topk_sample_logprobs. References are the
# float64 log_softmax of one uncached forward pass (`full_logprobs`).
# =================================================================================================
LONG = [5, 100, 200, 300, 17, 2048, 9, 31, 4000, 77, 1234, 8]


@pytest.fixture(scope="module")
def run_jobs(trainer: LoraTrainer, decode):
    def run_jobs(jobs: list[SampleJob], adapter: str | None = ADAPTER, eos=(EOS,)) -> list[SampleOutput]:
        with trainer.using(adapter) as model:
            return sample_batch(model, jobs, eos_token_ids=eos, decode=decode)

    return run_jobs


def score(run_jobs, prompt=LONG, *, num_samples: int = 1, params: SampleParams | None = None, topk_sample: int = 0,
          **scoring) -> SampleOutput:
    params = params or SampleParams(max_tokens=1, temperature=0.0)
    job = SampleJob(prompt=prompt, num_samples=num_samples, params=params, scoring=PromptScoring(**scoring),
                    topk_sample=topk_sample)
    return run_jobs([job])[0]


def test_prompt_logprobs_last_n_scores_only_the_suffix(trainer, run_jobs) -> None:
    lp = full_logprobs(trainer, LONG)
    ref = np.array([np.nan] + [float(lp[i - 1, LONG[i]]) for i in range(1, len(LONG))])
    for n in (1, 4, len(LONG) - 1):
        out = score(run_jobs, logprobs=True, last_n=n, topk=3)
        got = np.array(out.prompt_logprobs)
        assert len(got) == len(LONG)
        assert np.isnan(got[: len(LONG) - n]).all(), n
        np.testing.assert_allclose(got[-n:], ref[-n:], atol=1e-5, rtol=0)
        # ... and top-k rows before the suffix are empty cells.
        top = out.topk_prompt
        assert (top.token_ids[: len(LONG) - n] == TOPK_EMPTY_ID).all()
        assert (top.logprobs[: len(LONG) - n] == TOPK_EMPTY_LOGPROB).all()
        assert (top.logprobs[len(LONG) - n :] > -100).all()
    full = score(run_jobs, logprobs=True)
    np.testing.assert_allclose(full.prompt_logprobs[1:], ref[1:], atol=1e-5, rtol=0)


def test_topk_prompt_logprobs_are_the_k_best_of_a_forward_pass(trainer, run_jobs) -> None:
    k = 5
    out = score(run_jobs, topk=k)
    assert out.prompt_logprobs is None  # top-k does not need prompt_logprobs
    ids, lps = out.topk_prompt.token_ids, out.topk_prompt.logprobs
    assert ids.shape == lps.shape == (len(LONG), k) and lps.dtype == np.float32
    assert (ids[0] == TOPK_EMPTY_ID).all() and (lps[0] == TOPK_EMPTY_LOGPROB).all()  # position 0
    lp = full_logprobs(trainer, LONG)
    for i in range(1, len(LONG)):
        ref = torch.topk(lp[i - 1], k)
        np.testing.assert_allclose(lps[i], ref.values.numpy(), atol=1e-5, rtol=0)
        assert np.all(np.diff(lps[i]) <= 0)  # most likely first
        np.testing.assert_allclose(lp[i - 1, ids[i]].numpy(), lps[i], atol=1e-5, rtol=0)  # ids match values


def test_target_prompt_logprobs_dense(trainer, run_jobs) -> None:
    rows = len(LONG) - 1
    target = np.full((rows, 3), -1, dtype=np.int64)
    target[2] = [7, 4095, 0]
    target[5, 1] = LONG[6]  # the actual next token: equals its prompt logprob
    target[rows - 1, 0] = 123
    out = score(run_jobs, logprobs=True, target_ids=target)
    got = out.target_prompt_logprobs
    assert got.shape == (rows, 3) and got.dtype == np.float32
    lp = full_logprobs(trainer, LONG)
    for i, j in np.argwhere(target != -1):
        assert got[i, j] == pytest.approx(float(lp[i, target[i, j]]), abs=1e-5)  # row i: position i + 1
    assert (got[target == -1] == 0.0).all()
    assert got[5, 1] == pytest.approx(out.prompt_logprobs[6], abs=1e-6)


def test_topk_sample_logprobs(trainer, run_jobs) -> None:
    k = 4
    params = SampleParams(max_tokens=6, temperature=1.0, seed=51, stop_at_eos=False)
    out = score(run_jobs, PROMPT, num_samples=2, params=params, topk_sample=k)
    plain = score(run_jobs, PROMPT, num_samples=2, params=params)
    for s, p in zip(out.sequences, plain.sequences):
        assert s.tokens == p.tokens and p.topk is None  # asking for top-k changes no token
        assert s.topk.token_ids.shape == s.topk.logprobs.shape == (len(s.tokens), k)
        lp = full_logprobs(trainer, PROMPT + s.tokens)
        for i in range(len(s.tokens)):
            row = lp[len(PROMPT) - 1 + i]
            np.testing.assert_allclose(s.topk.logprobs[i], torch.topk(row, k).values.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(row[s.topk.token_ids[i]].numpy(), s.topk.logprobs[i], atol=1e-5, rtol=0)
            assert s.topk.logprobs[i, 0] >= s.logprobs[i] - 1e-6
    zero = score(run_jobs, PROMPT, params=SampleParams(max_tokens=0), topk_sample=k)
    assert zero.sequences[0].topk.token_ids.shape == (0, k)


def test_prompt_alt_tokens(trainer, run_jobs) -> None:
    k = 6
    params = SampleParams(max_tokens=5, temperature=1.0, seed=61, stop_at_eos=False)
    out = score(run_jobs, params=params, alt_tokens_k=k)
    tokens, lps = out.alt_tokens, out.alt_logprobs
    assert tokens.shape == lps.shape == (len(LONG) - 1, k)
    assert tokens.dtype == np.int64 and lps.dtype == np.float32
    lp = full_logprobs(trainer, LONG)
    for i in range(len(LONG) - 1):  # row i: alternatives to prompt[i + 1], given prompt[: i + 1]
        np.testing.assert_allclose(lps[i], lp[i, tokens[i]].numpy(), atol=1e-5, rtol=0)
    assert len(np.unique(tokens)) > k  # real draws from a near-uniform distribution
    again = score(run_jobs, params=params, alt_tokens_k=k)
    np.testing.assert_array_equal(again.alt_tokens, tokens)  # seeded
    other = score(run_jobs, params=SampleParams(max_tokens=5, temperature=1.0, seed=62, stop_at_eos=False),
                  alt_tokens_k=k)
    assert not np.array_equal(other.alt_tokens, tokens)
    # The draws do not shift the sampled tokens.
    assert out.sequences[0].tokens == score(run_jobs, params=params).sequences[0].tokens
    # Temperature 0: the argmax, k times.
    greedy = score(run_jobs, alt_tokens_k=3)
    np.testing.assert_array_equal(greedy.alt_tokens, lp[:-1].argmax(-1, keepdim=True).expand(-1, 3).numpy())


def test_prompt_alt_tokens_follow_the_request_temperature(trainer, run_jobs) -> None:
    """Frequencies of many draws at the last position ≈ softmax(logprobs / T) (no top-k/top-p)."""
    k, temperature = 3000, 0.15
    params = SampleParams(max_tokens=1, temperature=temperature, top_k=1, seed=63)  # top_k: ignored by alt draws
    out = score(run_jobs, PROMPT, params=params, alt_tokens_k=k)
    draws = out.alt_tokens[-1]
    lp = full_logprobs(trainer, PROMPT)[len(PROMPT) - 2]
    expected = torch.softmax(lp / temperature, -1).numpy()
    top = np.argsort(-expected)[:4]
    assert expected[top].max() < 0.9 and expected[top[1]] > 0.05
    freq = np.array([(draws == t).mean() for t in top])
    sigma = np.sqrt(expected[top] * (1 - expected[top]) / k)
    assert np.all(np.abs(freq - expected[top]) <= 5 * sigma + 1e-3), (freq, expected[top])


def test_one_token_prompt_with_every_option(run_jobs) -> None:
    out = score(run_jobs, [7], logprobs=True, topk=3, alt_tokens_k=2,
                target_ids=np.empty((0, 2), np.int64), params=SampleParams(max_tokens=2, temperature=0.0),
                topk_sample=2)
    assert len(out.prompt_logprobs) == 1 and math.isnan(out.prompt_logprobs[0])
    assert out.topk_prompt.token_ids.shape == (1, 3) and (out.topk_prompt.logprobs == TOPK_EMPTY_LOGPROB).all()
    assert out.alt_tokens.shape == out.alt_logprobs.shape == (0, 2)
    assert out.target_prompt_logprobs.shape == (0, 2)
    assert len(out.sequences[0].tokens) == 2 and out.sequences[0].topk.token_ids.shape == (2, 2)
    with pytest.raises(ValueError, match="prompt_logprobs_last_n"):
        score(run_jobs, [7], logprobs=True, last_n=1)


@pytest.mark.parametrize(
    ("scoring", "topk_sample", "field"),
    [
        (dict(logprobs=True, last_n=0), 0, "prompt_logprobs_last_n"),
        (dict(logprobs=True, last_n=len(LONG)), 0, "prompt_logprobs_last_n"),
        (dict(logprobs=False, last_n=2), 0, "prompt_logprobs_last_n"),
        (dict(topk=4097), 0, "topk_prompt_logprobs"),
        (dict(), 4097, "topk_sample_logprobs"),
        (dict(alt_tokens_k=4097), 0, "prompt_alt_tokens_k"),
        (dict(target_ids=np.full((len(LONG) - 1, 1), 4096)), 0, "target_prompt_logprobs"),
        (dict(target_ids=np.full((len(LONG) - 1, 1), -2)), 0, "target_prompt_logprobs"),
        (dict(target_ids=np.full((len(LONG), 1), 3)), 0, "target_prompt_logprobs"),
    ],
)
def test_bad_options_are_rejected_naming_the_field(run_jobs, scoring, topk_sample, field) -> None:
    good = SampleJob(prompt=PROMPT, num_samples=1, params=SampleParams(max_tokens=1))
    bad = SampleJob(prompt=LONG, num_samples=1, params=SampleParams(max_tokens=1), scoring=PromptScoring(**scoring),
                    topk_sample=topk_sample)
    with pytest.raises(ValueError, match=rf"jobs\[1\]\.{field}"):
        run_jobs([good, bad])
    assert score(run_jobs, topk=4096).topk_prompt.token_ids.shape == (len(LONG), 4096)  # k == vocab is fine


def test_every_option_survives_the_sdk(run_jobs) -> None:
    """Sampler output -> encode_sample_response -> the SDK's own decoder and response checks."""
    from tinker.lib.public_interfaces.sampling_client import (
        _check_prompt_alt_tokens_returned,
        _check_prompt_logprobs_last_n_honored,
        _tensor_data_to_model,
    )
    from tinker.proto.response_conv import deserialize_sample_response

    from schemas.tensors import decode_target_ids
    from schemas.tinker import TensorData as JsonTensorData
    from schemas.wire import SampledSequenceOut, encode_sample_response

    rows = len(LONG) - 1
    ids = torch.full((rows, 4), -1, dtype=torch.int64)
    ids[3, 2], ids[7, 0], ids[10, 3] = 11, 22, 33
    from tinker import types

    sdk_target = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert sdk_target.sparse_crow_indices is not None
    # As the gateway sees it: the SDK's JSON form of the tensor, parsed by our pydantic model.
    wire_json = _tensor_data_to_model(sdk_target).model_dump(mode="json", exclude_none=True)
    target = decode_target_ids(JsonTensorData(**wire_json), prompt_len=len(LONG), vocab_size=4096)
    n, k = 5, 3
    params = SampleParams(max_tokens=4, temperature=1.0, seed=71, stop_at_eos=False)
    out = score(run_jobs, num_samples=2, params=params, topk_sample=k, logprobs=True, last_n=n, topk=k,
                target_ids=target.ids, alt_tokens_k=k)
    body = encode_sample_response(
        [SampledSequenceOut(s.tokens, s.logprobs, s.stop_reason, topk=s.topk) for s in out.sequences],
        out.prompt_logprobs,
        topk_prompt_logprobs=out.topk_prompt,
        target_prompt_logprobs=out.target_prompt_logprobs,
        target_prompt_logprobs_csr=target.csr,
        prompt_alt_tokens=(out.alt_tokens, out.alt_logprobs),
    )
    res = deserialize_sample_response(body)
    _check_prompt_alt_tokens_returned(res, k)
    _check_prompt_logprobs_last_n_honored(res, n)
    assert res.prompt_logprobs[: len(LONG) - n] == [None] * (len(LONG) - n)
    np.testing.assert_allclose(res.prompt_logprobs[-n:], out.prompt_logprobs[-n:], atol=1e-6)
    assert res.topk_prompt_logprobs[: len(LONG) - n] == [None] * (len(LONG) - n)
    assert [t for t, _ in res.topk_prompt_logprobs[-1]] == out.topk_prompt.token_ids[-1].tolist()
    for s, ours in zip(res.sequences, out.sequences):
        assert s.tokens == ours.tokens
        assert [t for row in s.topk_logprobs for t, _ in row] == ours.topk.token_ids.ravel().tolist()
    # The target comes back sparse, with the request's own layout, and densifies like the request.
    tp = res.target_prompt_logprobs
    assert tp.shape == [rows, 4] and tp.sparse_crow_indices == sdk_target.sparse_crow_indices
    assert tp.sparse_col_indices == sdk_target.sparse_col_indices
    dense = tp.to_torch().numpy()
    np.testing.assert_allclose(dense, out.target_prompt_logprobs, atol=0)
    assert dense[3, 2] < 0 and dense[7, 0] < 0 and dense[10, 3] < 0 and (dense[ids.numpy() == -1] == 0).all()
    alt = res.prompt_alt_tokens
    np.testing.assert_array_equal(alt.tokens.to_numpy(), out.alt_tokens)
    np.testing.assert_array_equal(alt.logprobs.to_numpy(), out.alt_logprobs)
    assert alt.tokens.shape == [rows, k]


# =================================================================================================
# Batching: several requests in one prefill + decode
# =================================================================================================
def _mixed_jobs(temperature: float | None) -> list[SampleJob]:
    """Different prompts, lengths, num_samples, max_tokens, temperatures, filters, seeds, stops."""
    def params(i: int, **kw) -> SampleParams:
        t = temperature if temperature is not None else (1.0, 0.7, 1.3, 0.9, 1.1)[i]
        return SampleParams(**{"temperature": t, "seed": 100 + i, "stop_at_eos": False, **kw})

    target = np.full((len(LONG) - 1, 2), -1, dtype=np.int64)
    target[4] = [1, 2]
    return [
        SampleJob(PROMPT, 3, params(0, max_tokens=8), PromptScoring(logprobs=True, topk=2)),
        SampleJob(LONG, 2, params(1, max_tokens=5, top_k=20), PromptScoring(logprobs=True, last_n=3, target_ids=target),
                  topk_sample=3),
        SampleJob([9, 8], 1, params(2, max_tokens=11, top_p=0.5), PromptScoring(alt_tokens_k=2)),
        SampleJob([42], 2, params(3, max_tokens=0), PromptScoring(logprobs=True)),
        SampleJob(LONG[:7], 4, params(4, max_tokens=6, stop_tokens=(LONG[0],))),
    ]


def _assert_same_scoring(a: SampleOutput, b: SampleOutput) -> None:
    if a.prompt_logprobs is None:
        assert b.prompt_logprobs is None
    else:
        np.testing.assert_allclose(a.prompt_logprobs, b.prompt_logprobs, atol=1e-5, rtol=0)
    for x, y in ((a.target_prompt_logprobs, b.target_prompt_logprobs), (a.alt_logprobs, b.alt_logprobs)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    if a.topk_prompt is not None:
        np.testing.assert_allclose(a.topk_prompt.logprobs, b.topk_prompt.logprobs, atol=1e-5, rtol=0)


def test_batched_greedy_equals_each_request_alone(trainer, run_jobs) -> None:
    jobs = _mixed_jobs(temperature=0.0)
    batched = run_jobs(jobs)
    assert len(batched) == len(jobs)
    for job, got in zip(jobs, batched):
        alone = run_jobs([job])[0]
        assert len(got.sequences) == job.num_samples
        _assert_same_scoring(alone, got)
        for a, b in zip(alone.sequences, got.sequences):
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            assert len(b.tokens) <= job.params.max_tokens
        # Left padding changes nothing: the batched logprobs are those of an uncached pass.
        for b in got.sequences:
            if b.tokens:
                np.testing.assert_allclose(b.logprobs, scored(trainer, list(job.prompt), b.tokens), atol=1e-4, rtol=0)


def test_batched_seeded_sampling_matches_alone(trainer, run_jobs) -> None:
    """Each request draws from its own generator: batching it with others changes its tokens
    only through float rounding of the padded batch (never observed on the tiny model: the
    measured match rate is 100%; a flip needs a uniform draw within ~1e-7 of a CDF boundary)."""
    jobs = _mixed_jobs(temperature=None)
    batched = run_jobs(jobs)
    rows = same = 0
    for job, got in zip(jobs, batched):
        alone = run_jobs([job])[0]
        _assert_same_scoring(alone, got)
        if job.scoring.alt_tokens_k:
            np.testing.assert_array_equal(alone.alt_tokens, got.alt_tokens)
        for a, b in zip(alone.sequences, got.sequences):
            rows += 1
            if a.tokens == b.tokens:
                same += 1
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert same / rows >= 0.9, f"{same}/{rows} rows identical"
    # Batch order does not matter either.
    reversed_out = run_jobs(jobs[::-1])[::-1]
    assert [[s.tokens for s in o.sequences] for o in reversed_out] == [[s.tokens for s in o.sequences] for o in batched]
    # Rows that stopped on the stop token kept it; the others ran to max_tokens.
    for s in batched[4].sequences:
        assert (s.stop_reason == "stop") == (LONG[0] in s.tokens)
        assert s.stop_reason == "stop" or len(s.tokens) == 6


def test_batched_stops_are_per_row_and_per_request(run_jobs) -> None:
    free = run_jobs([SampleJob(PROMPT, 3, SampleParams(max_tokens=10, temperature=1.0, seed=81, stop_at_eos=False))])[0]
    stop = free.sequences[1].tokens[2]
    jobs = [
        SampleJob(PROMPT, 3, SampleParams(max_tokens=10, temperature=1.0, seed=81, stop_tokens=(stop,), stop_at_eos=False)),
        SampleJob(LONG, 2, SampleParams(max_tokens=3, temperature=1.0, seed=82, stop_at_eos=False)),
        SampleJob(LONG, 1, SampleParams(max_tokens=12, temperature=0.0, stop_at_eos=True), topk_sample=1),
    ]
    out = run_jobs(jobs, eos=(stop,))  # eos only stops the request that asks for it
    for f, s in zip(free.sequences, out[0].sequences):
        cut = f.tokens.index(stop) + 1 if stop in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut] and s.stop_reason == ("stop" if stop in f.tokens else "length")
    assert [len(s.tokens) for s in out[1].sequences] == [3, 3]
    assert [s.tokens for s in out[1].sequences] == [s.tokens for s in run_jobs([jobs[1]])[0].sequences]
    greedy = out[2].sequences[0]
    assert greedy.tokens == run_jobs([jobs[2]], eos=(stop,))[0].sequences[0].tokens
    assert run_jobs([]) == []


def test_sample_is_sample_batch_with_one_job(run, run_jobs) -> None:
    params = SampleParams(max_tokens=7, temperature=0.8, seed=91, stop_at_eos=False)
    a = run(params, num_samples=2, prompt_logprobs=True)
    b = run_jobs([SampleJob(PROMPT, 2, params, PromptScoring(logprobs=True))])[0]
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    np.testing.assert_array_equal(a.prompt_logprobs, b.prompt_logprobs)


def test_prompt_logits_of_a_batch_are_per_job_past_the_shared_budget(trainer, run_jobs, monkeypatch) -> None:
    """Past SHARED_PROMPT_LOGITS, jobs that score their prompt get their logits from a forward of
    their own (one job's at a time): the scores are the same as when the batch shares them."""
    jobs = _mixed_jobs(temperature=0.0)
    shared = run_jobs(jobs)
    monkeypatch.setattr(sampler, "SHARED_PROMPT_LOGITS", 0)
    own = run_jobs(jobs)
    for a, b in zip(shared, own):
        _assert_same_scoring(a, b)
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
