"""The vector store's Prometheus series: items, upsert and search latency, re-index progress; labelled
collection, model and version, and forgotten with the collection or version they describe."""

from prometheus_client import CollectorRegistry, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class VectorMetrics:
    """The vector store's series, in the app's registry; labelled collection, model and version."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["collection", "model", "version"]
        self.upsert_latency = Histogram(
            "embedserve_collection_upsert_duration_seconds",
            "Upsert of one batch of items: embedding and Milvus writes.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.search_latency = Histogram(
            "embedserve_collection_search_duration_seconds",
            "Milvus time of one search (after the query is embedded), by mode: dense, keyword, hybrid.",
            [*labels, "mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.items = Gauge("embedserve_collection_items", "Items stored in the collection.", labels, registry=registry)
        self.reindex_progress = Gauge(
            "embedserve_collection_reindex_progress",
            "Share of items re-embedded into the version being built (version = the target), 0 to 1.",
            labels,
            registry=registry,
        )
        self._series: dict[str, set[tuple[Gauge | Histogram, tuple[str, ...]]]] = {}

    def _labels(self, metric: Gauge | Histogram, collection: str, *rest: str) -> tuple[str, ...]:
        values = (collection, *rest)
        self._series.setdefault(collection, set()).add((metric, values))
        return values

    def observe_upsert(self, collection: str, model: str, version: int, seconds: float) -> None:
        self.upsert_latency.labels(*self._labels(self.upsert_latency, collection, model, str(version))).observe(seconds)

    def observe_search(self, collection: str, model: str, version: int, mode: str, seconds: float) -> None:
        labels = self._labels(self.search_latency, collection, model, str(version), mode)
        self.search_latency.labels(*labels).observe(seconds)

    def set_items(self, collection: str, model: str, version: int, count: int) -> None:
        self.items.labels(*self._labels(self.items, collection, model, str(version))).set(count)

    def set_progress(self, collection: str, model: str, version: int, progress: float) -> None:
        labels = self._labels(self.reindex_progress, collection, model, str(version))
        self.reindex_progress.labels(*labels).set(progress)

    def forget(self, collection: str, version: int | None = None) -> None:
        """Remove the collection's series (only those of ``version``, when given)."""
        series = self._series.get(collection, set())
        for metric, values in list(series):
            if version is None or values[2] == str(version):
                metric.remove(*values)
                series.discard((metric, values))
