"""The in-process cache's bytes, counted per model version and exported as a labelled gauge."""

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


def test_the_lru_counts_each_owners_bytes_through_replacement_and_eviction() -> None:
    lru = ByteBoundedLru(max_bytes=10)
    one, two = ("m", "1"), ("m", "2")
    lru.put("a", b"xxxx", one)
    lru.put("b", b"xxxx", one)
    lru.put("a", b"xxx", one)  # replaced: its old size no longer counts
    assert lru.bytes_by_owner == {one: 7} and lru.bytes_used == 7
    lru.put("c", b"xxxxxx", two)  # evicts "b", the least recently used
    assert lru.bytes_by_owner == {one: 3, two: 6} and lru.bytes_used == 9
    assert lru.get("b") is None and lru.get("a") == b"xxx"
    lru.put("d", b"xxxxx", two)  # evicts "c": "a" was read since
    assert lru.bytes_by_owner == {one: 3, two: 5} and lru.bytes_used == 8
    lru.put("e", b"xxxxx", two)  # evicts "a"
    assert lru.bytes_by_owner == {one: 0, two: 10} and lru.bytes_used == 10
    assert lru.get("a") is None and lru.get("c") is None


def test_an_entry_of_one_version_evicting_anothers_updates_both_gauges(model_repository: Path) -> None:
    store = ModelStore.scan(model_repository)
    tiny1, tiny2 = store.get("tiny", 1), store.get("tiny", 2)
    assert tiny1 is not None and tiny2 is not None
    metrics = Metrics()
    cache = EmbeddingCache(metrics, l1_max_bytes=3 * ENTRY_BYTES)

    def entries(count: int) -> dict[str, CachedEmbedding]:
        return {uuid.uuid4().hex: CachedEmbedding(np.ones(TINY_DIMENSION, np.float32), 3) for _ in range(count)}

    assert len(encode_entry(np.ones(TINY_DIMENSION, np.float32), 3)) == ENTRY_BYTES
    cache.put_many(tiny1, entries(3))
    cache.put_many(tiny2, entries(2))
    found = parse_metrics(metrics.render().decode())
    assert metric(found, "embedserve_cache_memory_bytes", model="tiny", version="1") == ENTRY_BYTES
    assert metric(found, "embedserve_cache_memory_bytes", model="tiny", version="2") == 2 * ENTRY_BYTES


def test_the_cache_memory_series_carry_model_and_version(client: TestClient) -> None:
    def read() -> dict[str, list]:
        return parse_metrics(client.get("/metrics").text)

    before = read()
    texts = [f"cache memory {uuid.uuid4().hex}" for _ in range(3)]
    assert client.post("/v1/embeddings", json={"input": texts, "model": "tiny@2"}).status_code == 200
    after = read()
    name, tiny2 = "embedserve_cache_memory_bytes", {"model": "tiny", "version": "2"}
    assert metric(after, name, **tiny2) - metric(before, name, **tiny2) == 3 * ENTRY_BYTES
    series = after["embedserve_cache_memory_bytes"]
    assert series and all(set(sample.labels) == {"model", "version"} for sample in series)
    assert all(sample.labels["model"] and sample.labels["version"] for sample in series)
