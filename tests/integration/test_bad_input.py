"""Bad input gets a 4xx (or a user-category future error) whose message names the problem, and the
server keeps serving. Requests go through the SDK where it can send them, else raw HTTP. The tests
marked sdk also run against the older SDKs, whose forward_backward bodies are JSON."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.support.data import fwdbwd_proto, make_data
from tests.support.sdk import close, resolve

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
KEY_A, KEY_B = "tml-bad-input-a", "tml-bad-input-b"


@pytest.fixture(scope="module")
def client_a(server):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY_A)
    tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=0))
    yield tc
    close(sc)


def post(server, path: str, key: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key, **(headers or {})}
    return httpx.post(f"{server.base_url}/api/v1/{path}", headers=headers, timeout=30, **kwargs)


def assert_json_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["category"] == "user" and "Traceback" not in response.text
    for needle in needles:
        assert needle in body["error"], body
    return body


def test_malformed_protobuf(server, client_a) -> None:
    r = post(server, "forward_backward", KEY_A, content=b"\xff\xfe not a protobuf",
             headers={"Content-Type": "application/x-protobuf"})
    body = assert_json_error(r, 400, "ForwardBackwardRequest")
    assert body["field"] == "body"


def test_unknown_model_id(server, token_rows) -> None:
    r = post(server, "forward_backward", KEY_A, content=fwdbwd_proto("sess-nope:train:0", make_data(token_rows)))
    assert_json_error(r, 404, "sess-nope:train:0", "not found")


def test_another_keys_model_is_not_found(server, client_a, token_rows) -> None:
    proto = fwdbwd_proto(client_a.model_id, make_data(token_rows))
    owner = post(server, "forward_backward", KEY_A, content=proto)
    assert owner.status_code == 200
    stranger = post(server, "forward_backward", KEY_B, content=proto)
    assert_json_error(stranger, 404, "not found")
    assert_json_error(post(server, "get_info", KEY_B, json={"model_id": client_a.model_id}), 404, "not found")
    retrieve = post(server, "retrieve_future", KEY_B, json={"request_id": owner.json()["request_id"]})
    assert_json_error(retrieve, 404, "not found")
    mine = post(server, "retrieve_future", KEY_A, json={"request_id": owner.json()["request_id"]})
    assert mine.status_code == 200 and mine.headers["content-type"].startswith("application/x-protobuf")


@pytest.mark.sdk
def test_checkpoint_name_with_slash(client_a) -> None:
    with pytest.raises(tinker.UnprocessableEntityError) as err:
        client_a.save_state("runs/one").result()
    assert "path" in str(err.value) and "'/'" in str(err.value)


def test_unknown_loss_fn(client_a, token_rows) -> None:  # not sdk: 0.16.1 refuses it client-side
    with pytest.raises(tinker.BadRequestError) as err:
        client_a.forward_backward(make_data(token_rows), "not_a_loss").result()
    assert "unknown loss_fn 'not_a_loss'" in str(err.value) and "cross_entropy" in str(err.value)


@pytest.mark.sdk
def test_mismatched_target_tokens_and_weights(client_a, token_rows) -> None:
    row = token_rows[0]
    datum = types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                        loss_fn_inputs={"target_tokens": row[1:], "weights": np.ones(len(row) - 3, np.float32)})
    with pytest.raises(tinker.BadRequestError) as err:
        client_a.forward_backward([datum], "cross_entropy").result()
    assert "data[0].loss_fn_inputs.weights" in str(err.value) and f"{len(row) - 3} entries" in str(err.value)


@pytest.mark.sdk
def test_token_id_outside_the_vocabulary(client_a, token_rows) -> None:
    row = token_rows[0]
    targets = list(row[1:])
    targets[2] = 4096
    datum = types.Datum(model_input=types.ModelInput.from_ints(row[:-1]), loss_fn_inputs={"target_tokens": targets})
    with pytest.raises(tinker.BadRequestError) as err:
        client_a.forward_backward([datum], "cross_entropy").result()
    assert "token id 4096" in str(err.value) and "target_tokens" in str(err.value)


@pytest.mark.sdk
def test_server_keeps_serving_after_bad_input(server, client_a, token_rows) -> None:
    assert httpx.get(f"{server.base_url}/api/v1/healthz").json() == {"status": "ok"}
    out = client_a.forward_backward(make_data(token_rows), "cross_entropy").result()
    assert len(out.loss_fn_outputs) == len(token_rows)
    assert "Traceback" not in server.log()


def fwdbwd_json(model_id: str, row: list[int], seq_id: int, **tensor_overrides) -> dict:
    """An old SDK's JSON ForwardBackwardRequest (0.16.1's shape: chunks without type)."""
    inputs = {"target_tokens": {"data": row[1:], "dtype": "int64", "shape": [len(row) - 1]},
              "weights": {"data": [1.0] * (len(row) - 1), "dtype": "float32"}}
    inputs.update(tensor_overrides)
    datum = {"model_input": {"chunks": [{"tokens": row[:-1]}]}, "loss_fn_inputs": inputs}
    return {"forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy", "loss_fn_config": None},
            "model_id": model_id, "seq_id": seq_id}


def test_json_forward_backward_errors_name_the_field(server, client_a, token_rows) -> None:
    row, model = token_rows[0], client_a.model_id
    cases = [
        (b"{not json", "body", "not valid JSON"),
        (fwdbwd_json(model, row, 9_001, weights={"data": [1.0], "dtype": "float16"}),
         "data[0].loss_fn_inputs.weights.dtype", "'int64' or 'float32'"),
        (fwdbwd_json(model, row, 9_002, weights={"data": [1.0, 2.0], "dtype": "float32", "shape": [3]}),
         "data[0].loss_fn_inputs.weights.shape", "needs 3 elements"),
        (fwdbwd_json(model, row, 9_003, target_tokens={"data": [1.5], "dtype": "int64"}),
         "data[0].loss_fn_inputs.target_tokens.data", "whole numbers"),
        ({"forward_backward_input": {"data": [], "loss_fn": "cross_entropy"}, "model_id": model}, "data", "no datums"),
        ({"forward_input": {}, "model_id": model}, "forward_backward_input", "Field required"),
    ]
    for body, field, needle in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = post(server, "forward_backward", KEY_A, content=content, headers={"Content-Type": "application/json"})
        assert assert_json_error(r, 400, needle)["field"] == field
    # Semantic checks are the protobuf path's: same message, same field.
    bad = fwdbwd_json(model, row, 9_004, weights={"data": [1.0] * (len(row) - 3), "dtype": "float32"})
    r = post(server, "forward", KEY_A, json={"forward_input": bad["forward_backward_input"], "model_id": model})
    body = assert_json_error(r, 400, f"{len(row) - 3} entries")
    assert body["field"] == "data[0].loss_fn_inputs.weights"


def test_refused_json_submission_releases_its_seq_id(server, token_rows) -> None:
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-bad-input-seq") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        seq = 1  # a new model, used by nothing else: seq_ids 1 and 2 are free
        bad = fwdbwd_json(tc.model_id, token_rows[0], seq, weights={"data": [1.0], "dtype": "float16"})
        assert post(server, "forward_backward", "tml-bad-input-seq", json=bad).status_code == 400
        good = fwdbwd_json(tc.model_id, token_rows[0], seq + 1)
        submitted = post(server, "forward_backward", "tml-bad-input-seq", json=good)
        assert submitted.status_code == 200, submitted.text
        request_id = submitted.json()["request_id"]
        result = post(server, "retrieve_future", "tml-bad-input-seq", json={"request_id": request_id},
                      headers={"Accept": "application/json"})
        assert result.status_code == 200 and result.json()["metrics"]["loss:sum"] > 0
    gaps = [line for line in server.log().splitlines() if "seq_gap_skipped" in line]
    assert not [line for line in gaps if request_id in line]  # the queue did not wait for the refused one
