"""Drift of served embeddings against a version's reference statistics, and neighbourhood agreement.

Each served batch goes into a per-version reservoir (a uniform sample of everything the version served);
every interval the reservoir is compared with the reference sample and mean the manifest carries
(``reference_stats``, written at export): a kernel MMD and the cosine distance of the mean vectors, set
as gauges labelled by model and version. A per-model sample of recent request texts (memory only) lets
the rollout analysis embed the same texts with two versions and compare their neighbourhoods, the one
comparison that works across versions whose vectors live in different spaces.

Pure numpy; ``observe`` costs a copy of the batch, the scores a few milliseconds and run in a thread.
"""

import asyncio
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from service.models.store import ModelStore, ModelVersion
from service.periodic import Periodic

log = logging.getLogger(__name__)

# A request of up to this many inputs offers them one by one: its ~10 array operations took 44 us for one row
# (hot caches; a few times that right after a batch), once per request on the event loop; one by one, ~6 us.
_ROW_BY_ROW = 4


class Reservoir:
    """A sample of at most ``capacity`` of the vectors observed, uniform over the last ``horizon`` or so.

    Vitter's Algorithm R up to ``horizon`` vectors: after ``seen <= horizon`` of them, each is in the sample
    with probability ``capacity / seen``. Past it, each new vector still enters with probability
    ``capacity / horizon`` (instead of ever less), so older ones fade out exponentially, with a half-life of
    ``horizon * ln 2`` vectors: a gateway serving for weeks reflects this week's traffic, not its first
    day's. ``horizon=None`` keeps a uniform sample of everything. Thread-safe.
    """

    def __init__(
        self, capacity: int, dimension: int, rng: np.random.Generator | None = None, horizon: int | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if horizon is not None and horizon < capacity:
            raise ValueError(f"horizon ({horizon}) must be at least the capacity ({capacity})")
        self.capacity = capacity
        self.horizon = horizon
        self.dimension = dimension
        self._rows = np.zeros((capacity, dimension), dtype=np.float32)
        self._seen = 0
        self._rng = rng or np.random.default_rng()
        self._lock = threading.Lock()

    @property
    def seen(self) -> int:
        """Vectors observed since the start (not only those kept)."""
        return self._seen

    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    def observe(self, vectors: np.ndarray) -> None:
        """Offer each row of ``vectors`` (batch, dimension) to the sample; O(batch)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"expected vectors of shape (n, {self.dimension}), got {vectors.shape}")
        with self._lock:
            if len(vectors) <= _ROW_BY_ROW:
                for row in vectors:
                    self._offer(row)
                return
            start = self._seen
            positions = np.arange(start, start + len(vectors))
            filling = positions < self.capacity
            self._rows[positions[filling]] = vectors[filling]
            if not filling.all():
                # Vector number t (0-based) replaces a random slot with probability capacity / min(t + 1, horizon).
                later = np.flatnonzero(~filling)
                draws = positions[later] + 1
                if self.horizon is not None:
                    draws = np.minimum(draws, self.horizon)
                slots = self._rng.integers(0, draws)
                kept = slots < self.capacity
                slots, later = slots[kept], later[kept]
                # Two rows drawing one slot: the later row wins, as it would one at a time.
                unique_slots, last = np.unique(slots[::-1], return_index=True)
                self._rows[unique_slots] = vectors[later[::-1][last]]
            self._seen += len(vectors)

    def _offer(self, row: np.ndarray) -> None:
        """One vector, as ``observe`` offers each (under the lock)."""
        seen = self._seen
        if seen < self.capacity:
            self._rows[seen] = row
        else:
            draws = seen + 1 if self.horizon is None else min(seen + 1, self.horizon)
            slot = int(self._rng.integers(0, draws))
            if slot < self.capacity:
                self._rows[slot] = row
        self._seen = seen + 1

    def snapshot(self) -> np.ndarray:
        """A copy of the sampled vectors, (len(self), dimension)."""
        with self._lock:
            return self._rows[: len(self)].copy()


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", z, z)
    distances: np.ndarray = norms[:, None] + norms[None, :] - 2.0 * (z @ z.T)
    np.maximum(distances, 0.0, out=distances)  # rounding makes a few tiny distances negative
    return distances


def kernel_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Squared maximum mean discrepancy between the samples ``x`` (m, d) and ``y`` (n, d), m, n ≥ 2.

    Gaussian RBF kernel k(a, b) = exp(-|a - b|² / (2σ²)), σ by the median heuristic (σ² = the median squared
    distance between distinct points of the pooled sample), so the score does not depend on the vectors'
    scale. The unbiased estimator (MMD²_u, Gretton et al. 2012, JMLR 13, eq. 3): its expectation is 0 when
    both samples come from one distribution whatever their sizes, so one alert threshold fits a reservoir
    still filling up and a full one (the biased estimator adds about (1/m + 1/n)·(1 − E k) of pure noise).
    Its estimates scatter around 0; negative ones are clamped to 0. Between 0 and 2.
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"kernel_mmd needs at least 2 vectors on each side, got {m} and {n}")
    # float32 products (6x faster than float64 at 576 x 384; kernel values stay within 1e-6), float64 sums.
    pooled = np.concatenate([x, y]).astype(np.float32, copy=False)
    distances = _squared_distances(pooled)
    median = float(np.median(distances[np.triu_indices(m + n, k=1)]))
    if median <= 0.0:
        return 0.0  # every vector is the same point: the samples cannot differ
    kernel = np.exp(distances * np.float32(-0.5 / median))
    within_x = kernel[:m, :m].sum(dtype=np.float64) - np.trace(kernel[:m, :m], dtype=np.float64)
    within_y = kernel[m:, m:].sum(dtype=np.float64) - np.trace(kernel[m:, m:], dtype=np.float64)
    between = kernel[:m, m:].sum(dtype=np.float64)
    return max(float(within_x / (m * (m - 1)) + within_y / (n * (n - 1)) - 2.0 * between / (m * n)), 0.0)


def mean_cosine_distance(x: np.ndarray, reference_mean: np.ndarray) -> float:
    """1 − cos(mean of the rows of ``x``, ``reference_mean``); 1.0 when either mean is the zero vector."""
    mean = x.astype(np.float64, copy=False).mean(axis=0)
    reference = np.asarray(reference_mean, dtype=np.float64)
    norms = float(np.linalg.norm(mean) * np.linalg.norm(reference))
    if norms == 0.0:
        return 1.0
    return 1.0 - float(mean @ reference) / norms


def _nearest(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each row's k most cosine-similar other rows (itself excluded), in no order."""
    rows = vectors.astype(np.float64, copy=False)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms == 0.0, 1.0, norms)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


def neighbour_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each text's k nearest neighbours (cosine, itself excluded) that two versions agree on.

    ``a`` (n, d_a) and ``b`` (n, d_b) embed the same n texts, row for row, with two versions; their
    dimensions may differ. 1.0 = the same neighbourhoods (any rotation or rescaling of ``a`` scores 1.0);
    unrelated embeddings score about k / (n − 1), the chance overlap. Needs n > k + 1 texts and raises
    ValueError otherwise: with n − 1 ≤ k every text's neighbours are all the others and any two versions
    would agree perfectly, so a caller with too few texts must wait, not read a meaningless 1.0.
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must embed the same texts: {len(a)} rows vs {len(b)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    n = len(a)
    if n <= k + 1:
        raise ValueError(f"neighbour agreement at k={k} needs more than {k + 1} texts, got {n}")
    nearest_a = _nearest(a, k)
    nearest_b = _nearest(b, k)
    in_a = np.zeros((n, n), dtype=bool)
    np.put_along_axis(in_a, nearest_a, True, axis=1)
    overlap = np.take_along_axis(in_a, nearest_b, axis=1).sum(axis=1)
    return float(overlap.mean() / k)


@dataclass(frozen=True)
class DriftScores:
    mmd: float  # kernel MMD² of the served sample against the reference sample
    mean_cosine_distance: float  # 1 − cos(mean served vector, reference mean)
    samples: int  # served vectors in the sample the scores come from


@dataclass(frozen=True)
class _Reference:
    sample: np.ndarray  # (count, dimension) float32
    mean: np.ndarray  # (dimension,) float64


# A version's drift sample covers about the last capacity × 16 served vectors (8,192 with the default 512):
# a shift in traffic shows in the scores within a few thousand requests, however long the gateway has run.
HORIZON_PER_SLOT = 16


class DriftMonitor:
    """Per-version reservoirs of served embeddings, scored against each version's reference statistics.

    ``observe`` is called with every served request's vectors; ``scores`` is what the rollout analysis reads;
    ``start`` refreshes the gauges ``embedserve_drift_mmd`` and ``embedserve_drift_mean_cosine_distance``
    every ``interval_s`` (computed in a thread).
    """

    def __init__(
        self,
        store: ModelStore,
        registry: CollectorRegistry,
        capacity: int = 512,
        min_samples: int = 64,
        interval_s: float = 15.0,
        seed: int | None = None,
    ) -> None:
        if not 2 <= min_samples <= capacity:
            raise ValueError(f"min_samples must be within 2..capacity ({capacity}), not {min_samples}")
        self._store = store
        self._capacity = capacity
        self.min_samples = min_samples
        self.interval_s = interval_s
        self._seeds = np.random.SeedSequence(seed)
        # By (model, version, content id): a version exported again under its number starts a new sample.
        self._reservoirs: dict[tuple[str, int, str], Reservoir] = {}
        self._references: dict[tuple[str, int, str], _Reference | None] = {}
        self._lock = threading.Lock()
        self._loop = Periodic("drift-gauges", interval_s, self._update_gauges_in_thread)
        self.latest: dict[tuple[str, int], DriftScores] = {}
        self.rounds = 0
        versioned = ["model", "version"]
        self.mmd = Gauge(
            "embedserve_drift_mmd",
            "Kernel MMD² (unbiased, RBF, median bandwidth) of a sample of served embeddings against the "
            "version's reference sample; about 0 while inputs look like the reference texts.",
            versioned,
            registry=registry,
        )
        self.mean_cosine = Gauge(
            "embedserve_drift_mean_cosine_distance",
            "1 - cosine of the mean served embedding and the version's reference mean.",
            versioned,
            registry=registry,
        )
        for version in store.all():
            self._reservoir(version)

    def _reservoir(self, version: ModelVersion) -> Reservoir:
        key = (version.model, version.version, version.content_id)
        reservoir = self._reservoirs.get(key)
        if reservoir is None:
            with self._lock:
                reservoir = self._reservoirs.get(key)
                if reservoir is None:
                    rng = np.random.default_rng(self._seeds.spawn(1)[0])
                    horizon = self._capacity * HORIZON_PER_SLOT
                    reservoir = Reservoir(self._capacity, version.dimension, rng, horizon)
                    self._reservoirs[key] = reservoir
        return reservoir

    def observe(self, version: ModelVersion, vectors: np.ndarray) -> None:
        """Offer the vectors ``version`` served for one request to its sample (a copy; no scoring)."""
        self._reservoir(version).observe(vectors)

    def _served_key(self, model: str, version: int) -> tuple[str, int, str] | None:
        """The reservoir key of what ``model@version`` is now (None when it is not served)."""
        served = self._store.get(model, version)
        return None if served is None else (model, version, served.content_id)

    def samples(self, model: str, version: int) -> int:
        key = self._served_key(model, version)
        reservoir = self._reservoirs.get(key) if key is not None else None
        return 0 if reservoir is None else len(reservoir)

    def scores(self, model: str, version: int) -> DriftScores | None:
        """Drift of what ``model@version`` served against its reference; None with fewer than ``min_samples``
        served vectors or without reference statistics. A few milliseconds of CPU: call it from a thread
        when latency matters."""
        key = self._served_key(model, version)
        reservoir = self._reservoirs.get(key) if key is not None else None
        if key is None or reservoir is None or len(reservoir) < self.min_samples:
            return None
        reference = self._reference(key)
        if reference is None:
            return None
        served = reservoir.snapshot()
        return DriftScores(
            mmd=kernel_mmd(served, reference.sample),
            mean_cosine_distance=mean_cosine_distance(served, reference.mean),
            samples=len(served),
        )

    def _reference(self, key: tuple[str, int, str]) -> _Reference | None:
        with self._lock:  # the gauges' thread and the analysis loop: one load, one warning
            if key not in self._references:
                self._references[key] = self._load_reference(key[0], key[1])
            return self._references[key]

    def _load_reference(self, model: str, version: int) -> _Reference | None:
        served = self._store.get(model, version)
        stats = served.manifest.reference_stats if served is not None else None
        problem = "its manifest has no reference_stats"
        if served is not None and stats is not None:
            sample = np.asarray(stats.sample, dtype=np.float32)
            if sample.ndim == 2 and sample.shape[1] == served.dimension == len(stats.mean) and len(sample) >= 2:
                return _Reference(sample=sample, mean=np.asarray(stats.mean, dtype=np.float64))
            problem = "its reference_stats hold fewer than 2 sample vectors, or vectors of another dimension"
        log.warning("no drift scores for this version", extra={"model": model, "version": version, "reason": problem})
        return None

    def update_gauges(self) -> None:
        """Recompute every version's scores and set its gauges (versions without scores keep no series);
        ``latest`` keeps each version's last scores and ``rounds`` counts the recomputations."""
        for model, version in sorted({(model, version) for model, version, _ in list(self._reservoirs)}):
            scores = self.scores(model, version)
            if scores is not None:
                self.latest[(model, version)] = scores
                self.mmd.labels(model, str(version)).set(scores.mmd)
                self.mean_cosine.labels(model, str(version)).set(scores.mean_cosine_distance)
        self.rounds += 1

    def start(self) -> None:
        self._loop.start()

    async def _update_gauges_in_thread(self) -> None:
        await asyncio.to_thread(self.update_gauges)

    async def close(self) -> None:
        await self._loop.close()


class TextSample:
    """Per model, up to ``capacity`` distinct texts of recent requests, most recent last.

    In memory only — never logged, never persisted: the rollout analysis embeds them with two versions
    to compare their neighbourhoods, then drops them.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._texts: dict[str, OrderedDict[str, None]] = {}

    def observe(self, model: str, texts: list[str]) -> None:
        if self.capacity == 0:
            return
        recent = self._texts.get(model)
        if recent is None:
            recent = self._texts[model] = OrderedDict()
        for text in texts[-self.capacity :]:
            recent[text] = None
            recent.move_to_end(text)
        while len(recent) > self.capacity:
            recent.popitem(last=False)

    def sample(self, model: str) -> list[str]:
        """The model's sampled texts, oldest first (a copy)."""
        return list(self._texts.get(model, ()))
