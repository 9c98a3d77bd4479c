"""Transport through the unmodified SDK and raw HTTP: parallel zstd chunks, idempotent resubmission,
metadata-only answers, the completion feed, cancellation, back-pressure and sample batching."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from server.process import ServerProcess, running_server

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
MANY = 2100  # > 2 x the SDK's 1024-datum chunk: it sends 3 chunks, concurrently, chunk 1 last


def many_datums(n: int = MANY) -> list[types.Datum]:
    rng = np.random.default_rng(7)
    rows = rng.integers(3, 4096, size=(n, 5))
    return [types.Datum(model_input=types.ModelInput.from_ints(r[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": r[1:].tolist(), "weights": rng.normal(size=4).astype(np.float32)})
            for r in rows]


def fwdbwd_body(model_id: str, data: list[types.Datum], seq_id: int) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


class Raw:
    def __init__(self, server: ServerProcess, key: str) -> None:
        self.base, self.key = f"{server.base_url}/api/v1", key

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"X-API-Key": self.key, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.base}/{path}", headers=headers, timeout=60, **kwargs)

    def fwdbwd(self, body: bytes, compress: bool = True) -> httpx.Response:
        headers = {"Content-Type": "application/x-protobuf"}
        if compress:
            body, headers["Content-Encoding"] = zstandard.ZstdCompressor().compress(body), "zstd"
        return self.post("forward_backward", content=body, headers=headers)

    def result(self, request_id: str, **extra) -> httpx.Response:
        return self.post("retrieve_future", json={"request_id": request_id, **extra})


def op_events(server: ServerProcess, kind: str) -> list[dict]:
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "op_done" and e.get("kind") == kind]


def test_parallel_zstd_chunks_equal_the_unchunked_call(server) -> None:
    data = many_datums()
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-chunks") as sc:
        chunked = sc.create_lora_training_client(BASE, rank=4, seed=11).result()
        whole = sc.create_lora_training_client(BASE, rank=4, seed=11).result()
        before = len(op_events(server, "forward_backward"))
        via_sdk = chunked.forward_backward(data, "cross_entropy").result()
        raw = Raw(server, "tml-chunks")
        submitted = raw.fwdbwd(fwdbwd_body(whole.model_id, data, seq_id=1))
        unchunked = deserialize_forward_backward_output(raw.result(submitted.json()["request_id"]).content)
        # The three chunks ran as one engine call, like the single request.
        assert [e["batched"] for e in op_events(server, "forward_backward")[before:]] == [3, 1]
        assert len(via_sdk.loss_fn_outputs) == len(unchunked.loss_fn_outputs) == MANY
        for a, b in zip(via_sdk.loss_fn_outputs, unchunked.loss_fn_outputs):
            assert np.array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())
        assert via_sdk.metrics["loss:sum"] == pytest.approx(unchunked.metrics["loss:sum"], rel=1e-12)
        # Equal gradients: after the same step both models compute the same logprobs.
        for client in (chunked, whole):
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        probe = data[:3]
        after = [c.forward(probe, "cross_entropy").result().loss_fn_outputs for c in (chunked, whole)]
        for a, b in zip(*after):
            assert np.array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())


def test_resubmission_is_idempotent_on_seq_id_and_body(server, token_rows) -> None:
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-idem") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        raw = Raw(server, "tml-idem")
        data = many_datums(3)
        body = fwdbwd_body(tc.model_id, data, seq_id=1)
        first, retry = raw.fwdbwd(body).json(), raw.fwdbwd(body).json()
        assert first["request_id"] == retry["request_id"]  # a retried POST: the same future
        other = raw.fwdbwd(fwdbwd_body(tc.model_id, data[:2], seq_id=1)).json()
        assert other["request_id"] != first["request_id"]  # another request reusing the seq_id
        for rid in (first["request_id"], other["request_id"]):
            assert raw.result(rid).headers["content-type"].startswith("application/x-protobuf")


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """A server that answers every result metadata-first and sheds samples beyond a queue of 2 (all
    of which one tenant may hold: these tests have one)."""
    data_dir = tmp_path_factory.mktemp("tight")
    (data_dir / "models").mkdir()
    (data_dir / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    env = {"TWINKLE_METADATA_ONLY_BYTES": "100", "TWINKLE_SAMPLE_QUEUE_LIMIT": "2",
           "TWINKLE_SAMPLE_QUEUE_TENANT_SHARE": "1"}
    with running_server(data_dir, env=env) as proc:
        yield proc


def test_metadata_only_answers_then_payload(tight_server, token_rows) -> None:
    with tinker.ServiceClient(base_url=tight_server.base_url, api_key="tml-meta") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        data = many_datums(8)
        out = tc.forward_backward(data, "cross_entropy").result()  # the SDK handles complete_metadata
        assert len(out.loss_fn_outputs) == 8
        sampler = tc.save_weights_and_get_sampling_client().result()
        assert len(sampler.sample(types.ModelInput.from_ints(token_rows[0][:4]), 2,
                                  types.SamplingParams(max_tokens=4)).result().sequences) == 2
        raw = Raw(tight_server, "tml-meta")
        rid = raw.fwdbwd(fwdbwd_body(tc.model_id, data, seq_id=10)).json()["request_id"]
        meta = raw.result(rid, allow_metadata_only=True).json()
        payload = raw.result(rid, allow_metadata_only=False)
        assert meta == {"status": "complete_metadata", "response_payload_size": len(payload.content)}
        assert len(deserialize_forward_backward_output(payload.content).loss_fn_outputs) == 8


def test_completion_feed_and_cancel(server, token_rows) -> None:
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-feed") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        sc.create_sampling_client(base_model=BASE).result()  # opens sampling session ...:sample:0
        sampler_id = f"{sc.holder.get_session_id()}:sample:0"
        raw = Raw(server, "tml-feed")
        prompt = {"chunks": [{"type": "encoded_text", "tokens": token_rows[0][:4]}]}

        def asample(seq: int) -> str:
            body = {"sampling_session_id": sampler_id, "seq_id": seq, "num_samples": 1, "prompt": prompt,
                    "sampling_params": {"max_tokens": 3}}
            return raw.post("asample", json=body).json()["request_id"]

        target = {"type": "sampling_session", "sampling_session_id": sampler_id, "cloned_sampler_id": 0}
        done = asample(1)
        feed = raw.post("retrieve_futures", json={"target": target, "prev_cursor": 0}).json()
        assert [c["request_id"] for c in feed["completions"]] == [done]
        assert feed["completions"][0]["state"] == "finished"
        assert feed["completions"][0]["response_payload_uncompressed_size"] == len(raw.result(done).content)
        ack = raw.post("retrieve_futures", json={"target": target, "prev_cursor": feed["cursor"], "timeout": 0})
        assert ack.json() == {"completions": [], "cursor": feed["cursor"]}  # acknowledged, answered at once
        stranger = Raw(server, "tml-feed-stranger").post("retrieve_futures", json={"target": target})
        assert stranger.status_code == 404

        # Keep the engine busy (the POST returns once the work is queued), so the next sample is
        # still waiting when it is cancelled.
        busy = raw.fwdbwd(fwdbwd_body(tc.model_id, many_datums(), seq_id=1)).json()["request_id"]
        queued = asample(2)
        assert raw.post("cancel_future", json={"request_id": queued}).json() == {"cancelled": True}
        failed = raw.result(queued).json()
        assert failed["category"] == "user" and "cancelled" in failed["error"]
        assert raw.post("cancel_future", json={"request_id": queued}).json() == {"cancelled": False}
        assert Raw(server, "tml-feed-stranger").post("cancel_future", json={"request_id": done}).status_code == 404
        assert raw.result(busy).status_code == 200
        feed = raw.post("retrieve_futures", json={"target": target, "prev_cursor": 0, "timeout": 0}).json()
        assert {"state": "failed", "request_id": queued} in feed["completions"]


def test_back_pressure_and_batching_of_concurrent_samples(tight_server, token_rows) -> None:
    async def burst(sampler: tinker.SamplingClient) -> list[types.SampleResponse]:
        params = types.SamplingParams(max_tokens=6, temperature=1.0)
        prompts = [types.ModelInput.from_ints(row[:4]) for row in token_rows] * 3
        return await asyncio.gather(*(sampler.sample(p, 2, params) for p in prompts))

    with tinker.ServiceClient(base_url=tight_server.base_url, api_key="tml-burst") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        # Keep the engine busy (the POST returns once the work is queued): a queue forms behind it.
        raw = Raw(tight_server, "tml-burst")
        busy = raw.fwdbwd(fwdbwd_body(tc.model_id, many_datums(), seq_id=2)).json()["request_id"]
        results = asyncio.run(burst(sampler))
        assert raw.result(busy).status_code == 200
    assert all(len(r.sequences) == 2 for r in results)
    log = tight_server.log()
    assert '"event": "sample_refused_busy"' in log  # the queue of 2 overflowed; the SDK backed off and resent
    assert any(e["batched"] > 1 for e in op_events(tight_server, "sample"))
