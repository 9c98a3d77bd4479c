"""Optional OpenTelemetry tracing of an operation, from its HTTP request to the engine and back. Off
by default (settings `otel_tracing`, `otel_endpoint`); off, every call here is one attribute test.

A trace of a submission: the HTTP request's server span (`POST /api/v1/forward_backward`, by
route template; a W3C `traceparent` sent by the client is its parent) -> the operation's span
(`op forward_backward`, from submission until its outcome is stored, so it outlives the request,
which answers at once) -> the engine call's span (`engine forward_backward`; a call that batches
or packs several operations is the child of the first and links the others). The long-polls of
retrieve_future are traces of their own; the operation's span carries its `twinkle.request_id`.

Spans carry the route template, method, status, operation kind, lane, request id and tenant id:
never a header, a body, an API key or its hash. Each Runtime has its own TracerProvider (nothing
global), exporting over OTLP/HTTP to `otel_endpoint`, or printing to stdout without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.config import ConfigError, Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER = "twinkle"
W3C = TraceContextTextMapPropagator()
EXPORTER_PACKAGE = "opentelemetry-exporter-otlp-proto-http"


class Tracing:
    """A TracerProvider and its tracer, or nothing (`Tracing()`: off)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.on = provider is not None
        self._tracer = provider.get_tracer(TRACER) if provider is not None else trace.NoOpTracer()

    @classmethod
    def from_settings(cls, settings: Settings, instance_id: str) -> Tracing:
        if not settings.otel_tracing:
            return cls()
        # Imported only when tracing is on: the SDK takes tens of ms to import.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        resource = Resource.create({"service.name": settings.otel_service_name, "service.instance.id": instance_id})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shut down by Runtime.stop
        if settings.otel_endpoint is None:
            exporter: Any = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ConfigError(f"otel_endpoint needs the OTLP exporter: pip install {EXPORTER_PACKAGE}") from None
            exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint, timeout=5)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop (a Runtime's stop)."""
        if self.provider is not None:
            self.provider.shutdown()

    # ----- an HTTP request (gateway/telemetry.py) ---------------------------------------------------
    def start_request(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> tuple[Any, object]:
        """The request's server span, made current (for the operation it submits); its parent is the
        caller's `traceparent`, if it sent one. Returns what end_request takes."""
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers
                   if name in (b"traceparent", b"tracestate")}
        span = self._tracer.start_span(method, context=W3C.extract(carrier) if carrier else None,
                                       kind=SpanKind.SERVER, attributes={"http.request.method": method})
        return span, context.attach(trace.set_span_in_context(span))

    def end_request(self, started: tuple[Any, object], method: str, route: str, status: int) -> None:
        span, token = started
        context.detach(token)
        span.update_name(f"{method} {route}")
        span.set_attributes({"http.route": route, "http.response.status_code": status})
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # ----- an operation (server/queue/scheduler.py) ---------------------------------------------------
    def op_submitted(self, kind: str, request_id: str, tenant: str) -> Any:
        """The operation's span, a child of the current one (its HTTP request's); None when off."""
        if not self.on:
            return None
        return self._tracer.start_span(f"op {kind}", attributes={
            "twinkle.op.kind": kind, "twinkle.request_id": request_id, "twinkle.tenant": tenant})

    def call_started(self, lane: str, ops: Sequence[Any], now: float) -> Any:
        """The engine call's span, from its operations (server/queue/pick.py Op: their `span`,
        `kind` and `queued_at`; `now` on the same clock): the child of the first one's, linking the
        others'; None when off."""
        if not self.on or ops[0].span is None:
            return None
        for op in ops:
            op.span.add_event("engine_call_started", {"twinkle.queue_wait_seconds": now - op.queued_at})
        kind = ops[0].kind
        links = [Link(op.span.get_span_context()) for op in ops[1:]]
        return self._tracer.start_span(f"engine {kind}", context=trace.set_span_in_context(ops[0].span), links=links,
                                       attributes={"twinkle.lane": lane, "twinkle.op.kind": kind,
                                                   "twinkle.call.ops": len(ops)})

    @staticmethod
    def call_ended(span: Any, ok: bool) -> None:
        if span is not None:
            if not ok:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    @staticmethod
    def op_ended(span: Any, ok: bool, category: str | None = None) -> None:
        if span is not None:
            if not ok:
                span.set_status(Status(StatusCode.ERROR, category))
            span.end()
