"""ASGI middleware: request id, a server span, one JSON access-log line and request metrics per HTTP request."""

import logging
import time
import uuid
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.models.store import ModelVersion
from service.telemetry.metrics import UNRESOLVED, Metrics
from service.telemetry.tracing import version_attributes

log = logging.getLogger("embedserve.access")

# Probes and scrapes would drown the access log, the request metrics and the traces.
_QUIET_PATHS = {"/healthz", "/readyz", "/health", "/metrics"}
# W3C Trace Context: a caller's traceparent makes each request span a child of the caller's span.
_PROPAGATOR = TraceContextTextMapPropagator()
# Its headers, cut to their longest valid size (a longer traceparent is invalid anyway, and would log a warning).
_TRACE_HEADERS = {b"traceparent": 64, b"tracestate": 512}


class AccessMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, tracer: Tracer) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = header_value(scope, b"x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if scope["path"] in _QUIET_PATHS:
            await self.app(scope, receive, send_with_id)
            return
        parent = _PROPAGATOR.extract(_trace_headers(scope))
        # Named by the method until routing has found the route template (never the raw path: ids, names).
        span = self.tracer.start_span(
            scope["method"],
            parent,
            SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "embedserve.request_id": request_id},
        )
        # Made current by hand: start_as_current_span's context managers cost more than the rest, tracing off.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            span.record_exception(error)
            raise
        finally:
            # Still current: the access-log line carries its trace id.
            self._observe(scope, status, time.perf_counter() - started, request_id, span)
            span.end()
            otel_context.detach(token)

    def _observe(self, scope: Scope, status: int, elapsed_s: float, request_id: str, span: Span) -> None:
        matched: str | None = getattr(scope.get("route"), "path", None)
        route = matched or "unmatched"
        version = scope["state"].get("model_version")
        model, version_label = (version.model, str(version.version)) if version else (UNRESOLVED, UNRESOLVED)
        self.metrics.requests.labels(route, model, version_label, str(status)).inc()
        self.metrics.request_latency.labels(route, model, version_label).observe(elapsed_s)
        if span.is_recording():
            _describe_span(span, scope["method"], matched, status, version)
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(elapsed_s * 1000, 2),
            "model": model,
            "version": version_label,
        }
        fields.update(scope["state"].get("log_fields", {}))
        log.info("request", extra=fields)


def _describe_span(span: Span, method: str, route: str | None, status: int, version: ModelVersion | None) -> None:
    span.set_attribute("http.response.status_code", status)
    if route is not None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    if version is not None:
        span.set_attributes(version_attributes(version))
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def _trace_headers(scope: Scope) -> dict[str, str]:
    return {
        key.decode(): value.decode("latin-1")[: _TRACE_HEADERS[key]]
        for key, value in scope["headers"]
        if key in _TRACE_HEADERS
    }


def header_value(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of an ASGI request (latin-1, cut to 128 characters), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))[:128]
    return None
