"""SamplingClient.sample's scoring options through the unmodified SDK, each checked against
compute_logprobs, the full next-token distribution or the sampled logprobs; many concurrent
samples; and a bad prompt_logprobs_last_n refused with a message naming it."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import tinker
import torch
from tinker import types

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
ONE_TOKEN = types.SamplingParams(max_tokens=1, temperature=1.0, seed=5)  # a prefill, in effect


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def sampler(server):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-sampling-options")
    yield sc.create_sampling_client(base_model=BASE).result()
    sc.close("success").result()


@pytest.fixture(scope="module")
def prompt(token_rows) -> list[int]:
    return token_rows[1]


@pytest.fixture(scope="module")
def scored(sampler, prompt) -> np.ndarray:
    """compute_logprobs of the prompt: entry i is log p(prompt[i] | prompt[:i]); entry 0 is NaN."""
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert lps[0] is None and len(lps) == len(prompt)
    return np.array([np.nan, *lps[1:]], dtype=np.float64)


@pytest.fixture(scope="module")
def distribution(sampler, prompt, vocab) -> np.ndarray:
    """The model's full next-token logprobs at every prompt position, [len(prompt), vocab] (row 0
    NaN), from topk_prompt_logprobs = the vocabulary size."""
    result = sampler.sample(types.ModelInput.from_ints(prompt), 1, ONE_TOKEN, include_prompt_logprobs=True,
                            topk_prompt_logprobs=vocab).result()
    rows = result.topk_prompt_logprobs
    assert len(rows) == len(prompt) and rows[0] is None
    dist = np.full((len(prompt), vocab), np.nan)
    for i, row in enumerate(rows[1:], start=1):
        ids = np.array([t for t, _ in row])
        lps = np.array([lp for _, lp in row], dtype=np.float64)
        assert len(row) == vocab and np.array_equal(np.sort(ids), np.arange(vocab)), i  # every token once
        assert np.all(np.diff(lps) <= 0), f"row {i} is not sorted by logprob"
        dist[i, ids] = lps
    return dist


def sample(sampler, prompt: list[int], params: types.SamplingParams = ONE_TOKEN, n: int = 1, **options):
    return sampler.sample(types.ModelInput.from_ints(prompt), n, params, **options).result()


def test_prompt_logprobs_equal_compute_logprobs(sampler, prompt, scored) -> None:
    result = sample(sampler, prompt, include_prompt_logprobs=True)
    assert len(result.sequences) == 1
    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    np.testing.assert_allclose(np.array(result.prompt_logprobs[1:], dtype=np.float64), scored[1:], atol=1e-4)
    assert sample(sampler, prompt).prompt_logprobs is None  # not asked for, not sent


def test_full_topk_is_a_normalised_distribution_consistent_with_compute_logprobs(
    sampler, prompt, scored, distribution
) -> None:
    rows = np.arange(1, len(prompt))
    np.testing.assert_allclose(np.logaddexp.reduce(distribution[1:], axis=1), 0.0, atol=1e-3)
    np.testing.assert_allclose(distribution[rows, np.array(prompt)[rows]], scored[1:], atol=1e-4)
    # A narrower top-k is the head of the full one: top-1 is the max.
    top3 = sample(sampler, prompt, topk_prompt_logprobs=3).topk_prompt_logprobs
    assert len(top3) == len(prompt) and top3[0] is None
    for i in rows:
        best = np.argsort(-distribution[i])[:3]
        assert [t for t, _ in top3[i]] == best.tolist(), i
        np.testing.assert_allclose([lp for _, lp in top3[i]], distribution[i, best], atol=1e-5)
        assert top3[i][0][1] == pytest.approx(np.nanmax(distribution[i]), abs=1e-5)


def test_prompt_logprobs_last_n_scores_only_the_suffix(sampler, prompt, scored) -> None:
    n, last = len(prompt), 3
    result = sample(sampler, prompt, include_prompt_logprobs=True, topk_prompt_logprobs=2, prompt_logprobs_last_n=last)
    lps, top = result.prompt_logprobs, result.topk_prompt_logprobs
    assert len(lps) == len(top) == n
    assert all(x is None for x in lps[: n - last]) and all(x is None for x in top[: n - last])
    np.testing.assert_allclose(np.array(lps[n - last:], dtype=np.float64), scored[n - last:], atol=1e-4)
    for i in range(n - last, n):
        assert len(top[i]) == 2 and top[i][0][1] >= scored[i] - 1e-5


def test_topk_sample_logprobs_greedy_rows_start_with_the_sampled_token(sampler, prompt) -> None:
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    seq = sample(sampler, prompt[:5], params, topk_sample_logprobs=3).sequences[0]
    assert len(seq.tokens) == 6 and len(seq.topk_logprobs) == 6
    for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
        assert len(row) == 3 and row[0][0] == token
        assert row[0][1] == pytest.approx(lp, abs=1e-5)
        assert row[0][1] >= row[1][1] >= row[2][1]


def test_topk_sample_logprobs_contain_the_sampled_token_when_k_is_the_vocabulary(sampler, prompt, vocab) -> None:
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=77, stop=[])
    result = sample(sampler, prompt[:5], params, n=2, topk_sample_logprobs=vocab)
    assert len(result.sequences) == 2
    for seq in result.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 4
        for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            found = dict(row)
            assert len(found) == vocab and found[token] == pytest.approx(lp, abs=1e-5)
            assert row[0][1] == pytest.approx(max(found.values()))


def target_ids(prompt: list[int], vocab: int) -> torch.Tensor:
    """[len(prompt) - 1, 3]: the actual next token, another token, and -1 (nothing) but in row 0."""
    n = len(prompt)
    ids = torch.full((n - 1, 3), -1, dtype=torch.int64)
    ids[:, 0] = torch.tensor(prompt[1:])
    ids[:, 1] = (torch.tensor(prompt[1:]) * 7 + 3) % vocab
    ids[0, 2] = 5
    return ids


def expected_targets(ids: torch.Tensor, distribution: np.ndarray) -> np.ndarray:
    ids = ids.numpy()
    rows = np.arange(ids.shape[0])[:, None] + 1  # row i scores prompt position i + 1
    return np.where(ids >= 0, distribution[rows, np.maximum(ids, 0)], 0.0)


def test_dense_target_prompt_logprobs(sampler, prompt, vocab, scored, distribution) -> None:
    ids = target_ids(prompt, vocab)
    result = sample(sampler, prompt, include_prompt_logprobs=True, target_prompt_logprobs=types.TensorData.from_torch(ids))
    got = result.target_prompt_logprobs
    assert got.dtype == "float32" and list(got.shape) == [len(prompt) - 1, 3] and got.sparse_crow_indices is None
    values = got.to_numpy()
    np.testing.assert_allclose(values[:, 0], scored[1:], atol=1e-4)  # the actual token: compute_logprobs
    np.testing.assert_allclose(values, expected_targets(ids, distribution), atol=1e-4)
    assert np.all(values[1:, 2] == 0.0)  # -1 cells get 0.0


def test_sparse_csr_target_prompt_logprobs(sampler, prompt, vocab, scored, distribution) -> None:
    n = len(prompt)
    ids = torch.full((n - 1, 4), -1, dtype=torch.int64)
    ids[n - 2, 0] = prompt[-1]  # the last prompt token
    ids[2, 1], ids[2, 3] = 17, prompt[3]
    ids[4, 2] = vocab - 1
    request = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert request.sparse_crow_indices is not None  # really sent as CSR
    # The same cells written out by hand as CSR (row pointers, columns, values).
    rows, cols = np.nonzero(ids.numpy() >= 0)
    explicit = types.TensorData(data=ids.numpy()[rows, cols].tolist(), dtype="int64", shape=[n - 1, 4],
                                sparse_crow_indices=np.searchsorted(rows, np.arange(n), side="left").tolist(),
                                sparse_col_indices=cols.tolist())
    assert explicit.sparse_crow_indices == request.sparse_crow_indices
    assert explicit.sparse_col_indices == request.sparse_col_indices
    for tensor in (request, explicit):
        got = sample(sampler, prompt, target_prompt_logprobs=tensor).target_prompt_logprobs
        assert got.dtype == "float32" and list(got.shape) == [n - 1, 4]
        assert got.sparse_crow_indices == request.sparse_crow_indices  # the request's layout, repeated
        assert got.sparse_col_indices == request.sparse_col_indices
        values = got.to_numpy()
        np.testing.assert_allclose(values, expected_targets(ids, distribution), atol=1e-4)
        assert values[n - 2, 0] == pytest.approx(scored[-1], abs=1e-4)
        assert values[2, 3] == pytest.approx(scored[3], abs=1e-4)


def test_prompt_alt_tokens_are_draws_with_the_models_logprobs(sampler, prompt, vocab, distribution) -> None:
    k = 4
    params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=123)
    alt = sample(sampler, prompt, params, prompt_alt_tokens_k=k).prompt_alt_tokens
    tokens, lps = alt.tokens.to_numpy(), alt.logprobs.to_numpy()
    assert alt.tokens.dtype == "int64" and alt.logprobs.dtype == "float32"
    assert tokens.shape == lps.shape == (len(prompt) - 1, k)
    assert tokens.min() >= 0 and tokens.max() < vocab
    rows = np.arange(1, len(prompt))[:, None]
    np.testing.assert_allclose(lps, distribution[rows, tokens], atol=1e-4)
    assert len(np.unique(tokens)) > k  # draws, not one repeated token
    again = sample(sampler, prompt, params, prompt_alt_tokens_k=k).prompt_alt_tokens
    assert np.array_equal(again.tokens.to_numpy(), tokens)  # seeded
    greedy = sample(sampler, prompt, types.SamplingParams(max_tokens=1, temperature=0.0), prompt_alt_tokens_k=2)
    argmax = np.nanargmax(distribution[1:], axis=1)
    assert np.array_equal(greedy.prompt_alt_tokens.tokens.to_numpy(), np.stack([argmax, argmax], axis=1))


def test_sixteen_concurrent_samples_all_succeed(sampler, token_rows) -> None:
    prompts = [row[: 3 + i % 5] for i, row in enumerate(token_rows * 4)]

    async def run() -> list[types.SampleResponse]:
        return await asyncio.gather(*(
            sampler.sample(types.ModelInput.from_ints(p), 2, types.SamplingParams(max_tokens=8, seed=i, stop=[]))
            for i, p in enumerate(prompts)
        ))

    results = asyncio.run(run())
    assert len(results) == 16
    for result in results:
        assert len(result.sequences) == 2
        for seq in result.sequences:
            assert len(seq.tokens) == 8 and len(seq.logprobs) == 8
    for p, result in list(zip(prompts, results))[:4]:  # batched with others, still the model's own logprobs
        seq = result.sequences[1]
        rescored = sampler.compute_logprobs(types.ModelInput.from_ints(p + seq.tokens)).result()
        np.testing.assert_allclose(seq.logprobs, rescored[len(p):], atol=1e-4)


def test_prompt_logprobs_last_n_longer_than_the_prompt_is_refused(sampler, prompt) -> None:
    for last_n in (len(prompt) + 1, len(prompt)):  # at most len(prompt) - 1 positions can be scored
        with pytest.raises(tinker.BadRequestError) as err:
            sample(sampler, prompt, include_prompt_logprobs=True, prompt_logprobs_last_n=last_n)
        body = err.value.body
        assert isinstance(body, dict) and body.get("category") == "user", body
        assert body.get("field") == "prompt_logprobs_last_n", body
        assert "prompt_logprobs_last_n" in body["error"] and str(len(prompt) - 1) in body["error"], body
