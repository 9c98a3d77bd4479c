"""server/metrics.py and GET /metrics in-process: the instruments and their labels, the scheduler's
calls into them (queue wait, engine calls, ops and tokens per tenant), the scrape-time gauges,
one registry per app, and who may scrape (open mode: anyone on loopback; keys mode: the admin
key only, every refusal a 4xx JSON). The SDK-driven scrape is tests/integration/test_metrics.py."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.errors import OperationFailed
from server.kinds import Lane, OpKind
from server.metrics import Gauges, LaneLoad, Metrics
from server.queue.futures import FutureHub
from server.queue.scheduler import Batch, Scheduler
from server.store.database import Database
from server.store.tables import Tenant
from server.tracing import Tracing
from tests.support.admin import ADMIN, ADMIN_KEY, new_key, new_tenant
from tests.support.aio import arun
from tests.support.engines import IdleEngine
from tests.support.http import error, local_client
from tests.support.metrics import Samples, samples, value
from workers.types import PoolStatus

SESSION = {"sdk_version": "0.38.0", "tags": [], "user_metadata": {}}


def scrape(metrics: Metrics) -> Samples:
    return samples(metrics.render()[0].decode())


# ----- the module ------------------------------------------------------------------------------
def test_requests_are_counted_by_route_template_and_unknown_methods_are_other() -> None:
    m = Metrics(process=False)
    m.request("POST", "/api/v1/forward_backward", 200, 0.003)
    m.request("POST", "/api/v1/forward_backward", 200, 0.2)
    m.request("BREW", "unmatched", 404, 0.001)  # a client's made-up method makes no label of its own
    found = scrape(m)
    route = {"method": "POST", "route": "/api/v1/forward_backward"}
    assert value(found, "twinkle_http_requests_total", **route, status="200") == 2
    assert value(found, "twinkle_http_requests_total", method="other", route="unmatched", status="404") == 1
    assert value(found, "twinkle_http_request_duration_seconds_count", **route) == 2
    assert value(found, "twinkle_http_request_duration_seconds_bucket", **route, le="0.005") == 1
    assert value(found, "twinkle_http_request_duration_seconds_bucket", **route, le="+Inf") == 2


def test_tokens_count_only_for_computed_ops_that_succeeded() -> None:
    m = Metrics(process=False)
    m.op_ended("tn-a", OpKind.FORWARD_BACKWARD, True, 0.1, cost=100)
    m.op_ended("tn-a", OpKind.FORWARD_BACKWARD, False, 0.1, cost=1000)  # failed: nothing was trained
    m.op_ended("tn-a", OpKind.FORWARD, True, 0.1, cost=7)
    m.op_ended("tn-a", OpKind.SAMPLE, True, 0.1, cost=5000)  # a sample's cost is an estimate: not counted
    m.sample_done("tn-b", prompt=12, generated=30)
    found = scrape(m)
    assert value(found, "twinkle_trained_tokens_total", tenant="tn-a") == 100
    assert value(found, "twinkle_forward_tokens_total", tenant="tn-a") == 7
    assert value(found, "twinkle_sampled_tokens_total", tenant="tn-b") == 30
    assert value(found, "twinkle_prompt_tokens_total", tenant="tn-b") == 12
    assert value(found, "twinkle_ops_total", tenant="tn-a", kind="forward_backward", outcome="done") == 1
    assert value(found, "twinkle_ops_total", tenant="tn-a", kind="forward_backward", outcome="failed") == 1
    assert value(found, "twinkle_op_duration_seconds_count", kind="forward_backward") == 2


def test_registries_are_per_instance_and_the_gauges_are_read_at_scrape_time() -> None:
    first, second = Metrics(), Metrics()  # with the process collectors: no clash between them
    first.submitted("tn-a", "sample")
    assert value(scrape(first), "twinkle_ops_submitted_total", tenant="tn-a", kind="sample") == 1
    assert value(scrape(second), "twinkle_ops_submitted_total", tenant="tn-a", kind="sample") == 0
    assert any(name == "process_cpu_seconds_total" for name, _ in scrape(second))
    pool = PoolStatus(max_resident=4, resident=("m1", "m2"), pinned=1, paged_in_host=3, paged_on_disk=1,
                      host_bytes=2048, page_ins=5, page_outs=6, spills=1)
    now = {"queued": 0}
    second.watch(lambda: Gauges(lanes={"training": LaneLoad(now["queued"], 1, 1)}, max_calls=1,
                                queued_by_tenant={"tn-a": now["queued"]}, pools={"base": pool, "idle": None}))
    now["queued"] = 3
    found = scrape(second)
    assert value(found, "twinkle_queue_depth", lane="training") == 3
    assert value(found, "twinkle_tenant_queue_depth", tenant="tn-a") == 3
    assert value(found, "twinkle_engine_calls_running", lane="training") == 1
    assert value(found, "twinkle_engine_max_calls") == 1
    assert value(found, "twinkle_adapters", base_model="base", state="resident") == 2
    assert value(found, "twinkle_adapters", base_model="base", state="paged_host") == 3
    assert value(found, "twinkle_adapters", base_model="base", state="paged_disk") == 1
    assert value(found, "twinkle_adapters_max_resident", base_model="base") == 4
    assert value(found, "twinkle_adapter_page_outs_total", base_model="base") == 6
    assert not any(dict(labels).get("base_model") == "idle" for _, labels in found)  # no pool yet: no series


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    body, content_type = Metrics(process=False).render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert Metrics(process=False).render()[1].startswith("text/plain")


# ----- the scheduler's calls -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'twinkle.db'}", threads=2)
    database.migrate()
    yield database
    database.close()


def test_the_scheduler_reports_queue_wait_engine_calls_and_outcomes_per_tenant(db: Database) -> None:
    tenant = f"tn-{uuid.uuid4().hex[:8]}"
    db.call(lambda s: s.add(Tenant(id=tenant, name=tenant)))
    metrics = Metrics(process=False)

    async def scenario() -> Samples:
        hub = FutureHub(db)
        scheduler = Scheduler(hub, metrics=metrics)
        gate = asyncio.Event()

        async def ok() -> tuple[bytes, str]:
            await gate.wait()
            return b"{}", "json"

        async def failing() -> tuple[bytes, str]:
            raise OperationFailed("no")

        ids = []
        for seq, (kind, run, cost) in enumerate([(OpKind.FORWARD_BACKWARD, ok, 40), (OpKind.OPTIM_STEP, ok, 0),
                                                 (OpKind.FORWARD_BACKWARD, failing, 9)], start=1):
            sub = await hub.submit(tenant_id=tenant, kind=kind, scope="model:m", seq_id=seq, fingerprint=f"f{seq}")
            scheduler.submit("model:m", seq_id=seq, request_id=sub.request_id, kind=kind, run=run, tenant=tenant,
                             ordered=True, cost=cost)
            ids.append(sub.request_id)
        assert scheduler.load()[Lane.TRAINING] == LaneLoad(queued=3, running=0, capacity=1)
        assert scheduler.queued_by_tenant() == {tenant: 3}
        scheduler.start()
        while scheduler.load()[Lane.TRAINING].running == 0:
            await asyncio.sleep(0.001)
        assert scheduler.load()[Lane.TRAINING] == LaneLoad(queued=2, running=1, capacity=1)
        gate.set()
        for request_id in ids:
            await hub.wait(tenant, request_id, 5)
        await scheduler.stop()
        return scrape(metrics)

    found = arun(scenario)
    fb = {"tenant": tenant, "kind": "forward_backward"}
    assert value(found, "twinkle_ops_submitted_total", **fb) == 2
    assert value(found, "twinkle_ops_total", **fb, outcome="done") == 1
    assert value(found, "twinkle_ops_total", **fb, outcome="failed") == 1
    assert value(found, "twinkle_ops_total", tenant=tenant, kind="optim_step", outcome="done") == 1
    assert value(found, "twinkle_trained_tokens_total", tenant=tenant) == 40  # the failed one's 9 are not
    assert value(found, "twinkle_op_queue_wait_seconds_count", lane="training", kind="forward_backward") == 2
    assert value(found, "twinkle_op_queue_wait_seconds_count", lane="training", kind="optim_step") == 1
    assert value(found, "twinkle_engine_call_duration_seconds_count", lane="training", kind="optim_step") == 1
    assert value(found, "twinkle_engine_busy_seconds_total", lane="training") > 0


# ----- GET /metrics ------------------------------------------------------------------------------
def make_client(data_dir: Path, **settings) -> TestClient:
    config = Settings(data_dir=data_dir, base_model="tiny-qwen3", long_poll_seconds=1, **settings)
    return local_client(create_app(build_runtime(config, engine=IdleEngine())))


@pytest.fixture(scope="module")
def keys_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory.mktemp("keys"), auth="keys", admin_key=ADMIN_KEY) as c:
        yield c


def test_open_mode_serves_metrics_with_route_templates_and_no_keys(tmp_path: Path) -> None:
    key = "tml-metrics-open-key-0123"
    with make_client(tmp_path) as client:
        session_id = client.post("/api/v1/create_session", json=SESSION, headers={"X-API-Key": key}).json()["session_id"]
        finished = client.post(f"/api/v1/sessions/{session_id}/finish", json={}, headers={"X-API-Key": key})
        client.get(f"/no/such/route/{session_id}")
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    found = samples(r.text)
    routes = {dict(labels).get("route") for name, labels in found if name == "twinkle_http_requests_total"}
    assert {"/api/v1/create_session", "/api/v1/sessions/{session_id}/finish", "unmatched"} <= routes, finished.text
    assert session_id not in r.text  # ids are never labels
    assert key not in r.text and hashlib.sha256(key.encode()).hexdigest() not in r.text


def test_a_second_app_in_the_process_has_its_own_counts(tmp_path: Path) -> None:
    health = {"method": "GET", "route": "/api/v1/healthz", "status": "200"}
    with make_client(tmp_path / "a") as first, make_client(tmp_path / "b") as second:
        for _ in range(3):
            assert first.get("/api/v1/healthz").status_code == 200
        assert value(samples(first.get("/metrics").text), "twinkle_http_requests_total", **health) == 3
        assert value(samples(second.get("/metrics").text), "twinkle_http_requests_total", **health) == 0


def test_keys_mode_wants_the_admin_key(keys_client: TestClient) -> None:
    assert "Authorization: Bearer" in error(keys_client.get("/metrics"), 401)["error"]
    wrong = error(keys_client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}x"}), 401)
    assert wrong["error"] == "wrong admin key" and ADMIN_KEY not in str(wrong)
    error(keys_client.get("/metrics", headers={"Authorization": "Basic " + ADMIN_KEY}), 401)  # not bearer
    new_tenant(keys_client, "scraper")
    tenant_key = new_key(keys_client, "scraper")["key"]
    for headers in ({"Authorization": f"Bearer {tenant_key}"}, {"X-API-Key": tenant_key}, {"X-Admin-Key": tenant_key}):
        error(keys_client.get("/metrics", headers=headers), 401)  # a tenant's key is no admin key
    r = keys_client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    assert keys_client.get("/metrics", headers=ADMIN).status_code == 200
    assert tenant_key not in r.text


def test_keys_mode_without_an_admin_key_says_how_to_enable_it(tmp_path: Path) -> None:
    with make_client(tmp_path, auth="keys") as client:
        body = error(client.get("/metrics", headers={"Authorization": "Bearer whatever-it-is-0123"}), 404)
    assert "admin key" in body["error"] and "TWINKLE_ADMIN_KEY" in body["error"]


# ----- tracing (off by default) ----------------------------------------------------------------------
def traced() -> tuple[Tracing, InMemorySpanExporter]:
    provider, exported = TracerProvider(shutdown_on_exit=False), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return Tracing(provider), exported


def test_tracing_is_off_by_default(tmp_path: Path) -> None:
    config = Settings(data_dir=tmp_path, base_model="tiny-qwen3")
    assert not config.otel_tracing and not Tracing.from_settings(config, "inst-1").on
    assert Tracing().op_submitted("forward", "req-1", "tn-a") is None
    console = Tracing.from_settings(Settings(data_dir=tmp_path, otel_tracing=True), "inst-1")  # no endpoint: stdout
    assert console.on
    console.shutdown()
    with pytest.raises(ValueError, match="otel_endpoint"):
        Settings(data_dir=tmp_path, otel_tracing=True, otel_endpoint="ftp://collector/v1/traces")


def test_an_operation_span_is_the_child_of_its_request_and_parent_of_its_engine_call(db: Database) -> None:
    tenant = f"tn-{uuid.uuid4().hex[:8]}"
    db.call(lambda s: s.add(Tenant(id=tenant, name=tenant)))
    tracing, exported = traced()

    async def scenario() -> None:
        hub = FutureHub(db)
        scheduler = Scheduler(hub, tracing=tracing)

        async def run_many(payloads: list[int]) -> list[tuple[bytes, str]]:
            return [(b"{}", "json") for _ in payloads]

        async def one() -> tuple[bytes, str]:
            return b"{}", "json"

        batch = Batch(key="k", size=1, budget=8, payload=1, run=run_many)
        tracer = tracing.provider.get_tracer("test")
        ids = []
        with tracer.start_as_current_span("POST /api/v1/forward"):  # what the HTTP middleware makes current
            for seq in (1, 2):  # two contiguous ops of one batch key: one engine call
                sub = await hub.submit(tenant_id=tenant, kind=OpKind.FORWARD, scope="model:t", seq_id=seq,
                                       fingerprint=f"t{seq}")
                scheduler.submit("model:t", seq_id=seq, request_id=sub.request_id, kind=OpKind.FORWARD, run=one,
                                 tenant=tenant, ordered=True, batch=batch)
                ids.append(sub.request_id)
        scheduler.start()
        for request_id in ids:
            await hub.wait(tenant, request_id, 5)
        await scheduler.stop()

    arun(scenario)
    spans = {span.name: span for span in exported.get_finished_spans() if span.name != "op forward"}
    ops = [span for span in exported.get_finished_spans() if span.name == "op forward"]
    request, engine = spans["POST /api/v1/forward"], spans["engine forward"]
    assert len(ops) == 2 and {op.parent.span_id for op in ops} == {request.context.span_id}
    assert all(op.attributes["twinkle.tenant"] == tenant and op.status.is_ok for op in ops)
    assert engine.parent.span_id == ops[0].context.span_id and engine.attributes["twinkle.call.ops"] == 2
    assert [link.context.span_id for link in engine.links] == [ops[1].context.span_id]  # the batched one
    assert all(op.events[0].name == "engine_call_started" for op in ops)


def test_http_spans_name_the_route_template_follow_traceparent_and_hold_no_key(tmp_path: Path) -> None:
    key = "tml-traced-key-0123456789"
    tracing, exported = traced()
    runtime = build_runtime(Settings(data_dir=tmp_path, base_model="tiny-qwen3", long_poll_seconds=1),
                            engine=IdleEngine())
    runtime.tracing = tracing  # the HTTP middleware's (the scheduler's stays off: no ops here)
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with local_client(create_app(runtime)) as client:
        session_id = client.post("/api/v1/create_session", json=SESSION,
                                 headers={"X-API-Key": key, "traceparent": caller}).json()["session_id"]
        client.post(f"/api/v1/sessions/{session_id}/finish", json={}, headers={"X-API-Key": key})
    spans = {span.name: span for span in exported.get_finished_spans()}
    created = spans["POST /api/v1/create_session"]
    assert format(created.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(created.parent.span_id, "016x") == "b7ad6b7169203331"
    assert created.attributes["http.route"] == "/api/v1/create_session"
    assert created.attributes["http.response.status_code"] == 200
    assert "POST /api/v1/sessions/{session_id}/finish" in spans
    everything = str([(s.name, dict(s.attributes), [dict(e.attributes) for e in s.events]) for s in spans.values()])
    assert key not in everything and hashlib.sha256(key.encode()).hexdigest() not in everything
    assert session_id not in everything
