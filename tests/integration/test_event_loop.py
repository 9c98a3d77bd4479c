"""The event loop stays free: while 64 MiB forward_backward bodies are received, hashed, decoded and
checked (in worker threads), a heartbeat-like request (`healthz`) is still answered within 100 ms."""

from __future__ import annotations

import multiprocessing
import statistics
import time

import httpx
import numpy as np
import tinker

from tests.support.data import fwdbwd_proto

BASE = "tiny-qwen3"
KEY = "tml-event-loop"
DATUM_TOKENS = 8192
MIB = 2**20


def big_body(model_id: str, seq_id: int) -> bytes:
    """A 64 MiB protobuf forward_backward body (over the token quota: decoded, then refused)."""
    from tinker import types

    rng = np.random.default_rng(seq_id)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(rng.integers(0, 4000, DATUM_TOKENS).tolist()),
        loss_fn_inputs={"target_tokens": rng.integers(0, 4000, DATUM_TOKENS),
                        "weights": np.ones(DATUM_TOKENS, dtype=np.float32)})
    one = len(fwdbwd_proto(model_id, [datum], seq_id=seq_id))
    body = fwdbwd_proto(model_id, [datum] * (64 * MIB // one), seq_id=seq_id)
    assert 60 * MIB < len(body) < 68 * MIB
    return body


def send(base_url: str, body: bytes, answers: multiprocessing.Queue) -> None:
    with httpx.Client(timeout=120) as client:
        for _ in range(2):
            answers.put(client.post(f"{base_url}/api/v1/forward_backward", content=body, headers={
                "X-API-Key": KEY, "Content-Type": "application/x-protobuf"}).status_code)


def test_healthz_answers_within_100_ms_while_64_mib_bodies_are_decoded(server) -> None:
    with tinker.ServiceClient(base_url=server.base_url, api_key=KEY) as sc:  # its session lives meanwhile
        model_id = sc.create_lora_training_client(BASE, rank=2, seed=0).result().model_id
        bodies = [big_body(model_id, seq) for seq in (1, 2)]
        # The senders are processes of their own: threads here would compete with the probe for
        # this process's GIL, and the probe would time that instead of the server.
        ctx = multiprocessing.get_context("spawn")
        answers = ctx.Queue()
        senders = [ctx.Process(target=send, args=(server.base_url, body, answers)) for body in bodies]
        latencies = []
        with httpx.Client(timeout=10) as probe:
            probe.get(f"{server.base_url}/api/v1/healthz")  # connected before the load begins
            for sender in senders:
                sender.start()
            while any(s.is_alive() for s in senders):
                started = time.perf_counter()
                assert probe.get(f"{server.base_url}/api/v1/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.005)
        statuses = [answers.get(timeout=10) for _ in range(4)]
    assert statuses == [400] * 4  # each received, hashed, decoded and refused: over the token quota
    assert len(latencies) >= 20, "the bodies went too fast to measure anything"
    worst, median = max(latencies), statistics.median(latencies)
    print(f"healthz under load: {len(latencies)} probes, median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < 0.1, f"healthz took {worst * 1000:.0f} ms (median {median * 1000:.1f} ms)"
