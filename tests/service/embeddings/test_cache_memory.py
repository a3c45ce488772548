"""The in-process cache's bytes, counted per model version and exported as a labelled gauge."""

import tracemalloc
import uuid
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.embeddings.cache import ByteBoundedLru, CachedEmbedding, EmbeddingCache, encode_entry
from service.models.store import ModelStore
from service.telemetry.metrics import Metrics
from tests.conftest import TINY_DIMENSION
from tests.helpers import metric, parse_metrics

ENTRY_BYTES = TINY_DIMENSION * 4 + 4  # float32 vector + uint32 token count


def entry_cost(digest_chars: int) -> int:
    """What a tiny entry costs the LRU: its key (default prefix, sha256-long digest) and value objects."""
    key = "embedserve:emb:tiny:1:" + "0" * 16 + ":" + "0" * digest_chars
    return ByteBoundedLru.entry_bytes(key, bytes(ENTRY_BYTES))


def test_the_lru_counts_each_owners_bytes_through_replacement_and_eviction() -> None:
    entry = ByteBoundedLru.entry_bytes("a", b"")  # what an entry costs beyond its value's bytes
    lru = ByteBoundedLru(max_bytes=2 * entry + 10)  # two entries, 10 bytes of values between them
    one, two = ("m", "1"), ("m", "2")
    lru.put("a", b"xxxx", one)
    lru.put("b", b"xxxx", one)
    lru.put("a", b"xxx", one)  # replaced: its old size no longer counts
    assert lru.bytes_by_owner == {one: 2 * entry + 7} and lru.bytes_used == 2 * entry + 7
    lru.put("c", b"xxxxxx", two)  # evicts "b", the least recently used
    assert lru.bytes_by_owner == {one: entry + 3, two: entry + 6} and lru.bytes_used == 2 * entry + 9
    assert lru.get("b") is None and lru.get("a") == b"xxx"
    lru.put("d", b"xxxxx", two)  # evicts "c": "a" was read since
    assert lru.bytes_by_owner == {one: entry + 3, two: entry + 5} and lru.bytes_used == 2 * entry + 8
    lru.put("e", b"xxxxx", two)  # evicts "a"
    assert lru.bytes_by_owner == {one: 0, two: 2 * entry + 10} and lru.bytes_used == 2 * entry + 10
    assert lru.get("a") is None and lru.get("c") is None


def test_the_budget_bounds_the_memory_the_entries_really_take() -> None:
    """Keys, value objects and the map's own nodes count, not only the vector bytes: with small vectors
    those are most of the memory."""
    budget = 2_000_000
    value = encode_entry(np.ones(TINY_DIMENSION, np.float32), 3)
    tracemalloc.start()
    try:
        lru = ByteBoundedLru(max_bytes=budget)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            lru.put(f"embedserve:emb:tiny:1:0123456789abcdef:{i:064x}", bytes(bytearray(value)), ("tiny", "1"))
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(lru) < 50_000  # the budget was reached: entries were evicted
    assert 0.8 * budget <= taken <= 1.1 * budget, taken


def test_an_entry_of_one_version_evicting_anothers_updates_both_gauges(model_repository: Path) -> None:
    store = ModelStore.scan(model_repository)
    tiny1, tiny2 = store.get("tiny", 1), store.get("tiny", 2)
    assert tiny1 is not None and tiny2 is not None
    metrics = Metrics()
    cache = EmbeddingCache(metrics, l1_max_bytes=3 * entry_cost(32))

    def entries(count: int) -> dict[str, CachedEmbedding]:
        return {uuid.uuid4().hex: CachedEmbedding(np.ones(TINY_DIMENSION, np.float32), 3) for _ in range(count)}

    assert len(encode_entry(np.ones(TINY_DIMENSION, np.float32), 3)) == ENTRY_BYTES
    cache.put_many(tiny1, entries(3))
    cache.put_many(tiny2, entries(2))
    found = parse_metrics(metrics.render().decode())
    assert metric(found, "embedserve_cache_memory_bytes", model="tiny", version="1") == entry_cost(32)
    assert metric(found, "embedserve_cache_memory_bytes", model="tiny", version="2") == 2 * entry_cost(32)


def test_the_cache_memory_series_carry_model_and_version(client: TestClient) -> None:
    def read() -> dict[str, list]:
        return parse_metrics(client.get("/metrics").text)

    before = read()
    texts = [f"cache memory {uuid.uuid4().hex}" for _ in range(3)]
    assert client.post("/v1/embeddings", json={"input": texts, "model": "tiny@2"}).status_code == 200
    after = read()
    name, tiny2 = "embedserve_cache_memory_bytes", {"model": "tiny", "version": "2"}
    assert metric(after, name, **tiny2) - metric(before, name, **tiny2) == 3 * entry_cost(64)
    series = after["embedserve_cache_memory_bytes"]
    assert series and all(set(sample.labels) == {"model", "version"} for sample in series)
    assert all(sample.labels["model"] and sample.labels["version"] for sample in series)
