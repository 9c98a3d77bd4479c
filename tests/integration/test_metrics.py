"""GET /metrics of a real server process while the unmodified tinker SDK trains and samples: request
counts and latency histograms by route template, ops and tokens per tenant (the tenant's id, never
its key), the queue wait histogram. The shared server is used by the other tests of the session,
so everything there is checked as a change between two scrapes, or as at least. A server of its
own with --auth keys: /metrics wants the admin key, and with tracing on an operation's spans reach
an OTLP collector, HTTP request -> operation -> engine call, with no key in them."""

from __future__ import annotations

import gzip
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from tinker import types

from server import ids
from server.process import running_server
from tests.support.data import make_data
from tests.support.metrics import Samples, samples, value
from tests.support.sdk import resolve, service

pytestmark = [pytest.mark.slow]
BASE = "tiny-qwen3"
STEPS = 3

def scrape(server) -> tuple[str, Samples]:
    r = httpx.get(f"{server.base_url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text, samples(r.text)


def tenants(found: Samples) -> set[str]:
    return {dict(labels)["tenant"] for name, labels in found if name == "twinkle_ops_submitted_total"}


def histograms_are_sound(found: Samples, name: str) -> None:
    """Every series of the histogram: buckets never decrease, +Inf equals _count."""
    series: dict[frozenset, list[tuple[float, float]]] = {}
    for (sample, labels), count in found.items():
        if sample == f"{name}_bucket":
            rest = frozenset((k, v) for k, v in labels if k != "le")
            series.setdefault(rest, []).append((float(dict(labels)["le"]), count))
    assert series, f"no {name} series"
    for labels, buckets in series.items():
        counts = [count for _, count in sorted(buckets)]
        assert counts == sorted(counts), (name, labels, buckets)
        assert counts[-1] == found[(f"{name}_count", labels)]


def test_metrics_move_with_an_sdk_training_run(server, token_rows) -> None:
    key = f"tml-metrics-{uuid.uuid4().hex[:12]}"
    data = make_data(token_rows)
    sent = sum(d.model_input.length for d in data) * STEPS
    _, before = scrape(server)
    with service(server, key) as sc:
        tc = resolve(sc.create_lora_training_client(BASE, rank=8, seed=0))
        pending = []
        for _ in range(STEPS):
            pending += [tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-3))]
        _, during = scrape(server)  # while the steps are queued or running: a scrape still answers
        assert value(during, "twinkle_engine_lane_capacity", lane="training") >= 1
        for future in pending:
            future.result()
        _, trained = scrape(server)
        assert value(trained, "twinkle_adapters", base_model=BASE, state="resident") >= 1  # its adapter
        sampler = resolve(tc.save_weights_and_get_sampling_client())
        prompt = types.ModelInput.from_ints(token_rows[0][:4])
        sampled = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=5, seed=1)).result()
        generated = sum(len(s.tokens) for s in sampled.sequences)
    text, after = scrape(server)

    (tenant,) = tenants(after) - tenants(before)  # the key is new: so is its tenant
    assert tenant.startswith("tn-")
    assert key not in text and ids.hash_key(key) not in text  # never the key, nor its hash

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # HTTP: counted by route template, timed into buckets
    fb_route = {"method": "POST", "route": "/api/v1/forward_backward"}
    assert grew("twinkle_http_requests_total", **fb_route, status="200") >= STEPS
    assert grew("twinkle_http_request_duration_seconds_count", **fb_route) >= STEPS
    assert grew("twinkle_http_requests_total", method="POST", route="/api/v1/retrieve_future", status="200") >= 1
    histograms_are_sound(after, "twinkle_http_request_duration_seconds")
    assert not any(tc.model_id in dict(labels).values() for _, labels in after)  # no ids in labels
    # Ops per tenant and kind
    for kind, count in (("forward_backward", STEPS), ("optim_step", STEPS), ("sample", 1), ("create_model", 1),
                        ("save_weights_for_sampler", 1)):
        assert grew("twinkle_ops_submitted_total", tenant=tenant, kind=kind) == count, kind
        assert grew("twinkle_ops_total", tenant=tenant, kind=kind, outcome="done") == count, kind
    # Tokens: exactly what was sent and generated
    assert grew("twinkle_trained_tokens_total", tenant=tenant) == sent
    assert grew("twinkle_sampled_tokens_total", tenant=tenant) == generated > 0
    assert grew("twinkle_prompt_tokens_total", tenant=tenant) == 4
    # Queue wait and engine time
    assert grew("twinkle_op_queue_wait_seconds_count", lane="training", kind="forward_backward") >= STEPS
    assert grew("twinkle_op_queue_wait_seconds_count", lane="sampling", kind="sample") >= 1
    histograms_are_sound(after, "twinkle_op_queue_wait_seconds")
    histograms_are_sound(after, "twinkle_engine_call_duration_seconds")
    assert grew("twinkle_engine_busy_seconds_total", lane="training") > 0
    assert value(after, "process_resident_memory_bytes") > 0


# ----- auth, and tracing to an OTLP collector ----------------------------------------------------------
ADMIN_KEY = "metrics-admin-key-0123456789abcdef"


class Collector:
    """An OTLP/HTTP trace receiver on loopback: what a collector would be sent, decoded."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1/traces"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def spans(self) -> list:
        found = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    found += [(resource.resource, span) for span in scope.spans]
        return found


def test_keys_mode_metrics_want_the_admin_key_and_an_op_is_traced_from_http_to_engine(
    tmp_path, tiny_model_dir, token_rows
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / BASE).symlink_to(tiny_model_dir)
    collector = Collector()
    env = {"TWINKLE_ADMIN_KEY": ADMIN_KEY, "TWINKLE_OTEL_TRACING": "true", "TWINKLE_OTEL_ENDPOINT": collector.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with running_server(tmp_path, extra_args=["--auth", "keys"], env=env) as server:
            url = f"{server.base_url}/metrics"
            refused = httpx.get(url)
            assert refused.status_code == 401 and "admin key" in refused.json()["error"]
            assert "Traceback" not in refused.text
            assert httpx.get(url, headers={"Authorization": "Bearer not-the-admin-key-0123"}).status_code == 401
            admin = f"{server.base_url}/twinkle/v1/admin"
            assert httpx.post(f"{admin}/tenants", json={"name": "traced"},
                              headers={"X-Admin-Key": ADMIN_KEY}).status_code == 201
            key = httpx.post(f"{admin}/keys", json={"tenant": "traced"}, headers={"X-Admin-Key": ADMIN_KEY}).json()["key"]
            assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 401  # a tenant's key
            with service(server, key) as sc:
                tc = resolve(sc.create_lora_training_client(BASE, rank=4, seed=0))
                tc.forward_backward(make_data(token_rows), "cross_entropy").result()
            scraped = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert scraped.status_code == 200 and "twinkle_trained_tokens_total" in scraped.text
            assert key not in scraped.text
    finally:
        collector.http.shutdown()
    # The server's stop exported what was left.
    spans = collector.spans()
    by_id = {span.span_id: span for _, span in spans}
    (request,) = [s for _, s in spans if s.name == "POST /api/v1/forward_backward"]
    (op,) = [s for _, s in spans if s.name == "op forward_backward"]
    (engine,) = [s for _, s in spans if s.name == "engine forward_backward"]
    assert request.kind == request.SPAN_KIND_SERVER and op.parent_span_id == request.span_id
    assert engine.parent_span_id == op.span_id and request.trace_id == op.trace_id == engine.trace_id
    assert op.start_time_unix_nano < engine.start_time_unix_nano <= engine.end_time_unix_nano <= op.end_time_unix_nano
    assert by_id[op.parent_span_id].name.startswith("POST")
    resource = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert resource["service.name"] == "twinkle"
    raw = b"".join(collector.bodies)
    assert key.encode() not in raw and ids.hash_key(key).encode() not in raw and ADMIN_KEY.encode() not in raw
