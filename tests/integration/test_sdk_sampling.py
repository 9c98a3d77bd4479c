"""Sampling through the unmodified SDK: ephemeral and named sampler weights, the bare base model,
compute_logprobs, seeds and stop conditions. Every test here also runs against the older SDKs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
from tinker import types

from tests.support.data import make_data
from tests.support.sdk import close, resolve, rest_client

pytestmark = [pytest.mark.slow, pytest.mark.sdk]
BASE = "tiny-qwen3"


@pytest.fixture(scope="module")
def trained(server, token_rows):
    """A model after two steps, and its three kinds of sampling client."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-sampling")
    tc = resolve(sc.create_lora_training_client(BASE, rank=8, seed=5))
    data = make_data(token_rows)
    for _ in range(2):
        fb = tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        fb.result()
    path = tc.save_weights_for_sampler("after-2").result().path
    clients = {
        "ephemeral": resolve(tc.save_weights_and_get_sampling_client()),
        "named": resolve(sc.create_sampling_client(model_path=path)),
        "base": resolve(sc.create_sampling_client(base_model=BASE)),
    }
    yield tc, clients, path, sc
    close(sc)


def check_sequences(result: types.SampleResponse, n: int, max_tokens: int) -> None:
    assert len(result.sequences) == n
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= max_tokens
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)
        assert all(math.isfinite(lp) and lp <= 0 for lp in seq.logprobs)
        assert seq.stop_reason in ("stop", "length")


@pytest.mark.parametrize("kind", ["ephemeral", "named", "base"])
def test_each_sampling_client_samples_num_samples_with_logprobs(trained, token_rows, kind) -> None:
    _, clients, *_ = trained
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=11)
    result = clients[kind].sample(types.ModelInput.from_ints(token_rows[0][:6]), 3, params).result()
    check_sequences(result, 3, 12)


def test_same_seed_same_tokens_and_adapter_changes_the_distribution(trained, token_rows) -> None:
    _, clients, *_ = trained
    prompt = types.ModelInput.from_ints(token_rows[2][:5])
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=1234, stop=[])
    tokens = {k: [s.tokens for s in c.sample(prompt, 2, params).result().sequences] for k, c in clients.items()}
    again = [s.tokens for s in clients["named"].sample(prompt, 2, params).result().sequences]
    assert again == tokens["named"]
    assert tokens["ephemeral"] == tokens["named"]  # the same weights, saved two ways
    lp = {k: c.compute_logprobs(prompt).result() for k, c in clients.items()}
    assert lp["named"] != pytest.approx(lp["base"], abs=1e-3)  # the adapter is really applied


def test_compute_logprobs_equals_the_trainers_forward(trained, token_rows) -> None:
    tc, clients, *_ = trained
    row = token_rows[1]
    logprobs = clients["named"].compute_logprobs(types.ModelInput.from_ints(row)).result()
    forward = tc.forward(make_data([row]), "cross_entropy").result()
    expected = forward.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs[0] is None and len(logprobs) == len(row)
    np.testing.assert_allclose(np.array(logprobs[1:], dtype=np.float32), expected, atol=1e-4, rtol=0)


def test_sampled_logprobs_are_the_models_own(trained, token_rows) -> None:
    _, clients, *_ = trained
    prompt = token_rows[3][:4]
    seq = clients["named"].sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=6, temperature=0.7, seed=9, stop=[])
    ).result().sequences[0]
    scored = clients["named"].compute_logprobs(types.ModelInput.from_ints(prompt + seq.tokens)).result()
    np.testing.assert_allclose(seq.logprobs, scored[len(prompt):], atol=1e-4, rtol=0)


def test_greedy_stop_tokens_and_max_tokens(trained, token_rows) -> None:
    _, clients, *_ = trained
    prompt = types.ModelInput.from_ints(token_rows[0][:6])
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    first, second = (clients["base"].sample(prompt, 2, greedy).result() for _ in range(2))
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert first.sequences[0].tokens == first.sequences[1].tokens
    assert all(s.stop_reason == "length" and len(s.tokens) == 8 for s in first.sequences)
    stop_at = first.sequences[0].tokens[2]
    stopped = clients["base"].sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_at]))
    seq = stopped.result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens[-1] == stop_at
    assert seq.tokens == first.sequences[0].tokens[: first.sequences[0].tokens.index(stop_at) + 1]


def test_sampler_reports_its_base_model_and_path(trained, server) -> None:
    _, clients, path, sc = trained
    assert clients["named"].get_base_model() == BASE
    rest = rest_client(server, "tml-sampling", sc)
    # The SDK has no public getter for a client's sampler id; RestClient.get_sampler takes one.
    sampler = rest.get_sampler(clients["named"]._sampling_session_id).result()
    assert (sampler.base_model, sampler.model_path) == (BASE, path)
