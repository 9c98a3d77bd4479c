"""Many tenants on one base model, through the unmodified SDK: the LoRA pool pages adapters in and
out bit-exactly, quotas and rate limits hold per tenant, silent sessions expire."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from server.process import ServerProcess, running_server
from tests.support.data import fwdbwd_proto, make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
RANKS = (1, 4, 8, 16, 32)
ADAM = [types.AdamParams(learning_rate=1e-2), types.AdamParams(learning_rate=5e-3, weight_decay=0.1),
        types.AdamParams(learning_rate=2e-2, beta2=0.99), types.AdamParams(learning_rate=1e-2, grad_clip_norm=0.5),
        types.AdamParams(learning_rate=3e-3, eps=1e-8)]


def start(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, name: str, **env: str):
    data_dir = tmp_path_factory.mktemp(name)
    (data_dir / "models").mkdir()
    (data_dir / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    return running_server(data_dir, env={f"TWINKLE_{k.upper()}": v for k, v in env.items()})


def capacity(server: ServerProcess, key: str) -> dict:
    r = httpx.get(f"{server.base_url}/twinkle/v1/capacity", headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def log_events(server: ServerProcess, event: str) -> list[dict]:
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("event") == event]


# ----- the LoRA pool ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, tiny_model_dir) -> Iterator[ServerProcess]:
    """Two adapters on the compute device; no host budget, so every paged adapter goes to disk."""
    with start(tmp_path_factory, tiny_model_dir, "pool", max_resident_adapters="2",
               host_adapter_budget_mb="0") as proc:
        yield proc


def tenant_data(rank_index: int, rows: list[list[int]]) -> tuple[str, list[types.Datum]]:
    if rank_index % 2 == 0:
        return "cross_entropy", make_data(rows)
    rng = np.random.default_rng(rank_index)
    data = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                        loss_fn_inputs={"target_tokens": r[1:],
                                        "logprobs": np.full(len(r) - 1, -8.0, dtype=np.float32),
                                        "advantages": rng.normal(size=len(r) - 1).astype(np.float32)})
            for r in rows]
    return "importance_sampling", data


@contextmanager
def five_tenants(server: ServerProcess, rows: list[list[int]], prefix: str) -> Iterator[list[tuple]]:
    """Five tenants (ranks 1..32, CE and IS, own Adam settings): (client, loss_fn, data, adam) each."""
    services = [tinker.ServiceClient(base_url=server.base_url, api_key=f"tml-{prefix}-{i}") for i in range(5)]
    try:
        clients = [sc.create_lora_training_client(BASE, rank=r, seed=10 + i).result()
                   for i, (sc, r) in enumerate(zip(services, RANKS))]
        yield [(tc, *tenant_data(i, rows), ADAM[i]) for i, tc in enumerate(clients)]
    finally:
        for sc in services:
            sc.close("success").result()


def interleaved_losses(server: ServerProcess, rows: list[list[int]], prefix: str) -> list[list[float]]:
    """The five tenants take 10 steps each in turns."""
    with five_tenants(server, rows, prefix) as tenants:
        losses: list[list[float]] = [[] for _ in tenants]
        for _ in range(10):
            for i, (tc, loss_fn, data, adam) in enumerate(tenants):
                fb = tc.forward_backward(data, loss_fn)
                tc.optim_step(adam).result()
                losses[i].append(fb.result().metrics["loss:sum"])
        return losses


def test_five_tenants_on_two_slots_train_exactly_as_with_unlimited_slots(server, pool_server, token_rows) -> None:
    # The shared server pages out the adapters of other tests' sessions as they expire: count ours only.
    page_outs_before = capacity(server, "tml-unlimited-0").get("pool", {}).get("page_outs", 0)  # none: nothing ran yet
    unlimited = interleaved_losses(server, token_rows, "unlimited")
    page_outs_during = capacity(server, "tml-unlimited-0")["pool"]["page_outs"] - page_outs_before
    paged = interleaved_losses(pool_server, token_rows, "paged")
    np.testing.assert_allclose(np.array(paged), np.array(unlimited), atol=1e-6, rtol=0)
    assert all(l[-1] != l[0] for l in paged)  # every tenant really trained
    pool = capacity(pool_server, "tml-paged-0")["pool"]
    assert pool["max_resident_adapters"] == 2 and pool["resident_adapters"] <= 2
    assert pool["page_outs"] >= 45 and pool["page_ins"] >= 45  # a page-in per turn: 5 tenants on 2 slots
    assert page_outs_during == 0


# ----- packed execution -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_servers(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """One server that packs whatever fits a pass, one that runs one model per engine call."""
    with start(tmp_path_factory, tiny_model_dir, "packed", packing="always") as packed, \
            start(tmp_path_factory, tiny_model_dir, "unpacked", packing="never") as unpacked:
        yield packed, unpacked


def concurrent_losses(server: ServerProcess, rows: list[list[int]], prefix: str, steps: int = 4) -> list[list[float]]:
    """The five tenants step at once: every step, all send their forward_backward before anyone
    waits, then their optim_step."""
    with five_tenants(server, rows, prefix) as tenants:
        losses: list[list[float]] = [[] for _ in tenants]
        for _ in range(steps):
            fbs = [tc.forward_backward(data, loss_fn) for tc, loss_fn, data, _ in tenants]
            opts = [tc.optim_step(adam) for tc, _, _, adam in tenants]
            for i, (fb, opt) in enumerate(zip(fbs, opts)):
                losses[i].append(fb.result().metrics["loss:sum"])
                opt.result()
        return losses


def test_tenants_stepping_at_once_in_packed_passes_train_exactly_as_one_model_per_call(packed_servers,
                                                                                       token_rows) -> None:
    packed_server, unpacked_server = packed_servers
    packed = concurrent_losses(packed_server, token_rows, "packed")
    unpacked = concurrent_losses(unpacked_server, token_rows, "unpacked")
    scale = np.abs(np.array(unpacked)).max()
    np.testing.assert_allclose(np.array(packed), np.array(unpacked), atol=1e-5 * scale, rtol=0)
    assert all(l[-1] != l[0] for l in packed)  # every tenant really trained
    packs = [e["packed"] for e in log_events(packed_server, "op_done") if e.get("kind") == "forward_backward"]
    assert max(packs) >= 2  # models really shared engine calls
    assert all(e.get("packed", 1) == 1 for e in log_events(unpacked_server, "op_done"))


# ----- quotas and rate limits -------------------------------------------------------------------
@pytest.fixture(scope="module")
def limits_server(tmp_path_factory, tiny_model_dir) -> Iterator[ServerProcess]:
    # Short long-polls, so a throttled request is seen waiting (try_again) rather than held.
    with start(tmp_path_factory, tiny_model_dir, "limits", max_live_models="1", tokens_per_second="50",
               requests_per_second="2", rate_window_seconds="2", long_poll_seconds="0.5") as proc:
        yield proc


def test_live_model_quota_fails_fast_with_the_reason_and_spares_other_tenants(limits_server) -> None:
    with tinker.ServiceClient(base_url=limits_server.base_url, api_key="tml-quota-a") as a, \
            tinker.ServiceClient(base_url=limits_server.base_url, api_key="tml-quota-b") as b:
        first = a.create_lora_training_client(BASE, rank=2, seed=0).result()
        started = time.monotonic()
        with pytest.raises(tinker.RateLimitError, match="live models"):
            a.create_lora_training_client(BASE, rank=2, seed=1).result()
        assert time.monotonic() - started < 5  # x-should-retry: false; the SDK does not keep retrying
        assert b.create_lora_training_client(BASE, rank=2, seed=0).result().get_info().lora_rank == 2
        key = {"X-API-Key": "tml-quota-a"}
        api = f"{limits_server.base_url}/api/v1"
        unload = httpx.post(f"{api}/unload_model", json={"model_id": first.model_id}, headers=key).json()
        httpx.post(f"{api}/retrieve_future", json={"request_id": unload["request_id"]}, headers=key, timeout=30)
        assert capacity(limits_server, "tml-quota-a")["tenant"]["live_models"] == 0
        assert a.create_lora_training_client(BASE, rank=2, seed=1).result()  # room again


def test_tokens_per_second_pauses_with_a_reason_while_another_tenant_runs(limits_server, token_rows) -> None:
    big = make_data([token_rows[0] * 6] * 2)  # ~230 tokens per call: over the 100-token window
    small = make_data([token_rows[2][:6]])
    key_a = {"X-API-Key": "tml-rate-a"}
    api = f"{limits_server.base_url}/api/v1"
    with tinker.ServiceClient(base_url=limits_server.base_url, api_key="tml-rate-a") as a, \
            tinker.ServiceClient(base_url=limits_server.base_url, api_key="tml-rate-b") as b:
        ta = a.create_lora_training_client(BASE, rank=2, seed=0).result()
        tb = b.create_lora_training_client(BASE, rank=2, seed=0).result()
        time.sleep(2.1)  # an empty window for both
        first = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(ta.model_id, big, seq_id=1),
                           headers={**key_a, "Content-Type": "application/x-protobuf"}).json()["request_id"]
        second = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(ta.model_id, big, seq_id=2),
                            headers={**key_a, "Content-Type": "application/x-protobuf"}).json()["request_id"]
        ran = httpx.post(f"{api}/retrieve_future", json={"request_id": first}, headers=key_a, timeout=30)
        while ran.headers["content-type"].startswith("application/json") and ran.json().get("type") == "try_again":
            ran = httpx.post(f"{api}/retrieve_future", json={"request_id": first}, headers=key_a, timeout=30)
        assert ran.headers["content-type"].startswith("application/x-protobuf")  # the first ran at once
        waiting = httpx.post(f"{api}/retrieve_future", json={"request_id": second}, headers=key_a, timeout=30)
        body = waiting.json()
        assert body["type"] == "try_again" and body["queue_state"] == "paused_rate_limit"
        assert "tokens/s" in body["queue_state_reason"]
        started = time.monotonic()
        tb.forward(small, "cross_entropy").result()  # tenant B is under its own budget: not held up
        assert time.monotonic() - started < 1.5
        for _ in range(40):  # it runs once the first call's tokens leave the 2 s window
            done = httpx.post(f"{api}/retrieve_future", json={"request_id": second}, headers=key_a, timeout=30)
            if done.headers["content-type"].startswith("application/x-protobuf"):
                break
        assert done.headers["content-type"].startswith("application/x-protobuf")


def test_requests_per_second_makes_the_sdk_back_off_and_succeed(limits_server, token_rows) -> None:
    before = len(log_events(limits_server, "submission_refused"))
    with tinker.ServiceClient(base_url=limits_server.base_url, api_key="tml-rps") as sc:
        tc = sc.create_lora_training_client(BASE, rank=2, seed=0).result()
        data = make_data([token_rows[1][:5]])
        started = time.monotonic()
        futures = [tc.forward(data, "cross_entropy") for _ in range(8)]  # 4 allowed per 2 s window
        assert all(len(f.result().loss_fn_outputs) == 1 for f in futures)
        assert time.monotonic() - started > 1.0  # it had to wait for the window
    refused = log_events(limits_server, "submission_refused")[before:]
    assert refused and all(e["limit"] == "requests_per_second" for e in refused)


# ----- model slots are given back ---------------------------------------------------------------
ADMIN_KEY = "multitenant-admin-key-0123456789"


@pytest.fixture(scope="module")
def slots_server(tmp_path_factory, tiny_model_dir) -> Iterator[ServerProcess]:
    with start(tmp_path_factory, tiny_model_dir, "slots", auth="keys", admin_key=ADMIN_KEY,
               max_live_models="1") as proc:
        yield proc


def tenant_key(server: ServerProcess, name: str, **limits: int) -> str:
    admin = f"{server.base_url}/twinkle/v1/admin"
    headers = {"X-Admin-Key": ADMIN_KEY}
    assert httpx.post(f"{admin}/tenants", json={"name": name, "limits": limits}, headers=headers).status_code == 201
    return httpx.post(f"{admin}/keys", json={"tenant": name}, headers=headers).json()["key"]


def test_closed_clients_and_failed_creations_give_their_model_slots_back(slots_server, token_rows) -> None:
    key = tenant_key(slots_server, "closer")
    data = make_data([token_rows[0][:8]])
    for round_ in range(3):  # one live model allowed: each client's close must free its model
        with tinker.ServiceClient(base_url=slots_server.base_url, api_key=key) as sc:
            tc = sc.create_lora_training_client(BASE, rank=2, seed=round_).result()
            tc.forward_backward(data, "cross_entropy").result()
    assert capacity(slots_server, key)["tenant"]["live_models"] == 0
    deadline = time.monotonic() + 10  # the adapters are freed in the background, after the close returns
    while capacity(slots_server, key)["pool"]["resident_adapters"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert capacity(slots_server, key)["pool"]["resident_adapters"] == 0
    finished = log_events(slots_server, "session_finished")
    assert len(finished) == 3 and all(e["models"] == 1 for e in finished)

    # A creation that fails in the engine (the SDK itself refuses this config, so it is sent raw).
    api, headers = f"{slots_server.base_url}/api/v1", {"X-API-Key": key}

    def create(session: str, seq: int, **lora) -> dict:
        made = httpx.post(f"{api}/create_model", json={"session_id": session, "model_seq_id": seq, "base_model": BASE,
                                                       "lora_config": {"rank": 2, **lora}}, headers=headers).json()
        return httpx.post(f"{api}/retrieve_future", json={"request_id": made["request_id"]}, headers=headers,
                          timeout=30).json()

    session = httpx.post(f"{api}/create_session", json={"sdk_version": "raw", "tags": [], "user_metadata": {}},
                         headers=headers).json()["session_id"]
    failed = create(session, 0, train_attn=False, train_mlp=False, train_unembed=False)
    assert failed["category"] == "user" and "selects no layers" in failed["error"]
    assert "model_id" in create(session, 1)  # the failed creation left its slot free


def test_a_published_checkpoint_over_the_tenants_rank_limit_is_refused(slots_server) -> None:
    owner, capped = tenant_key(slots_server, "publisher"), tenant_key(slots_server, "capped", max_lora_rank=4)
    with tinker.ServiceClient(base_url=slots_server.base_url, api_key=owner) as sc:
        path = sc.create_lora_training_client(BASE, rank=8, seed=0).result().save_state("r8").result().path
        sc.create_rest_client().publish_checkpoint_from_tinker_path(path).result()
    with tinker.ServiceClient(base_url=slots_server.base_url, api_key=capped) as sc:
        with pytest.raises(tinker.BadRequestError, match="rank 8, over this tenant's max_lora_rank 4"):
            sc.create_training_client_from_state(path).result()
        assert capacity(slots_server, capped)["tenant"]["live_models"] == 0


# ----- sessions that stop heartbeating ----------------------------------------------------------
@pytest.fixture(scope="module")
def expiry_server(tmp_path_factory, tiny_model_dir) -> Iterator[ServerProcess]:
    with start(tmp_path_factory, tiny_model_dir, "expiry", session_timeout_seconds="2",
               seq_gap_grace_seconds="60") as proc:
        yield proc


def test_a_silent_session_expires_its_work_fails_and_checkpoints_stay(expiry_server, token_rows) -> None:
    key = {"X-API-Key": "tml-silent"}
    api = f"{expiry_server.base_url}/api/v1"

    def post(endpoint: str, **body) -> dict:
        return httpx.post(f"{api}/{endpoint}", json=body, headers=key, timeout=30).json()

    def result(request_id: str) -> dict:
        return post("retrieve_future", request_id=request_id)

    session = post("create_session", sdk_version="raw", tags=[], user_metadata={})["session_id"]
    created = post("create_model", session_id=session, model_seq_id=0, base_model=BASE, lora_config={"rank": 2})
    model = result(created["request_id"])["model_id"]
    saved = result(post("save_weights", model_id=model, path="kept", seq_id=1)["request_id"])["path"]
    assert capacity(expiry_server, "tml-silent")["tenant"]["live_models"] == 1
    # Queued behind a missing seq_id (2), so still waiting when the session expires.
    stuck = httpx.post(f"{api}/forward_backward", content=fwdbwd_proto(model, make_data(token_rows), seq_id=3),
                       headers={**key, "Content-Type": "application/x-protobuf"}).json()["request_id"]
    time.sleep(3.5)  # no heartbeat for longer than the 2 s timeout
    failed = result(stuck)
    assert failed["category"] == "user" and "expired" in failed["error"]
    beat = httpx.post(f"{api}/session_heartbeat", json={"session_id": session}, headers=key)
    assert beat.status_code == 410  # the SDK stops heartbeating on 410
    step = httpx.post(f"{api}/optim_step", json={"model_id": model, "seq_id": 4, "adam_params": {}}, headers=key)
    assert step.status_code == 410 and "expired" in step.json()["error"]
    usage = capacity(expiry_server, "tml-silent")
    assert usage["tenant"]["live_models"] == 0 and usage["pool"]["page_outs"] >= 1
    with tinker.ServiceClient(base_url=expiry_server.base_url, api_key="tml-silent") as sc:
        resumed = sc.create_training_client_from_state(saved).result()  # its checkpoints are kept
        assert resumed.get_info().lora_rank == 2
    assert log_events(expiry_server, "session_expired")
