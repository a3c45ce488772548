"""Shadow traffic: a share of the requests stable serves is mirrored to the canary in the background.

The client's answer never waits for the mirror, and the mirror's answer is dropped; its latency and errors
go to the canary's ``CanaryWindow`` (what the analysis loop judges) and ``embedserve_shadow_requests``.
Each mirror is a trace of its own (a ``shadow`` span linked to the request it copies), so the client's
trace ends with its response and holds only what served it.
"""

import asyncio
import logging
import random
import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, Tracer

from service.embeddings.embedder import Embedder
from service.errors import ApiError
from service.models.store import ModelStore, ModelVersion
from service.rollouts.state import shadow
from service.rollouts.store import RolloutMetrics, RolloutWatcher
from service.rollouts.window import CanaryWindow
from service.telemetry.tracing import NO_TRACING, version_attributes

log = logging.getLogger(__name__)

# Mirrors in flight at most: past it, a mirror is skipped rather than queue behind real traffic.
MAX_IN_FLIGHT = 16


class ShadowMirror:
    def __init__(
        self,
        embedder: Embedder,
        store: ModelStore,
        rollouts: RolloutWatcher,
        window: CanaryWindow,
        metrics: RolloutMetrics,
        rng: random.Random | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._rollouts = rollouts
        self._window = window
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._tracer = tracer
        self._in_flight: set[asyncio.Task[None]] = set()

    def after_served(self, texts: list[str], served: ModelVersion, pinned: bool) -> None:
        """Mirror this request to the canary if it was routed (not pinned) to stable and falls in the share."""
        state = self._rollouts.get(served.model)
        if pinned or state is None or state.canary_version is None or served.version != state.stable_version:
            return
        if not shadow(state, self._rng):
            return
        canary = self._store.get(served.model, state.canary_version)
        if canary is None:
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self._metrics.shadow.labels(canary.model, str(canary.version), "skipped").inc()
            return
        origin = trace.get_current_span().get_span_context()
        task = asyncio.create_task(self._traced_mirror(texts, canary, origin))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _traced_mirror(self, texts: list[str], canary: ModelVersion, origin: SpanContext) -> None:
        links = [Link(origin)] if origin.is_valid else []
        attributes = {**version_attributes(canary), "inputs": len(texts)}
        with self._tracer.start_as_current_span("shadow", context=Context(), links=links, attributes=attributes):
            await self._mirror(texts, canary)

    async def _mirror(self, texts: list[str], canary: ModelVersion) -> None:
        started = time.perf_counter()
        labels = (canary.model, str(canary.version))
        try:
            result = await self._embedder.embed(texts, canary, "shadow")  # counted apart, out of drift
        except ApiError as error:
            self._window.record(*_key(canary), time.perf_counter() - started, failed=error.status_code >= 500)
            self._metrics.shadow.labels(*labels, "error").inc()
            return
        except Exception:  # a background task's boundary: the canary failed; counted like a 500
            log.exception("shadow request failed", extra={"model": canary.model, "version": canary.version})
            self._window.record(*_key(canary), time.perf_counter() - started, failed=True)
            self._metrics.shadow.labels(*labels, "error").inc()
            return
        self._window.record(*_key(canary), time.perf_counter() - started, failed=False, computed=result.computed > 0)
        self._metrics.shadow.labels(*labels, "ok").inc()

    async def close(self) -> None:
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)


def _key(version: ModelVersion) -> tuple[str, int]:
    return version.model, version.version
