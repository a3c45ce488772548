"""ASGI middleware: request id, one JSON access-log line and request metrics per HTTP request."""

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import UNRESOLVED, Metrics

log = logging.getLogger("embedserve.access")

# Probes and scrapes would drown the access log and the request metrics.
_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


class AccessMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._observe(scope, status, time.perf_counter() - started, request_id)

    def _observe(self, scope: Scope, status: int, elapsed_s: float, request_id: str) -> None:
        path = scope["path"]
        if path in _QUIET_PATHS:
            return
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        version = scope["state"].get("model_version")
        model, version_label = (version.model, str(version.version)) if version else (UNRESOLVED, UNRESOLVED)
        self.metrics.requests.labels(route, model, version_label, str(status)).inc()
        self.metrics.request_latency.labels(route, model, version_label).observe(elapsed_s)
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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))[:128]
    return None
