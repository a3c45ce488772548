"""Prometheus metrics; every series carries the ``model`` and ``version`` labels (but the Redis circuit's).

Each app owns its registry, so several apps (tests, two gateways in one process) never share series.
"""

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

from service.models.store import ModelStore, ModelVersion

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Label value for requests that failed before a model version was chosen (bad JSON, unknown model).
UNRESOLVED = ""


class Metrics:
    def __init__(self) -> None:
        # *_created series double the scrape size and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embedserve_requests",
            "HTTP requests by route and status code.",
            ["route", "model", "version", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "embedserve_request_duration_seconds",
            "End-to-end HTTP request latency.",
            ["route", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inputs = Counter(
            "embedserve_inputs_embedded", "Inputs embedded.", ["model", "version"], registry=self.registry
        )
        self.internal_inputs = Counter(
            "embedserve_internal_inputs_embedded",
            "Inputs embedded for the gateway's own work, by purpose (shadow, analysis, reindex); client inputs "
            "are embedserve_inputs_embedded_total.",
            ["model", "version", "purpose"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "embedserve_tokens_embedded",
            "Tokens embedded (special tokens included, after truncation).",
            ["model", "version"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "embedserve_model_info",
            "1 for every model version the gateway serves; labels say what it is.",
            ["model", "version", "sha256", "parent"],
            registry=self.registry,
        )
        self.version_refused = Gauge(
            "embedserve_model_version_refused",
            "1 for a version refused because its files don't match its manifest (or changed after it was loaded).",
            ["model", "version"],
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "embedserve_model_load_seconds",
            "Seconds the backend took to load a version found while the gateway ran (hot-loading).",
            ["model", "version"],
            registry=self.registry,
        )

        versioned = ["model", "version"]
        self.batch_size = Histogram(
            "embedserve_batch_size",
            "Inputs per inference batch.",
            versioned,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_padded_tokens = Histogram(
            "embedserve_batch_padded_tokens",
            "Tokens per inference batch, padding included.",
            versioned,
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.padding_ratio = Histogram(
            "embedserve_batch_padding_ratio",
            "Share of a batch's tokens that are padding.",
            versioned,
            buckets=RATIO_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "embedserve_queue_depth", "Inputs waiting in the batcher's queue.", versioned, registry=self.registry
        )
        self.queue_wait = Histogram(
            "embedserve_queue_wait_seconds",
            "Time an input waited in the queue before its batch ran.",
            versioned,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batches_in_flight = Gauge(
            "embedserve_batches_in_flight",
            "Batches of the version running in the backend now (up to EMBEDSERVE_TRITON_BATCHES_IN_FLIGHT).",
            versioned,
            registry=self.registry,
        )
        self.batcher_restarts = Counter(
            "embedserve_batcher_restarts",
            "Times the version's batcher worker died and was restarted (the version is not ready meanwhile).",
            versioned,
            registry=self.registry,
        )
        self.inference_latency = Histogram(
            "embedserve_inference_duration_seconds",
            "Backend time per inference batch.",
            versioned,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "embedserve_rejected_requests",
            "Requests refused by backpressure: queue_full (429) or timeout (504).",
            [*versioned, "reason"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "embedserve_batcher_dropped_inputs",
            "Queued inputs dropped before inference (client gone, deadline).",
            [*versioned, "reason"],
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "embedserve_cache_lookups",
            "Cache lookups per layer (memory, redis) and result (hit, miss).",
            [*versioned, "layer", "result"],
            registry=self.registry,
        )
        self.cache_memory_bytes = Gauge(
            "embedserve_cache_memory_bytes",
            "Bytes of each version's entries in the in-process cache (one budget shared by all versions).",
            versioned,
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "embedserve_redis_errors",
            "Redis calls that failed or timed out.",
            [*versioned, "operation"],
            registry=self.registry,
        )
        # The one series without model and version: the breaker guards the Redis connection every version
        # shares, so its state has no version (per-version copies would multiply pods in sum() and alerts).
        self.redis_circuit_open = Gauge(
            "embedserve_redis_circuit_open", "1 while the Redis circuit breaker skips Redis.", registry=self.registry
        )

    def describe_store(self, store: ModelStore) -> None:
        for version in store.all():
            with contextlib.suppress(KeyError):  # refused once, served now (its folder was fixed)
                self.version_refused.remove(version.model, str(version.version))
            parent = version.manifest.parent_version
            self.model_info.labels(
                version.model, str(version.version), version.manifest.sha256, "" if parent is None else str(parent)
            ).set(1)
        for refused in store.refused:
            self.version_refused.labels(refused.model, str(refused.version)).set(1)

    def version_unloaded(self, version: ModelVersion) -> None:
        """``version`` is no longer served: its info series goes (its counters stay, as history)."""
        parent = version.manifest.parent_version
        labels = (version.model, str(version.version), version.manifest.sha256, "" if parent is None else str(parent))
        with contextlib.suppress(KeyError):
            self.model_info.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
