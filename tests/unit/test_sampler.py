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

from workers.sampler import sample
from workers.trainer import LoraTrainer, load_base_model
from workers.types import BaseModelInfo, LoraSpec, SampleOutput, SampleParams

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
