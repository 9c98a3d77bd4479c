"""The native Twinkle API's sampler app in-process (FastAPI TestClient, real runtime on tiny-qwen3):
the response shape of contract §4.4 (logprob pairs, prompt logprobs, new_input_feature aligned
for forward_backward), chats through the base model's template, set_template per session,
adapter_uri, and every bad input as a 4xx naming its field. The real client: tests/integration/
test_twinkle_client.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.errors import InvalidRequest
from server.ops import native_sampling as ns
from tests.support.http import local_client
from workers.types import SampledSequence, TopK

KEY, OTHER = "tml-native-sampler", "tml-native-sampler-other"
H = {"Twinkle-Authorization": f"Bearer {KEY}", "Authorization": f"Bearer {KEY}"}
H2 = {"Twinkle-Authorization": f"Bearer {OTHER}"}
SAMPLER = "/api/v1/sampler/tiny-qwen3/twinkle"
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("native-sampler")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1, long_poll_seconds=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def strict(text: str) -> dict:
    """Parsed as the client's simplejson would: NaN or Infinity fails the test."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"the answer holds {c}"))


def sample(client: TestClient, body: dict, headers: dict = H, status: int = 200) -> dict:
    answer = client.post(f"{SAMPLER}/sample", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    return strict(answer.text)


def fault(client: TestClient, body: dict, status: int, url: str = f"{SAMPLER}/sample", headers: dict = H) -> dict:
    answer = client.post(url, json=body, headers=headers)
    assert answer.status_code == status, answer.text
    found = answer.json()
    assert set(found) == {"detail", "field"} and "Traceback" not in answer.text
    return found


def chat_ids(tokenizer, messages: list[dict], generation: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def feature(ids: list[int] = PROMPT, labels: list[int] | None = None) -> dict:
    return {"input_ids": ids, "labels": labels if labels is not None else [-100] * len(ids)}


# ----- the shape of an answer --------------------------------------------------------------------
def test_a_sample_as_the_client_sends_it(client: TestClient) -> None:
    params = {"max_tokens": 6, "temperature": 1.0, "top_p": 1.0, "logprobs": 1, "num_samples": 2, "seed": 0}
    body = {"inputs": [feature()], "sampling_params": params, "adapter_name": "", "num_samples": 2}
    answer = sample(client, body)
    [out] = answer["samples"]
    assert len(out["sequences"]) == 2 and out["prompt_logprobs"] is None and out["topk_prompt_logprobs"] is None
    for seq in out["sequences"]:
        assert seq["stop_reason"] in ("length", "stop") and 1 <= len(seq["tokens"]) <= 6
        # logprobs=1: at each position, the sampled token's own pair
        assert [pairs[0][0] for pairs in seq["logprobs"]] == seq["tokens"]
        assert all(len(pairs) == 1 and pairs[0][1] <= 0 for pairs in seq["logprobs"])
        assert isinstance(seq["decoded"], str)
    assert sample(client, body) == answer  # seeded


def test_new_input_feature_is_the_prompt_and_the_completion_next_token_aligned(client: TestClient) -> None:
    labels = [6, -100, 8, -100, -100]  # a prompt with trained tokens of its own
    body = {"inputs": [feature(PROMPT, labels)], "sampling_params": {"max_tokens": 4, "temperature": 0}}
    seq = sample(client, body)["samples"][0]["sequences"][0]
    tokens, f = seq["tokens"], seq["new_input_feature"]
    n = len(PROMPT) + len(tokens)
    assert f["input_ids"] == PROMPT + tokens
    assert f["labels"] == labels[:-1] + tokens + [-100]  # Twinkle's concat_input_feature
    assert f == {**f, "attention_mask": [1] * n, "position_ids": list(range(n)), "length": n}
    # Aligned: the label at i is the token at i + 1 (or -100), so it feeds forward_backward as is.
    assert all(lab in (-100, f["input_ids"][i + 1]) for i, lab in enumerate(f["labels"][:-1]))
    assert ns.new_input_feature(ns.Prompt(PROMPT, [-100] * 5), [11, 12]).labels == [-100] * 4 + [11, 12, -100]


def test_top_k_logprobs_are_the_k_most_likely_most_likely_first(client: TestClient) -> None:
    body = {"inputs": [feature()], "sampling_params": {"max_tokens": 3, "temperature": 0, "logprobs": 4}}
    seq = sample(client, body)["samples"][0]["sequences"][0]
    one = sample(client, {**body, "sampling_params": {**body["sampling_params"], "logprobs": 1}})
    for i, pairs in enumerate(seq["logprobs"]):
        values = [lp for _, lp in pairs]
        assert len(pairs) == 4 and values == sorted(values, reverse=True)
        assert pairs[0][0] == seq["tokens"][i]  # greedy: the sampled token is the most likely
        assert pairs[0][1] == pytest.approx(one["samples"][0]["sequences"][0]["logprobs"][i][0][1], abs=1e-5)
    assert sample(client, {**body, "sampling_params": {"max_tokens": 3}})["samples"][0]["sequences"][0]["logprobs"] \
        is None


def test_prompt_logprobs_start_with_null_and_match_a_score_only_request(client: TestClient) -> None:
    body = {"inputs": [feature()], "sampling_params": {"max_tokens": 2, "prompt_logprobs": 3}}
    out = sample(client, body)["samples"][0]
    assert len(out["prompt_logprobs"]) == len(PROMPT) and out["prompt_logprobs"][0] is None
    assert out["topk_prompt_logprobs"][0] is None
    for pairs in out["topk_prompt_logprobs"][1:]:
        assert len(pairs) == 3 and [lp for _, lp in pairs] == sorted((lp for _, lp in pairs), reverse=True)
    scored = sample(client, {"inputs": [feature()], "sampling_params": {"max_tokens": 0, "prompt_logprobs": 1}})
    only = scored["samples"][0]
    np.testing.assert_allclose(only["prompt_logprobs"][1:], out["prompt_logprobs"][1:], atol=1e-5)
    [seq] = only["sequences"]  # score only: no tokens, the prompt as it came
    assert seq["tokens"] == [] and seq["logprobs"] is None and seq["decoded"] is None
    assert seq["new_input_feature"]["input_ids"] == PROMPT and seq["new_input_feature"]["labels"] == [-100] * 5
    assert sample(client, {**body, "sampling_params": {"prompt_logprobs": 0}})["samples"][0]["prompt_logprobs"] is None


def test_several_inputs_one_entry_each_and_max_new_tokens_is_max_tokens(client: TestClient) -> None:
    body = {"inputs": [feature(), feature([1, 2, 3])], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    samples = sample(client, body)["samples"]
    assert [len(s["sequences"][0]["tokens"]) for s in samples] == [2, 2]
    assert samples[1]["sequences"][0]["new_input_feature"]["input_ids"][:3] == [1, 2, 3]
    default = sample(client, {"inputs": feature(), "sampling_params": {"temperature": 0}})  # a single dict works too
    assert len(default["samples"][0]["sequences"][0]["tokens"]) <= ns.DEFAULT_MAX_TOKENS


def test_num_samples_from_sampling_params_else_the_top_level_and_a_conflict_is_400(client: TestClient) -> None:
    def count(body: dict) -> int:
        return len(sample(client, {"inputs": [feature()], **body})["samples"][0]["sequences"])

    assert count({"sampling_params": {"max_tokens": 1, "num_samples": 3}, "num_samples": 1}) == 3  # 1: the default
    assert count({"sampling_params": {"max_tokens": 1}, "num_samples": 2}) == 2
    assert count({"sampling_params": {"max_tokens": 1, "num_samples": 2}, "num_samples": 2}) == 2
    body = {"inputs": [feature()], "sampling_params": {"max_tokens": 1, "num_samples": 2}, "num_samples": 3}
    assert fault(client, body, 400)["field"] == "num_samples"
    too_many = {"inputs": [feature()] * 3, "sampling_params": {"max_tokens": 1, "num_samples": 50}}
    assert fault(client, too_many, 400)["field"] == "inputs"


def test_stops_end_a_sequence(client: TestClient) -> None:
    greedy = {"inputs": [feature()], "sampling_params": {"max_tokens": 5, "temperature": 0}}
    tokens = sample(client, greedy)["samples"][0]["sequences"][0]["tokens"]
    stopped = sample(client, {**greedy, "sampling_params": {**greedy["sampling_params"], "stop": [tokens[1]]}})
    seq = stopped["samples"][0]["sequences"][0]
    assert seq["tokens"] == tokens[: tokens.index(tokens[1]) + 1] and seq["stop_reason"] == "stop"
    for stop in ("x", ["x", "y"], []):
        sample(client, {**greedy, "sampling_params": {**greedy["sampling_params"], "stop": stop}})


# ----- chats and templates -----------------------------------------------------------------------
CHAT = [{"role": "user", "content": "hello"}]


def test_a_chat_is_rendered_by_the_base_models_template(client: TestClient, tokenizer) -> None:
    body = {"inputs": [{"messages": CHAT}], "sampling_params": {"max_tokens": 3, "temperature": 0}}
    seq = sample(client, body)["samples"][0]["sequences"][0]
    prompt = chat_ids(tokenizer, CHAT, True)
    f = seq["new_input_feature"]
    assert f["input_ids"] == prompt + seq["tokens"]
    assert f["labels"] == [-100] * (len(prompt) - 1) + seq["tokens"] + [-100]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    again = sample(client, {**body, "inputs": [{"messages": blocks}]})["samples"][0]["sequences"][0]
    assert again["new_input_feature"]["input_ids"] == f["input_ids"]
    # score only: the whole conversation, without the assistant's turn begun
    full = CHAT + [{"role": "assistant", "content": "hi"}]
    scored = sample(client, {"inputs": [{"messages": full}], "sampling_params": {"max_tokens": 0}})
    expected = chat_ids(tokenizer, full, False)
    assert scored["samples"][0]["sequences"][0]["new_input_feature"]["input_ids"] == expected


def test_set_template_is_per_session(client: TestClient, tokenizer) -> None:
    mine = client.post("/api/v1/twinkle/create_session", json={}, headers=H).json()["session_id"]
    theirs = client.post("/api/v1/twinkle/create_session", json={}, headers=H).json()["session_id"]
    body = {"template_cls": "Template", "adapter_name": "", "model_id": "ms://Qwen/Qwen3-0.6B",
            "default_system": "Be brief.", "enable_thinking": False, "max_length": 512}
    answer = client.post(f"{SAMPLER}/set_template", json=body, headers={**H, "X-Twinkle-Session-Id": mine})
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    chat = {"inputs": [{"messages": CHAT}], "sampling_params": {"max_tokens": 0}}

    def prompt(session: str) -> list[int]:
        answer = sample(client, chat, headers={**H, "X-Twinkle-Session-Id": session})
        return answer["samples"][0]["sequences"][0]["new_input_feature"]["input_ids"]

    system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert prompt(mine) == chat_ids(tokenizer, system, False)
    assert prompt(theirs) == chat_ids(tokenizer, CHAT, False)
    short = {"template_cls": "Qwen3_5Template", "max_length": 3}
    answer = client.post(f"{SAMPLER}/set_template", json=short, headers={**H, "X-Twinkle-Session-Id": theirs})
    assert answer.status_code == 200
    assert fault(client, chat, 400, headers={**H, "X-Twinkle-Session-Id": theirs})["field"] == "inputs[0].messages"


def test_set_template_refuses_unknown_names_options_and_sessions(client: TestClient) -> None:
    url = f"{SAMPLER}/set_template"
    found = fault(client, {"template_cls": "Llama2Template"}, 400, url)
    assert found["field"] == "template_cls" and "Template" in found["detail"] and "Qwen3_5Template" in found["detail"]
    assert fault(client, {"template_cls": "Template", "truncation_strategy": "left"}, 400, url)["field"] \
        == "truncation_strategy"
    assert fault(client, {"template_cls": "Template", "padding_free": True}, 400, url)["field"] == "padding_free"
    assert fault(client, {"template_cls": "Template", "max_length": "long"}, 400, url)["field"] == "max_length"
    assert fault(client, {}, 422, url)["field"] == "template_cls"
    session = {**H, "X-Twinkle-Session-Id": "sess-nope"}
    assert fault(client, {"template_cls": "Template"}, 404, url, session)["field"] == "X-Twinkle-Session-Id"


# ----- ops and bases -----------------------------------------------------------------------------
def test_create_unknown_bases_ops_and_refused_ops(client: TestClient) -> None:
    assert client.post(f"{SAMPLER}/create", json={}, headers=H).json() == {"status": "ok"}
    assert client.post(f"{SAMPLER}/create", headers=H).status_code == 200  # no body
    assert fault(client, {}, 404, "/api/v1/sampler/Qwen/Qwen3-0.6B/twinkle/create")["field"] == "base_model"
    found = fault(client, {}, 404, f"{SAMPLER}/sample_everything")
    assert found["field"] == "op" and "create, sample, sample_stream, set_template" in found["detail"]
    assert "never" in fault(client, {"patch_cls": "X"}, 400, f"{SAMPLER}/apply_patch")["detail"]
    assert "adapter_uri" in fault(client, {"adapter_name": "a", "config": {}}, 400,
                                  f"{SAMPLER}/add_adapter_to_sampler")["detail"]


# ----- bad input ---------------------------------------------------------------------------------
BAD = {
    "labels of another length": ({"inputs": [feature(PROMPT, [-100] * 4)]}, 400, "inputs[0].labels"),
    "labels not next-token aligned": ({"inputs": [feature(PROMPT, [5, -100, -100, -100, -100])]}, 400,
                                      "inputs[0].labels"),
    "a last label": ({"inputs": [feature(PROMPT, [-100] * 4 + [3])]}, 400, "inputs[0].labels"),
    "a float token id": ({"inputs": [{"input_ids": [1, 2.5, 3]}]}, 422, "inputs[0].input_ids.1"),
    "a string token id": ({"inputs": [{"input_ids": ["1"]}]}, 422, "inputs[0].input_ids.0"),
    "a bool token id": ({"inputs": [{"input_ids": [True]}]}, 422, "inputs[0].input_ids.0"),
    "a token outside the vocabulary": ({"inputs": [feature([1, 10**9])]}, 400, "inputs[0].input_ids"),
    "no input_ids": ({"inputs": [{"input_ids": []}]}, 422, "inputs[0].input_ids"),
    "neither ids nor messages": ({"inputs": [{"prompt": "hi"}]}, 400, "inputs[0]"),
    "no inputs": ({"inputs": []}, 400, "inputs"),
    "an image": ({"inputs": [{**feature(), "images": ["a.png"]}]}, 400, "inputs[0].images"),
    "an unknown role": ({"inputs": [{"messages": [{"role": "robot", "content": "x"}]}]}, 422,
                        "inputs[0].messages.0.role"),
    "image content": ({"inputs": [{"messages": [{"role": "user", "content": [{"type": "image", "image": "x"}]}]}]},
                      400, "inputs[0].messages[0].content[0]"),
    "a negative temperature": ({"sampling_params": {"temperature": -1}}, 422, "sampling_params.temperature"),
    "top_p 0": ({"sampling_params": {"top_p": 0}}, 422, "sampling_params.top_p"),
    "top_k 0": ({"sampling_params": {"top_k": 0}}, 400, "sampling_params.top_k"),
    "a repetition penalty": ({"sampling_params": {"repetition_penalty": 1.1}}, 400,
                             "sampling_params.repetition_penalty"),
    "negative max_tokens": ({"sampling_params": {"max_tokens": -1}}, 422, "sampling_params.max_tokens"),
    "max_tokens past the context": ({"sampling_params": {"max_tokens": 10**6}}, 400, "sampling_params.max_tokens"),
    "a float num_samples": ({"sampling_params": {"num_samples": 1.5}}, 422, "sampling_params.num_samples"),
    "logprobs past the vocabulary": ({"sampling_params": {"logprobs": 10**7}}, 400, "sampling_params.logprobs"),
    "mixed stops": ({"sampling_params": {"stop": ["x", 3]}}, 400, "sampling_params.stop"),
    "an empty stop string": ({"sampling_params": {"stop": [""]}}, 400, "sampling_params.stop"),
    "a hub adapter_uri": ({"adapter_uri": "ms://someone/lora"}, 400, "adapter_uri"),
    "an unknown checkpoint": ({"adapter_uri": "twinkle://sess-x-A/sampler_weights/s"}, 404, "adapter_uri"),
    "a malformed twinkle path": ({"adapter_uri": "twinkle://only-a-run"}, 400, "adapter_uri"),
}


@pytest.mark.parametrize("change,status,field", BAD.values(), ids=BAD.keys())
def test_bad_input_is_a_4xx_naming_the_field(client: TestClient, change: dict, status: int, field: str) -> None:
    body = {"inputs": [feature()], "sampling_params": {"max_tokens": 2}, **change}
    assert fault(client, body, status)["field"] == field


def test_nan_in_a_request_is_refused(client: TestClient) -> None:
    raw = b'{"inputs": [{"input_ids": [1, 2]}], "sampling_params": {"temperature": NaN}}'
    answer = client.post(f"{SAMPLER}/sample", content=raw, headers={**H, "Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] == "sampling_params.temperature"
    answer = client.post(f"{SAMPLER}/sample", content=b"{nope", headers={**H, "Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] == "body"


# ----- adapter_uri -------------------------------------------------------------------------------
def saved_sampler_weights(client: TestClient, key: str) -> str:
    """A LoRA adapter's sampler checkpoint, made through the Tinker API; its tinker:// path."""
    headers = {"X-API-Key": key}

    def result(request_id: str) -> dict:
        return client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers).json()

    body = {"sdk_version": "0.38.0", "tags": [], "user_metadata": {}}
    session = client.post("/api/v1/create_session", json=body, headers=headers).json()["session_id"]
    create = {"session_id": session, "model_seq_id": 0, "base_model": "tiny-qwen3", "lora_config": {"rank": 2}}
    created = client.post("/api/v1/create_model", json=create, headers=headers)
    model_id = result(created.json()["request_id"])["model_id"]
    save = client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "path": "s1"}, headers=headers)
    return result(save.json()["request_id"])["path"]


def test_adapter_uri_samples_the_callers_checkpoint_by_either_scheme(client: TestClient) -> None:
    path = saved_sampler_weights(client, KEY)
    body = {"inputs": [feature()], "sampling_params": {"max_tokens": 4, "temperature": 0, "logprobs": 1}}
    base = sample(client, body)["samples"][0]["sequences"][0]
    for uri in (path.replace("tinker://", "twinkle://"), path):
        seq = sample(client, {**body, "adapter_uri": uri})["samples"][0]["sequences"][0]
        assert seq["tokens"] == base["tokens"]  # a new adapter's B is zero: the base model's greedy tokens
    other = fault(client, {**body, "adapter_uri": path.replace("tinker://", "twinkle://")}, 404, headers=H2)
    assert other["field"] == "adapter_uri"  # another tenant's checkpoint is not found


# ----- pure parts --------------------------------------------------------------------------------
def test_labels_are_checked_position_by_position() -> None:
    ns.check_labels([1, 2, 3], [2, 3, -100], "labels")
    ns.check_labels([1, 2, 3], [-100, -100, -100], "labels")
    with pytest.raises(InvalidRequest, match=r"labels\[1\] is 2.*input_ids\[2\] = 3"):
        ns.check_labels([1, 2, 3], [2, 2, -100], "labels")


def test_pairs_leave_out_empty_top_k_cells_and_refuse_non_finite_values() -> None:
    topk = TopK(token_ids=np.array([[4, 0]]), logprobs=np.array([[-0.5, -99999.0]], dtype=np.float32))
    seq = SampledSequence(tokens=[4], logprobs=[-0.5], stop_reason="length", topk=topk)
    assert ns.sampled_logprobs(seq, 2) == [[(4, -0.5)]]
    assert ns.sampled_logprobs(seq, 1) == [[(4, -0.5)]] and ns.sampled_logprobs(seq, None) is None
    with pytest.raises(Exception, match="non-finite"):
        ns.sampled_logprobs(SampledSequence(tokens=[4], logprobs=[float("nan")], stop_reason="stop"), 1)


# ----- sample_stream -----------------------------------------------------------------------------
def test_sample_stream_sends_the_text_as_ndjson_deltas(client: TestClient, tokenizer) -> None:
    greedy = {"max_tokens": 6, "temperature": 0.0}
    whole = sample(client, {"inputs": [feature()], "sampling_params": greedy})["samples"][0]["sequences"][0]
    answer = client.post(f"{SAMPLER}/sample_stream", json={"inputs": [feature()], "sampling_params": greedy}, headers=H)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
    lines = [strict(line) for line in answer.text.splitlines()]
    assert all(set(line) == {"delta", "finish_reason"} for line in lines)
    assert [line["finish_reason"] for line in lines[:-1]] == [None] * (len(lines) - 1)
    assert lines[-1]["finish_reason"] == whole["stop_reason"]
    assert "".join(line["delta"] for line in lines) == tokenizer.decode(whole["tokens"], skip_special_tokens=True)


def test_sample_stream_takes_one_input_and_one_sequence(client: TestClient) -> None:
    url = f"{SAMPLER}/sample_stream"
    assert fault(client, {"inputs": [feature(), feature()]}, 400, url=url)["field"] == "inputs"
    assert fault(client, {"inputs": [feature()], "sampling_params": {"num_samples": 2}}, 400, url=url)["field"] == \
        "num_samples"
