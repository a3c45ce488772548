"""service/vectors/store.py on a real Milvus Lite: recall, filters against their Python reading, injection attempts,
re-index under concurrent writes, re-index resumed after a restart.

The store gets the embedder's contract (``resolve`` + ``embed``) from ``TableEncoder``: real model versions,
vectors the test chooses, so recall and "embedded by the new version" can be checked exactly.
"""

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.errors import InvalidRequest
from service.models.store import ModelStore, ModelVersion
from service.settings import Settings
from service.vectors.catalog import Reindex
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import CATALOG
from service.vectors.protocol import ItemIn, SearchRequest
from service.vectors.store import VectorStore
from tests.conftest import TINY_DIMENSION
from tests.service.vectors.test_filters import FIELDS, matches


class TableEncoder:
    """Real versions of ``tiny``; the vector of a text is ``table[text]`` when set, else a unit vector seeded by
    (version, text), so each version embeds differently and the test can recompute any stored vector."""

    def __init__(self, models: ModelStore, table: dict[str, np.ndarray] | None = None) -> None:
        self.models = models
        self.table = table or {}
        self.embedded: list[tuple[int, str]] = []

    def resolve(self, requested: str | None, header_version: str | None = None) -> ModelVersion:
        name, _, pinned = (requested or "tiny").partition("@")
        version = self.models.get(name, int(pinned)) if pinned else self.models.versions_of(name)[-1]
        assert version is not None
        return version

    async def embed(self, texts: list[str], version: ModelVersion, purpose: str = "client") -> SimpleNamespace:
        self.embedded += [(version.version, text) for text in texts]
        return SimpleNamespace(vectors=np.stack([self.vector(text, version.version) for text in texts]))

    def vector(self, text: str, version: int) -> np.ndarray:
        if text in self.table:
            return self.table[text]
        seed = int.from_bytes(hashlib.sha256(f"{version}\x00{text}".encode()).digest()[:8], "little")
        return unit(np.random.default_rng(seed).standard_normal(TINY_DIMENSION))


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def models(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)


@asynccontextmanager
async def open_store(path: Path, encoder: TableEncoder, **settings: Any) -> AsyncIterator[VectorStore]:
    store = VectorStore(Settings(milvus_uri=str(path), **settings), encoder, VectorMetrics(CollectorRegistry()))
    store.start()
    try:
        yield store
    finally:
        await store.close()


async def stored_rows(store: VectorStore, physical: str) -> list[dict[str, Any]]:
    """Every row of a physical collection, vectors included (straight from Milvus)."""
    fields = ["id", "text", "metadata", "vector"]
    rows = await store._milvus.call("query", physical, filter='id != ""', output_fields=fields, limit=16_384)
    return [dict(row) for row in rows]


async def search_ids(store: VectorStore, name: str, **request: Any) -> list[str]:
    hits, _ = await store.search(name, SearchRequest(**request))
    return [hit.id for hit in hits]


async def wait_for(condition: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_dense_recall_at_10_is_at_least_095_against_brute_force_on_10k_vectors(
    models: ModelStore, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    count = 10_000
    data = unit(rng.standard_normal((count, TINY_DIMENSION)))
    encoder = TableEncoder(models, {f"doc {i}": data[i] for i in range(count)})
    async with open_store(tmp_path / "milvus.db", encoder) as store:
        await store.create("vectors", "tiny@1", {})
        for start in range(0, count, 1000):
            items = [ItemIn(id=f"{i:05d}", text=f"doc {i}") for i in range(start, start + 1000)]
            await store.upsert("vectors", items)
        queries = unit(rng.standard_normal((100, TINY_DIMENSION)))
        # How fast the first search after a bulk load is (the index is built eagerly) is measured by
        # make bench-search, not asserted here.
        found = [await search_ids(store, "vectors", vector=q.tolist(), top_k=10, output_fields=[]) for q in queries]
        assert (await store.describe("vectors")).items == count
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    recall = np.mean(
        [len({f"{i:05d}" for i in truth} & set(hits)) / 10 for truth, hits in zip(exact, found, strict=True)]
    )
    print(f"recall@10 = {recall:.3f}")
    assert recall >= 0.95


CATEGORIES = [
    "shoes",
    "hats",
    'we"ird',
    "back\\slash",
    'shoes" or 1 == 1 or "',
    "shoes' or '1'=='1",
    '\\" or id != "',
    "multi\nline",
    "ünïcödé 😀",
    "] or exists metadata[",
    "",
]


def catalogue() -> list[dict[str, Any]]:
    """Items with every field type present, absent and at edge values (missing fields are common)."""
    rng = random.Random(11)
    items = []
    for i in range(90):
        metadata: dict[str, Any] = {}
        if i % 7:
            metadata["category"] = CATEGORIES[i % len(CATEGORIES)]
        if i % 5:
            metadata["price"] = rng.choice([0, 9.99, 10, 10.5, 99, 100, 250.25, -3])
        if i % 3:
            metadata["stock"] = rng.choice([0, 1, 5, 2**40, -7])
        if i % 4:
            metadata["on_sale"] = bool(i % 2)
        if i % 6:
            metadata["tags"] = rng.sample(["red", "blue", "sale", 'q"uote', "new"], k=rng.randint(0, 3))
        items.append({"id": f"item-{i:02d}", "text": f"item {i}", "metadata": metadata})
    return items


FILTERS: list[dict[str, Any]] = [
    {"field": "category", "eq": "shoes"},
    {"field": "category", "ne": "shoes"},
    {"field": "category", "lt": "m"},
    {"field": "category", "gte": "shoes"},
    {"field": "category", "in": ["hats", 'we"ird', ""]},
    {"field": "category", "not_in": ["hats", "shoes"]},
    {"field": "category", "exists": True},
    {"field": "category", "exists": False},
    {"field": "price", "eq": 10},
    {"field": "price", "eq": 10.0},
    {"field": "price", "ne": 99},
    {"field": "price", "lt": 10},
    {"field": "price", "lte": 10},
    {"field": "price", "gt": 99},
    {"field": "price", "gte": 99},
    {"field": "price", "in": [0, 10.5, -3]},
    {"field": "price", "not_in": [0, 10.5]},
    {"field": "stock", "eq": 2**40},
    {"field": "stock", "lt": 1},
    {"field": "stock", "gte": 5},
    {"field": "stock", "not_in": [0, -7]},
    {"field": "on_sale", "eq": True},
    {"field": "on_sale", "ne": True},
    {"field": "on_sale", "in": [False]},
    {"field": "on_sale", "exists": False},
    {"field": "tags", "contains": "sale"},
    {"field": "tags", "contains": 'q"uote'},
    {"field": "tags", "contains_any": ["red", "blue"]},
    {"field": "tags", "contains_all": ["red", "new"]},
    {"field": "tags", "exists": True},
    {"field": "id", "eq": "item-03"},
    {"field": "id", "ne": "item-03"},
    {"field": "id", "in": ["item-01", "item-02", "nope"]},
    {"field": "id", "not_in": ["item-01", "item-02"]},
    {"field": "id", "lt": "item-10"},
    {"not": {"field": "price", "eq": 10}},
    {"not": {"field": "price", "exists": True}},
    {"and": [{"field": "category", "eq": "shoes"}, {"field": "price", "lt": 100}]},
    {"or": [{"field": "on_sale", "eq": True}, {"field": "stock", "gt": 1}]},
    {
        "and": [
            {"not": {"field": "tags", "contains": "red"}},
            {"or": [{"field": "price", "gte": 100}, {"field": "id", "eq": "item-00"}]},
        ]
    },
    {"not": {"or": [{"field": "category", "eq": "hats"}, {"not": {"field": "stock", "exists": True}}]}},
]

# Crafted values: each is looked up literally; none may widen (or break) the result set.
INJECTIONS = [
    'shoes" or 1 == 1 or "',
    "shoes' or '1'=='1",
    '\\" or id != "',
    "] or exists metadata[",
    'shoes") or (1 == 1',
    'x" || true || "',
    '" or metadata["price"] > 0 or "',
    "\\",
    '"',
    "'",
    '\\\\" or "" == "',
    "shoes\n or 1 == 1",
    'shoes"; drop collection; "',
    "%s%s%s",
    "{0}",
    'json_contains(metadata["tags"], "red")',
    "not shoes",
    '😀" or true or "',
]
FIELD_INJECTIONS = [
    'category"] == "x" or metadata["price',
    "id or 1==1",
    "category == 'shoes' or true",
    "metadata",
    "$meta",
    'metadata["category"]',
]


@pytest.fixture(scope="module")
async def filtered(models: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VectorStore]:
    """A collection holding ``catalogue()``."""
    async with open_store(tmp_path_factory.mktemp("filters") / "milvus.db", TableEncoder(models)) as store:
        await store.create("catalogue", "tiny@1", FIELDS)
        await store.upsert("catalogue", [ItemIn(**item) for item in catalogue()])
        yield store


async def filtered_ids(store: VectorStore, spec: dict[str, Any]) -> set[str]:
    ids = await search_ids(store, "catalogue", vector=[1.0] * TINY_DIMENSION, top_k=1000, filter=spec, output_fields=[])
    assert len(ids) == len(set(ids))
    return set(ids)


def expected_ids(spec: dict[str, Any]) -> set[str]:
    return {item["id"] for item in catalogue() if matches(spec, item["id"], item["metadata"])}


@pytest.mark.parametrize("spec", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
async def test_each_filter_returns_exactly_the_items_its_python_reading_accepts(
    filtered: VectorStore, spec: dict[str, Any]
) -> None:
    assert await filtered_ids(filtered, spec) == expected_ids(spec)


async def test_crafted_values_are_escaped_and_never_change_the_result_set(filtered: VectorStore) -> None:
    for value in INJECTIONS:
        for spec in (
            {"field": "category", "eq": value},
            {"field": "category", "ne": value},
            {"field": "category", "in": [value, "hats"]},
            {"field": "tags", "contains": value},
            {"field": "id", "eq": value},
        ):
            assert await filtered_ids(filtered, spec) == expected_ids(spec), spec
    # Values stored verbatim are found verbatim: escaping is exact, not just harmless.
    for value in CATEGORIES:
        assert len(expected_ids({"field": "category", "eq": value})) > 0
        assert await filtered_ids(filtered, {"field": "category", "eq": value}) == expected_ids(
            {"field": "category", "eq": value}
        )
    for field in FIELD_INJECTIONS:
        with pytest.raises(InvalidRequest, match="not a declared field"):
            await filtered_ids(filtered, {"field": field, "eq": "x"})


async def test_an_id_upserted_twice_is_stored_once_and_delete_removes(filtered: VectorStore) -> None:
    await filtered.create("twice", "tiny@1", {})
    for text in ("first text", "second text"):
        await filtered.upsert("twice", [ItemIn(id="same", text=text)])
    assert (await filtered.describe("twice")).items == 1
    assert (await filtered.get("twice", "same")).text == "second text"
    assert [record.name for record in await filtered.collections_on("tiny")] == ["catalogue", "twice"]
    await filtered.delete("twice", "same")
    assert (await filtered.describe("twice")).items == 0
    assert await search_ids(filtered, "twice", query="second text") == []


class PacedEncoder(TableEncoder):
    """Each re-index batch (the store's own embedding, purpose "reindex") waits for a permit, so the test decides
    how writes and re-index batches interleave, however fast either runs."""

    def __init__(self, models: ModelStore) -> None:
        super().__init__(models)
        self.permits = asyncio.Semaphore(0)

    async def embed(self, texts: list[str], version: ModelVersion, purpose: str = "client") -> SimpleNamespace:
        if purpose == "reindex":
            await self.permits.acquire()
        return await super().embed(texts, version, purpose)


async def test_reindex_while_writes_continue_loses_nothing(models: ModelStore, tmp_path: Path) -> None:
    encoder = PacedEncoder(models)
    async with open_store(tmp_path / "milvus.db", encoder, reindex_batch_size=16, reindex_grace_s=0) as store:
        await store.create("docs", "tiny@1", {"n": "int"})
        live = {f"d{i:04d}": f"text {i}" for i in range(600)}
        await store.upsert("docs", [ItemIn(id=k, text=v, metadata={"n": 1}) for k, v in live.items()])
        old = (await store.describe("docs")).model_copy()
        await store.reindex("docs", 2)
        rng = random.Random(5)
        writes_during_reindex = 0
        next_id = 600
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, f"the re-index is still running after {writes_during_reindex} writes"
            reindexing = (await store.describe("docs")).state == "reindexing"
            if not reindexing:
                break
            if rng.random() < 0.6:
                batch = {}
                for _ in range(rng.randint(1, 4)):
                    if rng.random() < 0.5 and live:
                        item_id = rng.choice(sorted(live))  # overwrite an existing item with new text
                    else:
                        item_id, next_id = f"d{next_id:04d}", next_id + 1
                    batch[item_id] = f"text {item_id} rewritten {rng.random()}"
                await store.upsert("docs", [ItemIn(id=k, text=v) for k, v in batch.items()])
                live.update(batch)
            elif live:
                victim = rng.choice(sorted(live))
                await store.delete("docs", victim)
                del live[victim]
            writes_during_reindex += 1
            encoder.permits.release()  # one re-index batch per write: writes land before and after its cursor
        # Every batch of the 600 items waited for a write made while the re-index was running.
        assert writes_during_reindex >= 600 / 16
        info = await store.describe("docs")
        assert (info.version, info.state, info.items) == (2, "ready", len(live))
        active = f"docs__tiny__v{info.version}"
        assert await store._milvus.alias_target("docs") == active
        rows = await stored_rows(store, active)
        assert sorted(row["id"] for row in rows) == sorted(live)  # every live item exactly once, no deleted one
        assert {row["id"]: row["text"] for row in rows} == live
        for row in rows:  # embedded by the new version
            np.testing.assert_allclose(row["vector"], encoder.vector(row["text"], 2), atol=1e-5)
        # The previous version's collection is dropped once the grace period (0 s here) is over.
        previous = f"docs__tiny__v{old.version}"
        await wait_for(lambda: _gone(store, previous), timeout_s=10)


async def _gone(store: VectorStore, physical: str) -> bool:
    return not await store._milvus.call("has_collection", physical)


async def test_a_reindex_interrupted_by_a_restart_resumes_from_its_cursor(models: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "milvus.db"
    items = [ItemIn(id=f"r{i:03d}", text=f"resumable {i}") for i in range(300)]
    async with open_store(path, TableEncoder(models), reindex_batch_size=8) as store:
        await store.create("docs", "tiny@1", {})
        await store.upsert("docs", items)
        await store.reindex("docs", 2)

        async def some_copied() -> bool:
            reindex = (await store.describe("docs")).reindex
            return reindex is not None and reindex.copied >= 40

        await wait_for(some_copied)
    # The gateway stopped mid-way; a new one finds the re-index in the catalog and goes on.
    encoder = TableEncoder(models)
    async with open_store(path, encoder, reindex_batch_size=8) as store:

        async def done() -> bool:
            return (await store.describe("docs")).state == "ready"

        # Milvus Lite 3.2 sometimes reports a collection reopened after an interrupted write as never loaded
        # (load_collection times out after 30 s on a busy machine); the store retries the load, so allow for one.
        await wait_for(done, timeout_s=150)
        info = await store.describe("docs")
        assert (info.version, info.items) == (2, 300)
        rows = await stored_rows(store, "docs__tiny__v2")
        assert sorted(row["id"] for row in rows) == [item.id for item in items]
        for row in rows:
            np.testing.assert_allclose(row["vector"], encoder.vector(row["text"], 2), atol=1e-5)
        re_embedded = [text for version, text in encoder.embedded if version == 2]
        assert len(re_embedded) <= 300 - 40  # from the saved cursor, not from the start
        assert await search_ids(store, "docs", vector=encoder.vector("resumable 7", 2).tolist(), top_k=1) == ["r007"]


async def test_reconcile_repairs_a_target_left_inconsistent_by_a_crash(models: ModelStore, tmp_path: Path) -> None:
    """A process that stopped between the two writes of a dual write leaves the target with an extra or a
    missing item: the switch finds the counts differ and makes the target hold exactly the source's ids."""
    encoder = TableEncoder(models)
    async with open_store(tmp_path / "milvus.db", encoder, reindex_batch_size=1000) as store:
        await store.create("docs", "tiny@1", {})
        await store.upsert("docs", [ItemIn(id=f"c{i}", text=f"crash {i}") for i in range(50)])
        record = await store._catalog.get("docs")
        target = await store._create_physical("docs", encoder.resolve("tiny@2"))
        record = record.model_copy(update={"reindex": Reindex(target=target, total=50, started_at=time.time())})
        half = [
            {"id": f"c{i}", "text": f"crash {i}", "metadata": {}, "vector": encoder.vector(f"crash {i}", 2).tolist()}
            for i in range(25)
        ]
        ghost = {
            "id": "ghost",
            "text": "deleted from the source only",
            "metadata": {},
            "vector": [1.0] * TINY_DIMENSION,
        }
        async with store._coordination.holding("docs", exclusive=True):
            await store._milvus.upsert(target.name, [*half, ghost])
            await store._reindexer._reconcile(record)
        rows = await stored_rows(store, target.name)
        assert sorted(row["id"] for row in rows) == sorted(f"c{i}" for i in range(50))
        for row in rows:
            np.testing.assert_allclose(row["vector"], encoder.vector(row["text"], 2), atol=1e-5)


async def test_dropping_a_collection_mid_reindex_removes_everything(models: ModelStore, tmp_path: Path) -> None:
    async with open_store(tmp_path / "milvus.db", TableEncoder(models), reindex_batch_size=4) as store:
        await store.create("docs", "tiny@1", {})
        await store.upsert("docs", [ItemIn(id=f"x{i}", text=f"drop {i}") for i in range(200)])
        await store.reindex("docs", 2)
        await store.drop("docs")
        assert await store._milvus.call("list_collections") == [CATALOG]
        assert await store._milvus.alias_target("docs") is None
        info, created = await store.create("docs", "tiny@2", {})
        assert created and (info.version, info.items) == (2, 0)


class FailingEncoder(TableEncoder):
    async def embed(self, texts: list[str], version: ModelVersion, purpose: str = "client") -> SimpleNamespace:
        if version.version == 2:
            raise RuntimeError("the new version cannot embed")
        return await super().embed(texts, version)


async def test_a_reindex_that_keeps_failing_is_abandoned_and_says_why(models: ModelStore, tmp_path: Path) -> None:
    async with open_store(tmp_path / "milvus.db", FailingEncoder(models)) as store:
        await store.create("docs", "tiny@1", {})
        await store.upsert("docs", [ItemIn(id="a", text="alpha")])
        await store.reindex("docs", 2)

        async def failed() -> bool:
            return (await store.describe("docs")).state == "reindex_failed"

        await wait_for(failed, timeout_s=30)
        info = await store.describe("docs")
        assert info.version == 1 and info.reindex is not None and info.reindex.error == "RuntimeError"
        assert not await store._milvus.call("has_collection", "docs__tiny__v2")
        await store.upsert("docs", [ItemIn(id="b", text="beta")])  # writes go to the active version only again
        assert (await store.describe("docs")).items == 2
