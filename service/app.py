"""create_app: the lifespan wires the parts, routers are mounted, errors are mapped to HTTP in one place."""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from service import ops
from service.backends.contract import Backend
from service.backends.onnx import OnnxBackend
from service.edge.access import AccessMiddleware
from service.edge.auth import require
from service.edge.body_limit import BodyLimitMiddleware
from service.edge.json_body import invalid_request
from service.edge.protocol import ErrorBody, ErrorDetail
from service.embeddings import router as embeddings
from service.embeddings import tei
from service.embeddings.batcher import Batcher
from service.embeddings.cache import CircuitBreaker, EmbeddingCache
from service.embeddings.embedder import Embedder
from service.embeddings.queue import LaneLimits, QueueLimits
from service.embeddings.versions import VersionLoader
from service.errors import ApiError
from service.models import router as models
from service.models.store import ModelStore, ModelVersion
from service.releases import router as releases
from service.releases.ledger import Budget, MemoryReleaseLedger, RedisReleaseLedger, ReleaseLedger
from service.releases.signals import ReleaseMetrics, ReleaseSignals
from service.rollouts import router as rollouts
from service.rollouts.analysis import RolloutAnalysis
from service.rollouts.shadow import ShadowMirror
from service.rollouts.store import MemoryRolloutStore, RedisRolloutStore, RolloutMetrics, RolloutStore, RolloutWatcher
from service.rollouts.window import CanaryWindow
from service.settings import Settings
from service.telemetry.drift import DriftMonitor, TextSample
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import create_tracing
from service.vectors import router as collections
from service.vectors.metrics import VectorMetrics
from service.vectors.store import VectorStore

log = logging.getLogger(__name__)


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "triton":
        # The [triton] extra: only a gateway that sends inference to Triton needs tritonclient.
        from service.backends.triton import TritonBackend, TritonTls

        tls = (
            TritonTls(settings.triton_tls_ca_file, settings.triton_tls_cert_file, settings.triton_tls_key_file)
            if settings.triton_tls
            else None
        )
        explicit = settings.triton_model_control == "explicit"
        return TritonBackend(
            settings.triton_url,
            timeout_s=settings.triton_timeout_s,
            explicit_loading=explicit,
            tls=tls,
            batches_in_flight=settings.triton_batches_in_flight,
        )
    return OnnxBackend(
        threads=settings.inference_threads,
        device=settings.device,
        spinning=settings.inference_spinning,
        parallel_batches=settings.inference_parallel_batches,
    )


def create_cache(settings: Settings, metrics: Metrics, tracer: Tracer) -> EmbeddingCache | None:
    if not settings.cache_enabled:
        return None
    redis = None
    if settings.redis_url:
        timeout_s = settings.redis_timeout_ms / 1000
        redis = Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    breaker = CircuitBreaker(settings.redis_failure_threshold, settings.redis_retry_after_s, metrics)
    return EmbeddingCache(
        metrics,
        l1_max_bytes=settings.cache_memory_bytes,
        redis=redis,
        redis_prefix=settings.redis_prefix,
        ttl_s=settings.cache_ttl_s,
        breaker=breaker,
        tracer=tracer,
    )


def create_release_ledger(settings: Settings) -> ReleaseLedger:
    """The release ledger and budget: in Redis when configured (every replica shares it), else in-process."""
    budget = Budget(
        max_releases=settings.release_max_per_window,
        max_training_hours=settings.release_max_training_hours,
        window_s=settings.release_window_s,
        max_duration_s=settings.release_max_duration_s,
    )
    if not settings.redis_url:
        return MemoryReleaseLedger(budget)
    timeout_s = settings.redis_timeout_ms / 1000
    redis = Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return RedisReleaseLedger(redis, settings.redis_prefix, budget)


def create_rollout_store(settings: Settings) -> RolloutStore:
    """Redis when configured, so every replica routes alike; else this process only."""
    if not settings.redis_url:
        return MemoryRolloutStore()
    timeout_s = settings.redis_timeout_ms / 1000
    redis = Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return RedisRolloutStore(redis, settings.redis_prefix)


def batcher_factory(
    settings: Settings, backend: Backend, metrics: Metrics, tracer: Tracer
) -> Callable[[ModelVersion], Batcher]:
    """What makes (and starts) a version's batcher: at start, and for each version hot-loaded later."""
    # In process, a version runs a batch per thread at most (service.backends.onnx), and a bulk batch is small and
    # runs alone, so an interactive input waits behind one at most; a remote GPU idles through each round trip
    # unless several batches are in flight, and gains from larger ones in both lanes.
    triton = settings.backend == "triton"
    interactive_tokens = settings.triton_max_batch_tokens if triton else settings.max_batch_tokens
    limits = QueueLimits(
        interactive=LaneLimits(settings.max_batch_size, interactive_tokens, settings.max_queue_inputs),
        bulk=LaneLimits(
            settings.max_batch_size,
            settings.triton_max_batch_tokens if triton else settings.bulk_max_batch_tokens,
            settings.max_bulk_queue_inputs,
        ),
        bulk_share=settings.bulk_share,
        max_wait_ms=settings.max_wait_ms,
    )
    bulk_alone = isinstance(backend, OnnxBackend)  # bulk batches on every thread: see the batcher

    def make(version: ModelVersion) -> Batcher:
        batcher = Batcher(version, backend, limits, metrics, tracer, backend.batches_in_flight, bulk_alone)
        batcher.start()
        return batcher

    return make


def create_app(settings: Settings, span_exporter: SpanExporter | None = None) -> FastAPI:
    """The gateway app; its parts are built in the lifespan from ``settings``. Spans go to ``span_exporter``
    when given (tests), else to ``settings.otlp_endpoint``."""
    metrics = Metrics()
    tracing = create_tracing(settings, span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await asyncio.to_thread(ModelStore.scan, settings.model_repository)
        metrics.describe_store(store)
        backend = create_backend(settings)
        await backend.start(store.all())
        app.state.store = store
        app.state.backend = backend
        make_batcher = batcher_factory(settings, backend, metrics, tracing.tracer)
        batchers = {(v.model, v.version): make_batcher(v) for v in store.all()}
        app.state.batchers = batchers
        # New version folders are loaded and served while the gateway runs; gone or changed ones stop serving.
        versions = VersionLoader(store, backend, batchers, make_batcher, metrics, settings.model_rescan_s)
        versions.start()
        app.state.versions = versions
        cache = create_cache(settings, metrics, tracing.tracer)
        rollout_metrics = RolloutMetrics(metrics.registry)
        rollout_watcher = RolloutWatcher(
            create_rollout_store(settings),
            store,
            settings.rollout_refresh_s,
            rollout_metrics,
            configured_stable=settings.stable_versions,
        )
        await rollout_watcher.refresh()
        rollout_watcher.start()
        app.state.rollouts = rollout_watcher
        drift = DriftMonitor(
            store,
            metrics.registry,
            capacity=settings.drift_sample_size,
            min_samples=settings.drift_min_samples,
            interval_s=settings.drift_interval_s,
        )
        drift.start()
        app.state.drift = drift
        app.state.texts = TextSample(settings.drift_text_sample_size)
        app.state.embedder = Embedder(
            settings, store, batchers, cache, metrics, rollout_watcher, drift=drift, texts=app.state.texts
        )
        # Vector store: connects in the background (resuming re-indexes); without Milvus only its routes fail.
        vector_store = VectorStore(settings, app.state.embedder, VectorMetrics(metrics.registry), tracing.tracer)
        vector_store.start()
        app.state.vector_store = vector_store
        # Canary rollouts: what each version served, shadow traffic, and the loop that judges canaries.
        canary_window = CanaryWindow()
        app.state.canary_window = canary_window
        app.state.shadow = ShadowMirror(
            app.state.embedder, store, rollout_watcher, canary_window, rollout_metrics, tracer=tracing.tracer
        )
        analysis = RolloutAnalysis(
            rollout_watcher,
            canary_window,
            drift,
            app.state.texts,
            app.state.embedder,
            vector_store,
            rollout_metrics,
            tracing.tracer,
        )
        analysis.start()
        app.state.analysis = analysis
        # Releases: the shared ledger and budget, and the signals (model age, drift streaks) that make one due.
        app.state.release_ledger = create_release_ledger(settings)
        release_signals = ReleaseSignals(
            store,
            rollout_watcher,
            drift,
            app.state.release_ledger,
            ReleaseMetrics(metrics.registry),
            max_age_s=settings.release_max_model_age_s,
            drift_threshold=settings.release_drift_mmd,
            drift_intervals=settings.release_drift_intervals,
            interval_s=settings.drift_interval_s,
        )
        await release_signals.refresh()
        release_signals.start()
        app.state.release_signals = release_signals
        # Everything built so far lives as long as the app: keep it out of the garbage collector's
        # scans, whose full passes otherwise show up as tail latency.
        gc.freeze()
        if settings.allow_anonymous_writes and not settings.api_keys:
            log.warning(
                "ANONYMOUS WRITES ALLOWED: anyone who reaches this gateway can create, fill, delete and re-index "
                "collections (EMBEDSERVE_ALLOW_ANONYMOUS_WRITES=true); set EMBEDSERVE_API_KEYS with write scopes"
            )
        log.info(
            "gateway started",
            extra={"versions": [v.name for v in store.all()], "refused": len(store.refused), "backend": backend.name},
        )
        try:
            yield
        finally:
            await release_signals.close()
            await app.state.release_ledger.close()
            await analysis.close()
            await versions.close()
            await app.state.shadow.close()
            await vector_store.close()
            await drift.close()
            await rollout_watcher.close()
            for batcher in batchers.values():
                await batcher.stop()
            if cache is not None:
                await cache.close()
            await backend.close()
            await asyncio.to_thread(tracing.shutdown)

    # FastAPI's own OpenTelemetry (HTTP spans, metrics, logs) stays off: the app's spans and metrics are its
    # own (service.telemetry), and a process-wide provider (opentelemetry-instrument) would get a second span
    # for every request. Off, FastAPI also stops looking the global providers up on every request.
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="embedserve", version="0.1.0", lifespan=lifespan, telemetry=telemetry)
    app.state.settings = settings
    app.state.draining = False  # set on SIGTERM by the server (service/__main__.py): /readyz answers 503
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.include_router(embeddings.router)  # its route checks the embed scope itself
    app.include_router(tei.router)  # TEI's routes: embed scope, except the /health probe
    app.include_router(ops.router)
    app.include_router(models.router, dependencies=[Depends(require("embed"))])
    app.include_router(collections.router)  # each route names its scope: search, or write
    app.include_router(rollouts.router)
    app.include_router(releases.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AccessMiddleware, metrics=metrics, tracer=tracing.tracer)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _error_response(
    status: int, message: str, error_type: str, param: str | None, code: str | None, headers: dict[str, str]
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    headers = dict(error.headers)
    chosen: ModelVersion | None = getattr(request.state, "model_version", None)
    if chosen is not None:  # failed after a version was chosen: say which one, as on success
        headers.setdefault("x-model-version", str(chosen.version))
    return _error_response(error.status_code, error.message, error.error_type, error.param, error.code, headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    """Wrong JSON types or malformed JSON: a 400 naming the field, as OpenAI does (not FastAPI's 422)."""
    assert isinstance(error, RequestValidationError)
    return await _api_error(request, invalid_request(error))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code, "http_error")
    return _error_response(
        error.status_code, str(error.detail), "invalid_request_error", None, code, dict(error.headers or {})
    )


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    log.exception("unexpected error", extra={"request_id": request_id, "error_type": type(error).__name__})
    return _error_response(
        500,
        f"Internal error (request id {request_id}); it has been logged.",
        "server_error",
        None,
        "internal_error",
        {},
    )
