"""The embedding cache: an in-process LRU bounded in bytes, in front of Redis.

Key: model, version, the version's content id and sha256 of the exact input text, so two versions (or two
builds of one version number) never share an entry.
Value: the vector as little-endian float32 bytes followed by the input's token count as a
little-endian uint32 (4 bytes), so a hit also answers ``usage.prompt_tokens`` without tokenising.
Redis is optional; when it errors or is slow a circuit breaker skips it and requests still succeed.
"""

import asyncio
import hashlib
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import Span, Tracer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.models.store import ModelVersion
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import NO_TRACING, version_attributes

log = logging.getLogger(__name__)

_TOKENS_TRAILER = np.dtype("<u4")


@dataclass(frozen=True)
class CachedEmbedding:
    vector: np.ndarray  # float32 (dimension,)
    tokens: int


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_entry(vector: np.ndarray, tokens: int) -> bytes:
    return vector.astype("<f4", copy=False).tobytes() + np.array([tokens], dtype=_TOKENS_TRAILER).tobytes()


def decode_entry(value: bytes, dimension: int) -> CachedEmbedding | None:
    """None when the stored bytes don't have this version's shape (never trust a cache blindly)."""
    if len(value) != dimension * 4 + _TOKENS_TRAILER.itemsize:
        return None
    vector = np.frombuffer(value, dtype="<f4", count=dimension)
    tokens = int(np.frombuffer(value, dtype=_TOKENS_TRAILER, offset=dimension * 4)[0])
    return CachedEmbedding(vector=vector, tokens=tokens)


# What an entry costs besides its key and value objects: its OrderedDict node and (value, owner) tuple
# (measured with tracemalloc on CPython 3.11: 121 bytes).
_ENTRY_OVERHEAD = 128


class ByteBoundedLru:
    """An LRU map of bytes values whose memory stays under ``max_bytes``: each entry costs its key and value
    objects and its share of the map (``entry_bytes``). Each entry belongs to an owner (the model version's
    metric labels) whose bytes are counted apart."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.bytes_by_owner: dict[tuple[str, str], int] = {}
        self._entries: OrderedDict[str, tuple[bytes, tuple[str, str]]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    @staticmethod
    def entry_bytes(key: str, value: bytes) -> int:
        return sys.getsizeof(key) + sys.getsizeof(value) + _ENTRY_OVERHEAD

    def put(self, key: str, value: bytes, owner: tuple[str, str]) -> None:
        cost = self.entry_bytes(key, value)
        if cost > self.max_bytes:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._forget(key, *previous)
        self._entries[key] = (value, owner)
        self.bytes_used += cost
        self.bytes_by_owner[owner] = self.bytes_by_owner.get(owner, 0) + cost
        while self.bytes_used > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self._forget(evicted_key, *evicted)

    def _forget(self, key: str, value: bytes, owner: tuple[str, str]) -> None:
        cost = self.entry_bytes(key, value)
        self.bytes_used -= cost
        self.bytes_by_owner[owner] -= cost

    def __len__(self) -> int:
        return len(self._entries)


class CircuitBreaker:
    """Closed: use Redis. Open after ``failure_threshold`` failures in a row: skip it for ``retry_after_s``.
    Then one probe request is let through (half-open); its success closes the circuit again. A probe whose
    outcome never comes (its request cancelled mid-call) is given up, so the next request probes."""

    def __init__(self, failure_threshold: int, retry_after_s: float, metrics: Metrics) -> None:
        self.failure_threshold = failure_threshold
        self.retry_after_s = retry_after_s
        self._metrics = metrics
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._probing or time.monotonic() - self._opened_at < self.retry_after_s:
            return False
        self._probing = True
        return True

    def abandon_probe(self) -> None:
        """The call let through ended without an answer either way (cancelled): let another one probe."""
        self._probing = False

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._opened_at is not None:
            self._opened_at = None
            self._metrics.redis_circuit_open.set(0)
            log.warning("redis circuit closed: redis answers again")

    def record_failure(self, error: Exception) -> None:
        self._failures += 1
        self._probing = False
        if self._opened_at is not None:
            self._opened_at = time.monotonic()  # the probe failed: stay open for another period
        elif self._failures >= self.failure_threshold:
            self._opened_at = time.monotonic()
            self._metrics.redis_circuit_open.set(1)
            log.warning(
                "redis circuit open: skipping redis",
                extra={"error_type": type(error).__name__, "retry_after_s": self.retry_after_s},
            )


class EmbeddingCache:
    def __init__(
        self,
        metrics: Metrics,
        l1_max_bytes: int,
        redis: Redis | None = None,
        redis_prefix: str = "embedserve:",
        ttl_s: int = 86_400,
        breaker: CircuitBreaker | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._metrics = metrics
        self._tracer = tracer
        self._l1 = ByteBoundedLru(l1_max_bytes)
        self._redis = redis
        self._prefix = redis_prefix
        self._ttl_s = ttl_s
        self.breaker = breaker or CircuitBreaker(3, 5.0, metrics)
        self._writes: set[asyncio.Task[None]] = set()

    def _key(self, version: ModelVersion, digest: str) -> str:
        # The content id: a re-exported version (same number, other weights) never reads the old one's vectors.
        return f"{self._prefix}emb:{version.model}:{version.version}:{version.content_id}:{digest}"

    async def get_many(self, version: ModelVersion, digests: list[str]) -> dict[str, CachedEmbedding]:
        """Entries found for ``digests`` (distinct): L1 first, then one MGET to Redis for the rest."""
        # Never made current (it has no child spans): with tracing off, a span then costs next to nothing.
        attributes = {**version_attributes(version), "inputs": len(digests)}
        span = self._tracer.start_span("cache.lookup", attributes=attributes)
        try:
            found = await self._lookup(version, digests, span)
            span.set_attribute("hits", len(found))
            return found
        finally:
            span.end()

    async def _lookup(self, version: ModelVersion, digests: list[str], span: Span) -> dict[str, CachedEmbedding]:
        found: dict[str, CachedEmbedding] = {}
        missing: list[str] = []
        for digest in digests:
            value = self._l1.get(self._key(version, digest))
            entry = decode_entry(value, version.dimension) if value is not None else None
            if entry is None:
                missing.append(digest)
            else:
                found[digest] = entry
        labels = (version.model, str(version.version))
        self._metrics.cache_lookups.labels(*labels, "memory", "hit").inc(len(found))
        self._metrics.cache_lookups.labels(*labels, "memory", "miss").inc(len(missing))
        span.set_attribute("memory_hits", len(found))
        if not missing or self._redis is None or not self.breaker.allow():
            return found
        keys = [self._key(version, digest) for digest in missing]
        try:
            values = await self._redis.mget(keys)
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(version, "mget", error)
            span.set_attribute("redis_error", type(error).__name__)
            return found
        except BaseException:
            self.breaker.abandon_probe()  # cancelled with its request: no verdict on Redis
            raise
        self.breaker.record_success()
        hits = 0
        for key, digest, stored in zip(keys, missing, values, strict=True):
            entry = decode_entry(stored, version.dimension) if isinstance(stored, bytes) else None
            if entry is not None and isinstance(stored, bytes):
                found[digest] = entry
                self._l1.put(key, stored, labels)
                hits += 1
        if hits:
            self._report_memory()
        self._metrics.cache_lookups.labels(*labels, "redis", "hit").inc(hits)
        self._metrics.cache_lookups.labels(*labels, "redis", "miss").inc(len(missing) - hits)
        span.set_attribute("redis_hits", hits)
        return found

    def put_many(self, version: ModelVersion, entries: dict[str, CachedEmbedding]) -> None:
        """Store computed entries: L1 now, Redis in one pipelined write in the background."""
        values = {self._key(version, d): encode_entry(e.vector, e.tokens) for d, e in entries.items()}
        labels = (version.model, str(version.version))
        for key, value in values.items():
            self._l1.put(key, value, labels)
        self._report_memory()
        if self._redis is not None and values and self.breaker.allow():
            task = asyncio.create_task(self._write_redis(version, values))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _report_memory(self) -> None:
        # Every owner: an entry of one version can evict another version's entries.
        for labels, used in self._l1.bytes_by_owner.items():
            self._metrics.cache_memory_bytes.labels(*labels).set(used)

    async def _write_redis(self, version: ModelVersion, values: dict[str, bytes]) -> None:
        assert self._redis is not None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in values.items():
                    pipe.set(key, value, ex=self._ttl_s)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(version, "set", error)
        except BaseException:
            self.breaker.abandon_probe()  # cancelled (the gateway stopping): no verdict on Redis
            raise
        else:
            self.breaker.record_success()

    def _redis_failed(self, version: ModelVersion, operation: str, error: Exception) -> None:
        self._metrics.redis_errors.labels(version.model, str(version.version), operation).inc()
        self.breaker.record_failure(error)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=2)
        if self._redis is not None:
            await self._redis.aclose()
