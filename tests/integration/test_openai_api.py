"""The OpenAI-compatible API (/v1) through the official `openai` client, against what the tinker
SDK samples with the same weights: text, logprobs, streams, n, stop strings, tenants, errors."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import tinker
from tinker import types

from tests.support.data import make_data
from tests.support.sdk import close

pytestmark = pytest.mark.slow
BASE, KEY, OTHER = "tiny-qwen3", "tml-openai", "tml-openai-other"
PROMPT = "def add(a, b):"
CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def trained(server, token_rows):
    """Named sampler weights after two steps, a tinker SamplingClient on them, and an unpublished
    and a published path."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    tc = sc.create_lora_training_client(BASE, rank=8, seed=5).result()
    data = make_data(token_rows)
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("openai-final").result().path
    shared = tc.save_weights_for_sampler("openai-shared").result().path
    tinker.RestClient(base_url=server.base_url, api_key=KEY).publish_checkpoint_from_tinker_path(shared).result()
    yield path, shared, sc.create_sampling_client(model_path=path).result()
    close(sc)


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def greedy(sampler: tinker.SamplingClient, prompt: list[int], max_tokens: int = 8) -> types.SampledSequence:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]


def chat_prompt(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_models_lists_the_base_model_and_the_callers_own_sampler_weights(server, trained) -> None:
    path, shared, _ = trained
    mine = {m.id: m for m in client(server).models.list()}
    assert BASE in mine and path in mine and shared in mine
    assert mine[path].object == "model" and mine[path].created > 0
    theirs = {m.id for m in client(server, OTHER).models.list()}
    assert BASE in theirs and path not in theirs and shared not in theirs  # own checkpoints only
    assert client(server).models.retrieve(path).id == path


def test_completion_is_the_decoding_of_the_sdks_greedy_sample_with_its_logprobs(server, trained, tokenizer) -> None:
    path, _, sampler = trained
    prompt = tokenizer(PROMPT)["input_ids"]
    seq = greedy(sampler, prompt)
    out = client(server).completions.create(model=path, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == path
    assert choice.text == tokenizer.decode(seq.tokens, skip_special_tokens=True)
    returned = len(choice.logprobs.token_logprobs)
    assert returned == len(seq.tokens) - (choice.finish_reason == "stop")  # without the EOS it stopped on
    np.testing.assert_allclose(choice.logprobs.token_logprobs, seq.logprobs[:returned], atol=1e-5, rtol=0)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(seq.tokens)
    by_ids = client(server).completions.create(model=path, prompt=prompt, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == choice.text


def test_a_stop_string_ends_the_text_before_it(server, trained) -> None:
    path, _, _ = trained
    full = client(server).completions.create(model=path, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = full[3:6]
    cut = client(server).completions.create(model=path, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_completion_uses_the_chat_template_and_streams_the_same_text(server, trained, tokenizer) -> None:
    path, _, sampler = trained
    seq = greedy(sampler, chat_prompt(tokenizer))
    whole = client(server).chat.completions.create(model=path, messages=CHAT, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == tokenizer.decode(seq.tokens, skip_special_tokens=True)
    assert whole.usage.prompt_tokens == len(chat_prompt(tokenizer))
    chunks = list(client(server).chat.completions.create(
        model=path, messages=CHAT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_streamed_completion_joins_to_the_whole_one(server, trained) -> None:
    path, _, _ = trained
    whole = client(server).completions.create(model=path, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client(server).completions.create(model=path, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_logprobs_are_the_sdks_sampled_logprobs(server, trained, tokenizer) -> None:
    path, _, sampler = trained
    seq = greedy(sampler, chat_prompt(tokenizer))
    out = client(server).chat.completions.create(
        model=path, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    np.testing.assert_allclose([t.logprob for t in content], seq.logprobs[: len(content)], atol=1e-5, rtol=0)
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)


def test_n_gives_one_choice_per_sample_and_a_batch_of_prompts_one_per_prompt(server, trained) -> None:
    path, _, _ = trained
    out = client(server).chat.completions.create(model=path, messages=CHAT, max_tokens=6, n=2, seed=3, temperature=1)
    assert [c.index for c in out.choices] == [0, 1]
    again = client(server).chat.completions.create(model=path, messages=CHAT, max_tokens=6, n=2, seed=3, temperature=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    batch = client(server).completions.create(model=BASE, prompt=[PROMPT, "import os"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: the same for both samples


def test_another_tenants_checkpoint_is_not_found_until_published(server, trained) -> None:
    path, shared, _ = trained
    with pytest.raises(openai.NotFoundError) as err:
        client(server, OTHER).completions.create(model=path, prompt=PROMPT, max_tokens=4)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert err.value.body["type"] == "invalid_request_error" and "Traceback" not in str(err.value.body)
    out = client(server, OTHER).completions.create(model=shared, prompt=PROMPT, max_tokens=4, temperature=0)
    assert len(out.choices) == 1


def post(server, route: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}/v1/{route}", json=body, headers=headers, timeout=60)


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("completions", {"prompt": PROMPT}, 400, "model"),
        ("completions", {"model": "no-such-model", "prompt": PROMPT}, 400, "model"),
        ("completions", {"model": "tinker://nope:train:0/sampler_weights/x", "prompt": PROMPT}, 404, "model"),
        ("completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 100_000}, 400, "max_tokens"),
        ("completions", {"model": BASE, "prompt": PROMPT, "echo": True}, 400, "echo"),
        ("completions", {"model": BASE, "prompt": [5, 99_999]}, 400, "prompt"),
        ("completions", {"model": BASE, "prompt": PROMPT, "logit_bias": {"5": 10}}, 400, "logit_bias"),
        ("chat/completions", {"model": BASE, "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
        ("chat/completions", {"model": BASE, "messages": CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("chat/completions", {"model": BASE, "messages": CHAT, "max_completion_tokens": 100_000, "stream": True},
         400, "max_completion_tokens"),
        ("chat/completions", {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         400, "messages[0].content[0]"),
        ("chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
        ("chat/completions", {"model": BASE, "messages": CHAT, "n": 128, "max_tokens": 4000, "logprobs": True,
                              "top_logprobs": 20}, 400, "top_logprobs"),
    ],
)
def test_bad_input_is_a_4xx_in_openais_shape_naming_the_field(server, route, body, status, param) -> None:
    assert openai_error(post(server, route, body), status)["param"] == param


def test_harmless_parameters_are_accepted(server) -> None:
    body = {"model": BASE, "messages": CHAT, "max_tokens": 2, "user": "me", "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "frequency_penalty": 0}
    assert post(server, "chat/completions", body).status_code == 200


def test_a_bad_or_missing_key_is_401(server) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "not-a-tml-key").models.list()
    assert openai_error(post(server, "completions", {"model": BASE, "prompt": PROMPT}, key=None), 401)["type"] == \
        "authentication_error"
    x_api_key = httpx.get(f"{server.base_url}/v1/models", headers={"X-API-Key": KEY}, timeout=30)
    assert x_api_key.status_code == 200  # the Tinker header works too
