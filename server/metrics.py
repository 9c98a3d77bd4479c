"""The server's Prometheus metrics: one registry per Runtime (never prometheus-client's global
one, so that several apps in one process do not collide), its instruments, and the one-line
calls the rest of the server makes. `GET /metrics` (gateway/routes/metrics.py) renders it;
docs/metrics.md lists every metric.

Cheap on the hot path: an instrument call is a dict lookup and a short lock inside
prometheus-client. What is a state rather than an event (queue depth, calls running, adapters
resident or paged out) is read at scrape time from the source a Runtime registers (`watch`), so
nothing is kept up to date per operation. Labels are bounded: routes are templates, tenants are
tenant ids (never a key or its hash), kinds are server.kinds.OpKind values, lanes Lane values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from server.kinds import OpKind
from workers.types import PoolStatus

PREFIX = "twinkle"
# Seconds: from a no-op round trip (a few ms) to a long-poll (25 s) or a long training step.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
COMPUTED = frozenset({OpKind.FORWARD, OpKind.FORWARD_BACKWARD})  # their cost is their tokens
UNMATCHED = "unmatched"  # the route label of a request no route matched or refused before routing: never its raw path


@dataclass(frozen=True)
class LaneLoad:
    """One scheduler lane, now."""

    queued: int  # operations waiting in the lane's queues
    running: int  # engine calls under way
    capacity: int  # engine calls the lane may run at once


@dataclass(frozen=True)
class Gauges:
    """What a Runtime reports at scrape time (server/runtime.py `Runtime.gauges`)."""

    lanes: Mapping[str, LaneLoad] = field(default_factory=dict)
    max_calls: int | None = None  # engine calls at once over every lane (None: only the lanes' limits)
    queued_by_tenant: Mapping[str, int] = field(default_factory=dict)
    pools: Mapping[str, PoolStatus | None] = field(default_factory=dict)  # base model -> its LoRA pool
    futures_pending: int = 0  # submitted to this process and not ended


class Metrics:
    """A registry and its instruments. `process=False` leaves out the process, platform and GC
    collectors (for the many short-lived schedulers of unit tests)."""

    def __init__(self, *, process: bool = True) -> None:
        prometheus_client.disable_created_metrics()  # no `_created` twin of every counter and histogram
        self.registry = registry = CollectorRegistry()
        if process:
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
        self._scraped = _Scraped()
        registry.register(self._scraped)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=registry, buckets=buckets)

        # HTTP
        self.http_requests = counter("http_requests", "HTTP requests answered, by route template and status",
                                     ("method", "route", "status"))
        self.http_seconds = histogram("http_request_duration_seconds",
                                      "HTTP request latency, from the first byte in to the last byte out",
                                      ("method", "route"), FAST_BUCKETS)
        # Operations (futures)
        self.ops_submitted = counter("ops_submitted", "Operations queued, by tenant and kind", ("tenant", "kind"))
        self.ops_ended = counter("ops", "Operations ended, by tenant, kind and outcome (done, failed)",
                                 ("tenant", "kind", "outcome"))
        self.queue_wait = histogram("op_queue_wait_seconds", "Time from an operation's submission to its engine "
                                    "call's start", ("lane", "kind"), FAST_BUCKETS)
        self.op_seconds = histogram("op_duration_seconds", "Time from an operation's submission to its outcome "
                                    "being stored", ("kind",), SLOW_BUCKETS)
        # Engine calls
        self.call_seconds = histogram("engine_call_duration_seconds", "Engine calls (one or several batched or "
                                      "packed operations), by lane and the kind of their first operation",
                                      ("lane", "kind"), SLOW_BUCKETS)
        self.busy = counter("engine_busy_seconds", "Seconds of engine calls under way, summed over a lane's calls: "
                            "rate() / twinkle_engine_lane_capacity is the lane's busy fraction", ("lane",))
        # Tokens, per tenant: rate() is tokens/s
        self.trained = counter("trained_tokens", "Tokens of forward_backward data computed", ("tenant",))
        self.forwarded = counter("forward_tokens", "Tokens of forward (no gradient) data computed", ("tenant",))
        self.sampled = counter("sampled_tokens", "Tokens generated by sample requests", ("tenant",))
        self.prompted = counter("prompt_tokens", "Prompt tokens of sample requests", ("tenant",))

    def watch(self, source: Callable[[], Gauges]) -> None:
        """Report what `source` returns at every scrape (its Runtime's queues and pools)."""
        self._scraped.source = source

    # ----- the calls the server makes (one line at each site) --------------------------------------
    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)

    def submitted(self, tenant: str, kind: str) -> None:
        self.ops_submitted.labels(tenant, kind).inc()

    def call_started(self, lane: str, waits: Iterable[tuple[str, float]]) -> None:
        """An engine call started: each of its operations' (kind, seconds since submission)."""
        for kind, seconds in waits:
            self.queue_wait.labels(lane, kind).observe(seconds)

    def call_ended(self, lane: str, kind: str, seconds: float) -> None:
        self.call_seconds.labels(lane, kind).observe(seconds)
        self.busy.labels(lane).inc(seconds)

    def op_ended(self, tenant: str, kind: str, ok: bool, seconds: float, cost: int = 0) -> None:
        """An operation's outcome was stored. `cost`: its tokens (server/queue/pick.py Op.cost), which
        for a forward or forward_backward are exactly the tokens of its data."""
        self.ops_ended.labels(tenant, kind, "done" if ok else "failed").inc()
        self.op_seconds.labels(kind).observe(seconds)
        if ok and kind in COMPUTED:
            (self.trained if kind == OpKind.FORWARD_BACKWARD else self.forwarded).labels(tenant).inc(cost)

    def sample_done(self, tenant: str, prompt: int, generated: int) -> None:
        self.prompted.labels(tenant).inc(prompt)
        self.sampled.labels(tenant).inc(generated)

    # ----- exposition -----------------------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (Prometheus text unless it accepts
        OpenMetrics), and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _Scraped:
    """The gauges read at scrape time, from the watched source."""

    def __init__(self) -> None:
        self.source: Callable[[], Gauges] = Gauges  # nothing watched yet: no samples

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

        depth = gauge("queue_depth", "Operations queued (not yet running), by lane", ("lane",))
        running = gauge("engine_calls_running", "Engine calls under way, by lane", ("lane",))
        capacity = gauge("engine_lane_capacity", "Engine calls a lane may run at once", ("lane",))
        max_calls = gauge("engine_max_calls", "Engine calls that may run at once over all lanes (absent: the "
                          "lanes' capacities add up)")
        by_tenant = gauge("tenant_queue_depth", "Operations queued (not yet running), by tenant", ("tenant",))
        pending = gauge("futures_pending", "Futures submitted to this process and not ended")
        adapters = gauge("adapters", "Adapters of a base model's LoRA pool, by state: resident (on the compute "
                         "device), pinned (the sampler's, outside the pool), paged_host, paged_disk",
                         ("base_model", "state"))
        max_resident = gauge("adapters_max_resident", "Tenant adapters the pool keeps resident (absent: no limit)",
                             ("base_model",))
        host_bytes = gauge("adapters_paged_host_bytes", "Bytes of paged-out adapters held in host memory",
                           ("base_model",))
        page_ins = CounterMetricFamily(f"{PREFIX}_adapter_page_ins", "Adapters paged in", labels=["base_model"])
        page_outs = CounterMetricFamily(f"{PREFIX}_adapter_page_outs", "Adapters paged out", labels=["base_model"])
        spills = CounterMetricFamily(f"{PREFIX}_adapter_spills", "Page-outs that went on to disk",
                                     labels=["base_model"])
        now = self.source()
        for lane, load in now.lanes.items():
            depth.add_metric([lane], load.queued)
            running.add_metric([lane], load.running)
            capacity.add_metric([lane], load.capacity)
        if now.max_calls is not None:
            max_calls.add_metric([], now.max_calls)
        for tenant, queued in now.queued_by_tenant.items():
            by_tenant.add_metric([tenant], queued)
        pending.add_metric([], now.futures_pending)
        for base, pool in now.pools.items():
            if pool is None:  # no compute call yet
                continue
            for state, count in (("resident", len(pool.resident)), ("pinned", pool.pinned),
                                 ("paged_host", pool.paged_in_host), ("paged_disk", pool.paged_on_disk)):
                adapters.add_metric([base, state], count)
            if pool.max_resident is not None:
                max_resident.add_metric([base], pool.max_resident)
            host_bytes.add_metric([base], pool.host_bytes)
            page_ins.add_metric([base], pool.page_ins)
            page_outs.add_metric([base], pool.page_outs)
            spills.add_metric([base], pool.spills)
        yield from (depth, running, capacity, max_calls, by_tenant, pending, adapters, max_resident, host_bytes,
                    page_ins, page_outs, spills)
