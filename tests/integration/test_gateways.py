"""Two gateway processes on one PostgreSQL, one Redis and one data dir (local engines): a client may
use either, or both at once. A model's requests that reach the process not running it are
forwarded to the one that does (gateway/forwarding.py), so its seq_id order holds whichever
gateway each request reaches."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types
from tinker.proto.response_conv import deserialize_forward_backward_output

from server.cli import main
from server.process import ServerProcess, running_server
from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, tiny_model_dir: Path, make_pg_database) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    url = make_pg_database()
    assert main(["db", "upgrade", "--database-url", url]) == 0
    data_dir = tmp_path_factory.mktemp("gateways")
    (data_dir / "models").mkdir()
    (data_dir / "models" / BASE).symlink_to(tiny_model_dir)
    # One torch thread each: two compute processes share the machine's two cores.
    args = ["--database-url", url, "--redis-url", "redis://127.0.0.1:6379/0", "--torch-threads", "1"]
    env = {"TWINKLE_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:12]}", "TWINKLE_SEQ_GAP_GRACE_SECONDS": "600"}
    with running_server(data_dir, extra_args=args, env=env, log_name="a.log") as a, \
            running_server(data_dir, extra_args=args, env=env, log_name="b.log") as b:
        yield a, b


def step(tc, data) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return fb.result().metrics["loss:sum"]


def test_one_user_alternating_between_gateways_trains_saves_and_samples(gateways, token_rows) -> None:
    a, b = gateways
    data = make_data(token_rows)
    with tinker.ServiceClient(base_url=a.base_url, api_key="tml-alternating") as on_a, \
            tinker.ServiceClient(base_url=b.base_url, api_key="tml-alternating") as on_b:
        tc_a = on_a.create_lora_training_client(BASE, rank=4, seed=11).result()
        step(tc_a, data)
        state = tc_a.save_state("made-on-a").result().path
        tc_b = on_b.create_training_client_from_state_with_optimizer(state).result()  # A's checkpoint, on B
        # The same state and data on both: the same next step.
        assert step(tc_b, data) == pytest.approx(step(tc_a, data), rel=1e-6)
        weights = tc_b.save_weights_for_sampler("made-on-b").result().path
        prompt = types.ModelInput.from_ints(token_rows[0])
        logprobs = [sc.create_sampling_client(model_path=weights).result().compute_logprobs(prompt).result()[1:]
                    for sc in (on_a, on_b)]  # the first token has none
        assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-5, abs=1e-6)
        sampled = on_a.create_sampling_client(model_path=weights).result().sample(
            prompt, 1, types.SamplingParams(max_tokens=4)).result()
        assert len(sampled.sequences[0].tokens) == 4
        # Each gateway lists what the other made.
        listed = on_a.create_rest_client().list_checkpoints(tc_b.model_id).result().checkpoints
        assert [c.tinker_path for c in listed] == [weights]


def _post(url: str, path: str, key: str, **kwargs) -> dict:
    answer = httpx.post(f"{url}/api/v1/{path}", headers={"X-API-Key": key, **kwargs.pop("headers", {})},
                        timeout=60, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _result(url: str, request_id: str, key: str) -> httpx.Response:
    while True:
        answer = httpx.post(f"{url}/api/v1/retrieve_future", json={"request_id": request_id},
                            headers={"X-API-Key": key}, timeout=60)
        if answer.headers["content-type"].startswith("application/x-protobuf") or "type" not in answer.json() \
                or answer.json()["type"] != "try_again":
            return answer


def _raw_model(url: str, key: str, seed: int) -> str:
    session = _post(url, "create_session", key, json={"sdk_version": "raw"})["session_id"]
    created = _post(url, "create_model", key, json={"session_id": session, "model_seq_id": 0, "base_model": BASE,
                                                    "lora_config": {"rank": 4, "seed": seed}})
    return _result(url, created["request_id"], key).json()["model_id"]


def _three_steps(urls: list[str], order: list[int], model_id: str, key: str, data) -> list[float]:
    """forward_backward (seq 1), optim_step (seq 2), forward_backward (seq 3), posted in `order`
    to urls[i] for seq i+1; each result read on the other gateway; the two losses."""
    bodies = {
        1: {"content": fwdbwd_proto(model_id, data, seq_id=1), "headers": PROTO},
        2: {"json": {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}}},
        3: {"content": fwdbwd_proto(model_id, data, seq_id=3), "headers": PROTO},
    }
    paths = {1: "forward_backward", 2: "optim_step", 3: "forward_backward"}
    futures = {seq: _post(urls[seq - 1], paths[seq], key, **bodies[seq])["request_id"] for seq in order}
    losses = []
    for seq in (1, 3):
        other = urls[seq % len(urls)]
        answer = _result(other, futures[seq], key)
        losses.append(deserialize_forward_backward_output(answer.content).metrics["loss:sum"])
    assert "error" not in _result(urls[0], futures[2], key).json()
    return losses


def test_a_models_requests_keep_their_order_across_gateways(gateways, token_rows) -> None:
    """Posted last-first over both gateways, with each result read on the other one: the same
    losses as in order on one gateway."""
    a, b = gateways
    data = make_data(token_rows)
    reference = _three_steps([a.base_url] * 3, [1, 2, 3], _raw_model(a.base_url, "tml-order", 5), "tml-order", data)
    model_id = _raw_model(a.base_url, "tml-order", 5)  # made on A: A runs it
    spread = _three_steps([b.base_url, a.base_url, b.base_url], [3, 2, 1], model_id, "tml-order", data)
    assert spread == pytest.approx(reference, rel=1e-6)
    assert spread[1] < spread[0]  # the optim_step ran between them
    assert "request_forwarded" in b.log()


def test_four_tenants_over_two_gateways_train_as_on_one(gateways, token_rows) -> None:
    a, b = gateways
    data = make_data(token_rows)

    def train(url: str, key: str, seed: int, out: list[float]) -> None:
        with tinker.ServiceClient(base_url=url, api_key=key) as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=seed).result()
            out.extend(step(tc, data) for _ in range(3))

    def run(urls: list[str], tag: str) -> list[list[float]]:
        losses: list[list[float]] = [[] for _ in urls]
        threads = [threading.Thread(target=train, args=(url, f"tml-four-{tag}-{i}", 100 + i, losses[i]))
                   for i, url in enumerate(urls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        return losses

    started = time.monotonic()
    single = run([a.base_url] * 4, "single")
    spread = run([a.base_url, b.base_url, a.base_url, b.base_url], "spread")
    assert all(len(losses) == 3 for losses in single + spread), (single, spread, time.monotonic() - started)
    for one, two in zip(single, spread):
        assert two == pytest.approx(one, rel=1e-6)


def test_a_gateway_killed_loses_nothing_the_other_accepted(gateways, token_rows) -> None:
    """Runs last: it kills A. Work B accepted (held for its seq_id gap) finishes after A is gone;
    a model A ran is taken over by B, which says its weights went with A."""
    a, b = gateways
    data = make_data(token_rows)
    on_b = _raw_model(b.base_url, "tml-kill", 7)
    on_a = _raw_model(a.base_url, "tml-kill", 7)
    held = _post(b.base_url, "forward_backward", "tml-kill", content=fwdbwd_proto(on_b, data, seq_id=2),
                 headers=PROTO)["request_id"]  # waits for seq 1
    a.process.kill()
    a.process.wait()
    first = _post(b.base_url, "forward_backward", "tml-kill", content=fwdbwd_proto(on_b, data, seq_id=1),
                  headers=PROTO)["request_id"]
    for request_id in (first, held):
        answer = _result(b.base_url, request_id, "tml-kill")
        assert deserialize_forward_backward_output(answer.content).metrics["loss:sum"] > 0
    # A's model: B adopts it (A's pid is gone), and its weights were in A's memory.
    orphan = _post(b.base_url, "forward_backward", "tml-kill", content=fwdbwd_proto(on_a, data, seq_id=1),
                   headers=PROTO)["request_id"]
    failed = _result(b.base_url, orphan, "tml-kill").json()
    assert failed["category"] == "user" and "checkpoint" in failed["error"], failed
