"""Two vector stores sharing one Redis key prefix and one Milvus Lite server process, as two gateway replicas do
(in one event loop, so the test decides how their steps interleave): a write embedded before a re-index started
still reaches the new collection, one replica drives a re-index and another takes it over, concurrent catalog
changes do not lose one another, a drop while the other replica writes leaves nothing behind, and a record
written before collections named their version's content gets bound to it."""

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from loadtests.processes import MilvusLiteServer, free_port, milvus_server
from service.errors import Conflict, NotFound, ServiceUnavailable
from service.models.store import ModelStore, ModelVersion
from service.settings import Settings
from service.vectors.metrics import VectorMetrics
from service.vectors.protocol import ItemIn, SearchRequest
from service.vectors.store import VectorStore
from tests.conftest import SHARED_REDIS_URL
from tests.service.vectors.test_store import PacedEncoder, TableEncoder, stored_rows, wait_for


@pytest.fixture(scope="module")
def models(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLiteServer]:
    with milvus_server(tmp_path_factory.mktemp("coordination") / "data") as server:
        yield server


@asynccontextmanager
async def replica(
    milvus: MilvusLiteServer, prefix: str, encoder: TableEncoder, **settings: Any
) -> AsyncIterator[VectorStore]:
    options: dict[str, Any] = {"redis_url": SHARED_REDIS_URL, "redis_prefix": prefix, "reindex_grace_s": 0}
    store = VectorStore(
        Settings(milvus_uri=milvus.uri, **{**options, **settings}), encoder, VectorMetrics(CollectorRegistry())
    )
    store.start()
    try:
        yield store
    finally:
        await store.close()


def reindexed(encoder: TableEncoder) -> list[str]:
    """The texts ``encoder`` embedded for a re-index (the store's own work, tagged ``observe=False``)."""
    return [text for version, text in encoder.embedded if version == 2]


class GatedEncoder(TableEncoder):
    """Embeds served traffic (``observe=True``) only once ``opened`` is set."""

    def __init__(self, models: ModelStore) -> None:
        super().__init__(models)
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()

    async def embed(self, texts: list[str], version: ModelVersion, observe: bool = True) -> SimpleNamespace:
        if observe:
            self.waiting.set()
            await self.opened.wait()
        return await super().embed(texts, version, observe)


async def test_a_write_embedded_before_a_reindex_started_elsewhere_reaches_the_new_collection(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    paced, gated = PacedEncoder(models), GatedEncoder(models)
    async with (
        replica(milvus, shared_redis_prefix, paced, reindex_batch_size=8) as a,
        replica(milvus, shared_redis_prefix, gated) as b,
    ):
        await a.create("late", "tiny@1", {})
        await a.upsert("late", [ItemIn(id=f"i{i:03d}", text=f"item {i}") for i in range(64)])
        assert (await b.describe("late")).state == "ready"
        # B embeds its upsert for version 1 only, the sole collection before the re-index starts...
        write = asyncio.create_task(
            b.upsert("late", [ItemIn(id="i000", text="rewritten"), ItemIn(id="new", text="new")])
        )
        await gated.waiting.wait()
        await a.reindex("late", 2)
        for _ in range(3):  # ...while A's copier is already past those ids
            paced.permits.release()
        await wait_for(lambda: _copied_at_least(a, "late", 24), timeout_s=60)
        gated.opened.set()
        assert (await write).version == 1
        for _ in range(100):
            paced.permits.release()
        await wait_for(lambda: _ready(a, "late"), timeout_s=60)
        rows = {row["id"]: row for row in await stored_rows(a, "late__tiny__v2")}
        assert len(rows) == 65 and rows["i000"]["text"] == "rewritten" and "new" in rows
        np.testing.assert_allclose(rows["new"]["vector"], gated.vector("new", 2), atol=1e-5)
        np.testing.assert_allclose(rows["i000"]["vector"], gated.vector("rewritten", 2), atol=1e-5)


async def test_a_write_checked_before_a_reindex_started_elsewhere_is_copied_by_it(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    paced = PacedEncoder(models)
    async with (
        replica(milvus, shared_redis_prefix, paced, reindex_batch_size=8) as a,
        replica(milvus, shared_redis_prefix, TableEncoder(models)) as b,
    ):
        await a.create("checked", "tiny@1", {})
        await a.upsert("checked", [ItemIn(id=f"i{i:03d}", text=f"item {i}") for i in range(64)])
        # B's write has found the collection without a re-index and is on its way to Milvus, when A starts one.
        arrived, go_on = asyncio.Event(), asyncio.Event()
        upsert = b._milvus.upsert

        async def slow_upsert(name: str, rows: list[dict[str, Any]]) -> None:
            arrived.set()
            await go_on.wait()
            await upsert(name, rows)

        b._milvus.upsert = slow_upsert  # type: ignore[method-assign]
        write = asyncio.create_task(b.upsert("checked", [ItemIn(id="i000", text="rewritten by B")]))
        await arrived.wait()
        start = asyncio.create_task(a.reindex("checked", 2))
        for _ in range(100):
            paced.permits.release()
        # Had the start not waited for B's write, the copier would have copied i000's old text by now (its first
        # batch), and B's write would reach the old collection only: lost at the cut-over.
        await _until(lambda: _started_and_copied(start, a, "checked", 8), timeout_s=2)
        go_on.set()
        await write
        await start
        await wait_for(lambda: _ready(a, "checked"), timeout_s=60)
        rows = {row["id"]: row for row in await stored_rows(a, "checked__tiny__v2")}
        assert len(rows) == 64 and rows["i000"]["text"] == "rewritten by B"
        np.testing.assert_allclose(rows["i000"]["vector"], paced.vector("rewritten by B", 2), atol=1e-5)


async def _until(condition: Any, timeout_s: float) -> None:
    """Wait for ``condition`` at most ``timeout_s``, whether it comes or not."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


async def _started_and_copied(start: asyncio.Task[Any], store: VectorStore, name: str, count: int) -> bool:
    return start.done() and await _copied_at_least(store, name, count)


async def _copied_at_least(store: VectorStore, name: str, count: int) -> bool:
    reindex = (await store.describe(name)).reindex
    return reindex is not None and reindex.copied >= count


async def _ready(store: VectorStore, name: str) -> bool:
    return (await store.describe(name)).state == "ready"


async def test_one_replica_drives_a_reindex_and_another_takes_it_over_when_it_stops(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    items = [ItemIn(id=f"t{i:03d}", text=f"taken over {i}") for i in range(160)]
    b_encoder = TableEncoder(models)
    async with replica(milvus, shared_redis_prefix, b_encoder, reindex_batch_size=8) as b:
        a_encoder = PacedEncoder(models)
        async with replica(milvus, shared_redis_prefix, a_encoder, reindex_batch_size=8) as a:
            await a.create("handover", "tiny@1", {})
            await a.upsert("handover", items)
            await a.reindex("handover", 2)
            for _ in range(5):
                a_encoder.permits.release()
            await wait_for(lambda: _copied_at_least(b, "handover", 40))
            await asyncio.sleep(2.5)  # B looks for re-indexes nobody drives every second: this one has a driver
            assert reindexed(b_encoder) == []
        # A stopped (and gave its lease back): B goes on from the saved cursor within a second or two.
        await wait_for(lambda: _ready(b, "handover"), timeout_s=60)
        info = await b.describe("handover")
        assert (info.version, info.items) == (2, 160)
        assert len(reindexed(b_encoder)) <= 160 - 40
        rows = await stored_rows(b, "handover__tiny__v2")
        assert sorted(row["id"] for row in rows) == [item.id for item in items]
        for row in rows:
            np.testing.assert_allclose(row["vector"], b_encoder.vector(row["text"], 2), atol=1e-5)


async def test_concurrent_changes_on_two_replicas_do_not_lose_one_another(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    async with (
        replica(milvus, shared_redis_prefix, PacedEncoder(models)) as a,
        replica(milvus, shared_redis_prefix, PacedEncoder(models)) as b,
    ):
        created = await asyncio.gather(*(store.create("raced", "tiny@1", {"n": "int"}) for store in (a, b, a, b, a, b)))
        assert sorted(was_created for _, was_created in created) == [False] * 5 + [True]
        await a.upsert("raced", [ItemIn(id="x", text="x")])
        started = await asyncio.gather(a.reindex("raced", 2), b.reindex("raced", 2), return_exceptions=True)
        assert sorted(type(result).__name__ for result in started) == ["CollectionInfo", "Conflict"]
        assert any(isinstance(result, Conflict) and "already being re-indexed" in result.message for result in started)
        for store in (a, b):
            info = await store.describe("raced")
            assert (info.state, info.fields, info.reindex and info.reindex.version) == ("reindexing", {"n": "int"}, 2)


async def test_a_drop_while_another_replica_upserts_leaves_nothing_behind(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    async with (
        replica(milvus, shared_redis_prefix, TableEncoder(models)) as a,
        replica(milvus, shared_redis_prefix, TableEncoder(models)) as b,
    ):
        await a.create("doomed", "tiny@1", {})
        await a.upsert("doomed", [ItemIn(id=f"d{i}", text=f"doomed {i}") for i in range(50)])
        await a.reindex("doomed", 2)
        outcomes: list[str] = []

        async def keep_writing() -> None:
            for i in range(10_000):
                try:
                    await b.upsert("doomed", [ItemIn(id=f"w{i}", text=f"written by B {i}")])
                except NotFound as error:
                    outcomes.append(error.message)
                    return
                outcomes.append("ok")

        writer = asyncio.create_task(keep_writing())
        await wait_for(lambda: _wrote(outcomes, 5))
        await a.drop("doomed")
        await asyncio.wait_for(writer, timeout=60)
        assert outcomes[-1] == "collection 'doomed' does not exist; create it with PUT /v1/collections/doomed."
        assert set(outcomes[:-1]) == {"ok"}
        leftovers = [name for name in await b._milvus.call("list_collections") if name.startswith("doomed")]
        assert leftovers == [] and await b._milvus.alias_target("doomed") is None


async def _wrote(outcomes: list[str], count: int) -> bool:
    return len(outcomes) >= count


async def test_a_record_without_content_digests_is_served_and_bound_to_the_served_content(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    encoder = TableEncoder(models)
    async with replica(milvus, shared_redis_prefix, encoder) as a:
        await a.create("legacy", "tiny@2", {})
        await a.upsert("legacy", [ItemIn(id="old", text="from before digests")])
        record = await a._catalog.get("legacy")
        # As written by a gateway before physical collections named their content (no "sha256" at all).
        raw = record.model_dump(mode="json")
        del raw["active"]["sha256"]
        async with a._coordination.holding("legacy", exclusive=True):
            await a._catalog._table.save("legacy", json.dumps(raw))
            await a._coordination.changed("legacy")
        assert (await a._catalog.get("legacy")).active.sha256 is None
        hits, version = await a.search("legacy", SearchRequest(query="from before digests"))
        assert [hit.id for hit in hits] == ["old"] and version.version == 2
    async with replica(milvus, shared_redis_prefix, encoder) as b:  # a start binds it
        await wait_for(lambda: _bound(b, "legacy"))
        assert (await b._catalog.get("legacy")).active.sha256 == models.get("tiny", 2).manifest.sha256  # type: ignore[union-attr]


async def _bound(store: VectorStore, name: str) -> bool:
    return (await store._catalog.get(name)).active.sha256 is not None


async def test_without_redis_reachable_writes_are_refused_and_reads_use_the_replicas_copy(
    models: ModelStore, milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    async with replica(milvus, shared_redis_prefix, TableEncoder(models)) as a:
        await a.create("cut_off", "tiny@1", {})
        await a.upsert("cut_off", [ItemIn(id="a", text="alpha")])
        nowhere = f"redis://127.0.0.1:{free_port()}/0"
        async with replica(milvus, shared_redis_prefix, TableEncoder(models), redis_url=nowhere) as c:
            assert (await c.describe("cut_off")).items == 1
            assert (await c.get("cut_off", "a")).text == "alpha"
            with pytest.raises(ServiceUnavailable, match=r"Redis.*unavailable.*retry"):
                await c.upsert("cut_off", [ItemIn(id="b", text="beta")])
            with pytest.raises(ServiceUnavailable, match=r"Redis.*unavailable.*retry"):
                await c.create("other", "tiny@1", {})
