"""Collections of items (id, text, metadata, vector) on Milvus: dense, keyword (BM25) and hybrid search,
each collection on one model version (``service.vectors.reindex`` moves it to another).

Storage: one physical Milvus collection per (collection, model version), ``<name>__<model>__v<version>``;
the public name is a Milvus alias on the active one. The rest of what is known about a collection is in
``service.vectors.catalog``; the Milvus plumbing is ``service.vectors.milvus``; how replicas sharing Redis agree
is ``service.vectors.coordination``.

Knows nothing about HTTP; raises ``service.errors`` for anything a client can fix.
"""

import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from service.errors import Conflict, NotFound, ServiceUnavailable
from service.models.store import ModelVersion
from service.settings import Settings
from service.telemetry.tracing import NO_TRACING
from service.vectors.catalog import (
    Catalog,
    CollectionRecord,
    Encoder,
    Physical,
    check_collection_name,
    embed,
    physical_name,
    served_version,
)
from service.vectors.checks import MAX_ID_CHARS, check_fields, check_id, check_items
from service.vectors.coordination import create_coordination
from service.vectors.filters import FieldType
from service.vectors.fusion import HybridSettings
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus, MissingCollection
from service.vectors.protocol import CollectionInfo, Hit, IndexInfo, Item, ItemIn, ReindexInfo, SearchRequest
from service.vectors.reindex import Reindexer
from service.vectors.search import search_active
from service.vectors.upkeep import Upkeep

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _traced(
    method: Callable[Concatenate["VectorStore", P], Awaitable[R]],
) -> Callable[Concatenate["VectorStore", P], Awaitable[R]]:
    """Run ``method`` in a ``vector_store.<method>`` span naming its collection (the first argument)."""

    @functools.wraps(method)
    async def traced(self: "VectorStore", /, *args: P.args, **kwargs: P.kwargs) -> R:
        collection = args[0] if args else kwargs.get("name")
        attributes: dict[str, AttributeValue] = {"collection": collection} if isinstance(collection, str) else {}
        with self._tracer.start_as_current_span(f"vector_store.{method.__name__}", attributes=attributes):
            return await method(self, *args, **kwargs)

    return traced


def _tag(model: str, version: int, **attributes: AttributeValue) -> None:
    """The collection's model version, and more, on the current ``vector_store.*`` span."""
    trace.get_current_span().set_attributes({"model": model, "version": version, **attributes})


class VectorStore:
    """The collections, their items and searches; every method may raise ``ServiceUnavailable``."""

    def __init__(
        self, settings: Settings, encoder: Encoder, metrics: VectorMetrics, tracer: Tracer = NO_TRACING
    ) -> None:
        self._settings = settings
        self._encoder = encoder
        self._metrics = metrics
        self._tracer = tracer
        self._milvus = Milvus(settings)
        self._coordination = create_coordination(settings)
        self._catalog = Catalog(self._milvus, self._coordination)
        self._reindexer = Reindexer(settings, self._milvus, self._catalog, self._coordination, encoder, metrics, tracer)
        self._upkeep = Upkeep(
            settings, self._milvus, self._catalog, self._coordination, self._reindexer, encoder, metrics
        )

    # ── lifecycle ──────────────────────────────────────────────────────────

    def start(self) -> None:
        """Connect in the background: resume every collection (``service.vectors.upkeep``). The gateway serves
        embeddings while Milvus is unreachable; collection routes answer 503 meanwhile."""
        self._upkeep.start()

    async def close(self) -> None:
        await self._upkeep.close()
        await self._reindexer.close()
        await self._coordination.close()
        await self._milvus.close()

    # ── collections ────────────────────────────────────────────────────────

    @_traced
    async def create(
        self, name: str, model: str, fields: dict[str, FieldType], hybrid: HybridSettings | None = None
    ) -> tuple[CollectionInfo, bool]:
        """Create ``name`` on ``model`` (name or name@version) with ``hybrid`` search defaults; (its description,
        whether it was created). Creating an existing collection with the same model and fields changes nothing
        (nor does leaving ``hybrid`` out); other hybrid defaults are a conflict (PATCH changes them)."""
        check_collection_name(name)
        check_fields(fields)
        version = self._encoder.resolve(model)
        _tag(version.model, version.version)
        async with self._coordination.holding(name, exclusive=True) as held:
            existing = await self._catalog.held(name, held)
            if existing is not None:
                pinned = "@" in model
                if (
                    existing.model != version.model
                    or existing.fields != fields
                    or (pinned and existing.active.version != version.version)
                ):
                    raise Conflict(
                        f"collection '{name}' exists with model {existing.model}@{existing.active.version} and "
                        f"fields {json.dumps(existing.fields)}; delete it first or choose another name."
                    )
                if hybrid is not None and hybrid != existing.hybrid:
                    raise Conflict(
                        f"collection '{name}' exists with other hybrid defaults "
                        f"({existing.hybrid.model_dump_json(exclude_none=True)}); change them with PATCH "
                        f"/v1/collections/{name}.",
                        param="hybrid",
                    )
                return await self._describe(existing), False
            physical = await self._create_physical(name, version)
            await self._milvus.point_alias(name, physical.name)
            record = CollectionRecord(
                name=name,
                model=version.model,
                fields=fields,
                active=physical,
                created_at=time.time(),
                hybrid=hybrid or HybridSettings(),
            )
            await self._catalog.save(record)
        self._metrics.set_items(name, record.model, physical.version, 0)
        log.info("collection created", extra={"collection": name, "physical": physical.name})
        return await self._describe(record), True

    async def _create_physical(self, name: str, version: ModelVersion, active: Physical | None = None) -> Physical:
        physical = Physical(
            name=physical_name(name, version, active),
            version=version.version,
            sha256=version.manifest.sha256,
            dimension=version.dimension,
            index_type=self._settings.vector_index,
            index_params=self._settings.vector_index_params,
            keyword_analyzer=self._settings.keyword_analyzer,
        )
        # That version's collection may linger (a failed re-index, or one retired and not dropped yet).
        await self._milvus.drop_physical(physical.name)
        await self._milvus.create_physical(
            physical.name, physical.dimension, physical.index_type, physical.index_params, physical.keyword_analyzer
        )
        return physical

    @_traced
    async def list_collections(self) -> list[CollectionInfo]:
        records = await self._catalog.records()
        return [await self._describe(record) for record in records.values()]

    async def bound_versions(self) -> dict[tuple[str, int], list[str]] | None:
        """(model, version) -> the collections bound to it: each one's active version, and the target of a running
        re-index (written to as well). None until the catalog has been read at start: this never waits on Milvus."""
        if not self._upkeep.started:
            return None
        if self._milvus.in_process and not Path(self._milvus.uri).exists():
            return {}  # no Milvus Lite file yet: no collection either
        bound: dict[tuple[str, int], list[str]] = {}
        for name, record in sorted((await self._catalog.records()).items()):
            for physical in record.write_targets():
                bound.setdefault((record.model, physical.version), []).append(name)
        return bound

    async def collections_on(self, model: str) -> list[CollectionRecord]:
        """The catalog records, by name, of the collections whose vectors ``model`` makes (a promotion of a new
        version re-indexes each); read from the catalog alone, without counting items in Milvus."""
        records = await self._catalog.records()
        return [record for record in records.values() if record.model == model]

    @_traced
    async def describe(self, name: str) -> CollectionInfo:
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        return await self._describe(record)

    async def _describe(self, record: CollectionRecord) -> CollectionInfo:
        try:
            items: int | None = await self._count(record.active)
        except (ServiceUnavailable, MissingCollection):
            items = None
        reindex = record.reindex
        return CollectionInfo(
            name=record.name,
            model=record.model,
            version=record.active.version,
            dimension=record.active.dimension,
            fields=record.fields,
            items=items,
            index=IndexInfo(type=record.active.index_type, metric="COSINE", params=record.active.index_params),
            keyword_analyzer=record.active.keyword_analyzer,
            hybrid=record.hybrid.resolved(),
            state="ready" if reindex is None else "reindexing" if reindex.state == "running" else "reindex_failed",
            reindex=None
            if reindex is None
            else ReindexInfo(
                version=reindex.target.version,
                state=reindex.state,
                copied=reindex.copied,
                total=reindex.total,
                progress=reindex.progress,
                started_at=reindex.started_at,
                error=reindex.error,
            ),
            created_at=record.created_at,
        )

    @_traced
    async def update_hybrid(self, name: str, hybrid: HybridSettings) -> CollectionInfo:
        """Replace the hybrid defaults of ``name`` that ``hybrid`` sets (a field given as null: back to the gateway's
        default); the others stay. Every replica searches with them from its next request."""
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        async with self._coordination.holding(name, exclusive=True) as held:
            record = await self._catalog.get(name, held)
            changes = {field: getattr(hybrid, field) for field in hybrid.model_fields_set}
            record = record.model_copy(update={"hybrid": record.hybrid.model_copy(update=changes)})
            await self._catalog.save(record)
        log.info("collection hybrid defaults changed", extra={"collection": name})
        return await self._describe(record)

    @_traced
    async def drop(self, name: str) -> None:
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        await self._reindexer.cancel(name)  # here; a replica driving it elsewhere stops at its next batch
        async with self._coordination.holding(name, exclusive=True) as held:
            record = await self._catalog.get(name, held)
            await self._milvus.drop_alias(name)
            physicals = [record.active.name, *(r.name for r in record.retired)]
            if record.reindex is not None:
                physicals.append(record.reindex.target.name)
            for physical in physicals:
                await self._milvus.drop_physical(physical)
            await self._catalog.delete(name)
        self._metrics.forget(name)
        log.info("collection dropped", extra={"collection": name})

    @_traced
    async def reindex(self, name: str, version: int) -> CollectionInfo:
        """Start moving ``name`` to ``version`` of its model (or to other content exported under the version it is
        on); progress shows in ``describe``."""
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version, target_version=version)
        target_version = self._encoder.resolve(f"{record.model}@{version}")
        async with self._coordination.holding(name, exclusive=True) as held:
            record = await self._catalog.get(name, held)
            if record.reindexing:
                assert record.reindex is not None
                raise Conflict(
                    f"collection '{name}' is already being re-indexed to version {record.reindex.target.version}; "
                    f"watch GET /v1/collections/{name} and retry when it is done."
                )
            if record.active.version == version and record.active.sha256 in (None, target_version.manifest.sha256):
                raise Conflict(f"collection '{name}' is already on {record.model}@{version}.")
            target = await self._create_physical(name, target_version, record.active)
            record = await self._reindexer.begin(record, target)
        return await self._describe(record)

    # ── items ──────────────────────────────────────────────────────────────

    @contextlib.asynccontextmanager
    async def _writing(self, name: str) -> AsyncIterator[CollectionRecord]:
        """Hold ``name`` for a write of items; yields its record as it is now. Shared with other writes while no
        re-index runs; exclusive while one does, so copied batches and writes to both collections go one at a
        time (a batch never overwrites a newer write, both collections see writes in the same order)."""
        async with self._coordination.holding(name, exclusive=False) as held:
            record = await self._catalog.get(name, held)
            if not record.reindexing:
                yield record
                return
        async with self._coordination.holding(name, exclusive=True) as held:
            yield await self._catalog.get(name, held)

    @_traced
    async def upsert(self, name: str, items: list[ItemIn]) -> ModelVersion:
        """Embed and store ``items`` (replacing those with the same ids); the active version that embedded them."""
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version, items=len(items))
        started = time.perf_counter()
        vectors: dict[tuple[str, str | None], list[list[float]]] = {}  # by physical collection and content
        for _ in range(3):
            rows = check_items(items, record.fields, self._settings.max_input_chars)
            texts = [row["text"] for row in rows]
            for target in record.write_targets():
                if (target.name, target.sha256) not in vectors:
                    version = served_version(self._encoder, record, target)
                    vectors[target.name, target.sha256] = await embed(self._encoder, texts, version)
            async with self._writing(name) as current:
                targets = current.write_targets()
                if current.fields != record.fields or any((t.name, t.sha256) not in vectors for t in targets):
                    record = current  # a re-index started or finished while embedding: embed for the new targets
                    continue
                for target in targets:
                    embedded = vectors[target.name, target.sha256]
                    await self._milvus.upsert(
                        target.name, [{**row, "vector": v} for row, v in zip(rows, embedded, strict=True)]
                    )
            version = served_version(self._encoder, current, current.active)
            self._metrics.observe_upsert(name, current.model, version.version, time.perf_counter() - started)
            self._after_write(name)
            return version
        raise ServiceUnavailable(f"collection '{name}' kept changing version during the upsert; retry it.")

    @_traced
    async def get(self, name: str, item_id: str) -> Item:
        check_id(item_id, "the item id in the path", param="id")
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        # Through the alias: the collection active now, even when a cut-over happened since the record was read.
        rows = await self._milvus.get(name, [item_id])
        if not rows:
            raise NotFound(f"collection '{name}' has no item '{item_id[:MAX_ID_CHARS]}'.")
        row = rows[0]
        return Item(id=row["id"], text=row["text"], metadata=row.get("metadata") or {})

    @_traced
    async def delete(self, name: str, item_id: str) -> None:
        check_id(item_id, "the item id in the path", param="id")
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        async with self._writing(name) as record:
            if not await self._milvus.get(record.active.name, [item_id]):
                raise NotFound(f"collection '{name}' has no item '{item_id[:MAX_ID_CHARS]}'.")
            for target in record.write_targets():
                await self._milvus.delete(target.name, [item_id])
        self._after_write(name)

    def _after_write(self, name: str) -> None:
        async def refresh_count() -> None:
            record = await self._catalog.find(name)
            if record is not None:
                self._metrics.set_items(name, record.model, record.active.version, await self._count(record.active))

        self._milvus.after_writes(name, refresh_count)

    async def _count(self, physical: Physical) -> int:
        return await self._milvus.count(physical.name)

    # ── search ─────────────────────────────────────────────────────────────

    @_traced
    async def search(self, name: str, request: SearchRequest) -> tuple[list[Hit], ModelVersion]:
        """The ``top_k`` best hits, best first (score: higher is more similar in every mode)."""
        record = await self._catalog.get(name)
        try:
            return await search_active(self._milvus, self._encoder, self._settings, self._metrics, record, request)
        except MissingCollection:
            # Another replica moved the alias and dropped the collection this record names since it was read.
            current = await self._catalog.get(name)
            if current.active.name == record.active.name:
                raise
        return await search_active(self._milvus, self._encoder, self._settings, self._metrics, current, request)
