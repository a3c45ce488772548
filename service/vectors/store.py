"""Collections of items (id, text, metadata, vector) on Milvus: dense, keyword (BM25) and hybrid search,
each collection on one model version (``service.vectors.reindex`` moves it to another).

Storage: one physical Milvus collection per (collection, model version), ``<name>__<model>__v<version>``;
the public name is a Milvus alias on the active one. The rest of what is known about a collection is in
``service.vectors.catalog``; the Milvus plumbing is ``service.vectors.milvus``.

Knows nothing about HTTP; raises ``service.errors`` for anything a client can fix.
"""

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue
from pymilvus import AnnSearchRequest, RRFRanker
from pymilvus.exceptions import MilvusException

from service.errors import ApiError, Conflict, InvalidRequest, NotFound, ServiceUnavailable
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
from service.vectors.checks import MAX_ID_CHARS, check_fields, check_id, check_items, check_query, check_vector
from service.vectors.filters import FieldType, compile_filter
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus, MissingCollection
from service.vectors.protocol import CollectionInfo, Hit, IndexInfo, Item, ItemIn, ReindexInfo, SearchRequest
from service.vectors.reindex import RETRY_DELAYS_S, Reindexer

log = logging.getLogger(__name__)

RRF_K = 60
SEARCH_OUTPUTS = ("text", "metadata")

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
        self._catalog = Catalog(self._milvus)
        self._reindexer = Reindexer(settings, self._milvus, self._catalog, encoder, metrics, tracer)
        self._startup: asyncio.Task[None] | None = None

    # ── lifecycle ──────────────────────────────────────────────────────────

    def start(self) -> None:
        """Connect in the background: load every collection, resume re-indexes, schedule pending drops.
        The gateway serves embeddings while Milvus is unreachable; collection routes answer 503 meanwhile.
        A Milvus Lite file that does not exist yet holds nothing to resume: it is created on first use."""
        if self._milvus.is_lite and not Path(self._milvus.uri).exists():
            return
        self._startup = asyncio.create_task(self._start_when_reachable())

    async def close(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        await self._reindexer.close()
        await self._milvus.close()

    async def _start_when_reachable(self) -> None:
        """Resume every collection once. Milvus unreachable, or one collection failing to load (a timeout
        included), is retried with backoff; it never stops the other collections from resuming."""
        resumed: set[str] = set()
        attempt = 0
        while True:
            failed = 0
            try:
                records = await self._catalog.records()
                for record in records.values():
                    if record.name in resumed:
                        continue
                    try:
                        await self._resume(record)
                        resumed.add(record.name)
                    except NotFound as error:  # gone from Milvus: nothing to retry
                        resumed.add(record.name)
                        log.error("collection not resumed", extra={"collection": record.name, "reason": error.message})
                    except (ApiError, MilvusException) as error:
                        failed += 1
                        reason = str(error)
                        log.warning("collection not resumed yet", extra={"collection": record.name, "reason": reason})
                if not failed:
                    log.info("vector store ready", extra={"collections": len(records), "uri": self._milvus.uri})
                    return
            except ServiceUnavailable as error:
                log.warning("vector store unreachable", extra={"reason": error.message})
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            attempt += 1
            log.warning("vector store start retrying", extra={"retry_s": delay, "failed_collections": failed})
            await asyncio.sleep(delay)

    async def _resume(self, record: CollectionRecord) -> None:
        # Milvus Lite opens collections released: loading (and warming) now keeps that off the first search.
        await self._milvus.load(record.active.name)
        await self._milvus.warm(record.active.name)
        self._metrics.set_items(record.name, record.model, record.active.version, await self._count(record.active))
        await self._reindexer.resume(record)

    # ── collections ────────────────────────────────────────────────────────

    @_traced
    async def create(self, name: str, model: str, fields: dict[str, FieldType]) -> tuple[CollectionInfo, bool]:
        """Create ``name`` on ``model`` (name or name@version); (its description, whether it was created).
        Creating an existing collection with the same model and fields changes nothing."""
        check_collection_name(name)
        check_fields(fields)
        version = self._encoder.resolve(model)
        _tag(version.model, version.version)
        async with self._milvus.write_lock(name):
            existing = await self._catalog.find(name)
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
                return await self._describe(existing), False
            physical = await self._create_physical(name, version)
            await self._milvus.point_alias(name, physical.name)
            record = CollectionRecord(
                name=name, model=version.model, fields=fields, active=physical, created_at=time.time()
            )
            await self._catalog.save(record)
        self._metrics.set_items(name, record.model, physical.version, 0)
        log.info("collection created", extra={"collection": name, "physical": physical.name})
        return await self._describe(record), True

    async def _create_physical(self, name: str, version: ModelVersion) -> Physical:
        physical = Physical(
            name=physical_name(name, version),
            version=version.version,
            dimension=version.dimension,
            index_type=self._settings.vector_index,
            index_params=self._settings.vector_index_params,
        )
        # That version's collection may linger (a failed re-index, or one retired and not dropped yet).
        await self._milvus.drop_physical(physical.name)
        await self._milvus.create_physical(
            physical.name, physical.dimension, physical.index_type, physical.index_params
        )
        return physical

    @_traced
    async def list_collections(self) -> list[CollectionInfo]:
        records = await self._catalog.records()
        return [await self._describe(records[name]) for name in sorted(records)]

    async def bound_versions(self) -> dict[tuple[str, int], list[str]] | None:
        """(model, version) -> the collections bound to it: each one's active version, and the target of a running
        re-index (written to as well). None until the catalog has been read at start: this never waits on Milvus."""
        if self._startup is not None and not self._startup.done():
            return None
        if self._startup is None and self._milvus.is_lite and not Path(self._milvus.uri).exists():
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
        return [records[name] for name in sorted(records) if records[name].model == model]

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
    async def drop(self, name: str) -> None:
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        await self._reindexer.cancel(name)
        async with self._milvus.write_lock(name):
            record = await self._catalog.get(name)
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
        """Start moving ``name`` to ``version`` of its model; progress shows in ``describe``."""
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version, target_version=version)
        target_version = self._encoder.resolve(f"{record.model}@{version}")
        async with self._milvus.write_lock(name):
            record = await self._catalog.get(name)
            if record.reindex is not None and record.reindex.state == "running":
                raise Conflict(
                    f"collection '{name}' is already being re-indexed to version {record.reindex.target.version}; "
                    f"watch GET /v1/collections/{name} and retry when it is done."
                )
            if record.active.version == version:
                raise Conflict(f"collection '{name}' is already on {record.model}@{version}.")
            target = await self._create_physical(name, target_version)
            record = await self._reindexer.begin(record, target)
        return await self._describe(record)

    # ── items ──────────────────────────────────────────────────────────────

    @_traced
    async def upsert(self, name: str, items: list[ItemIn]) -> ModelVersion:
        """Embed and store ``items`` (replacing those with the same ids); the active version that embedded them."""
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version, items=len(items))
        rows = check_items(items, record.fields, self._settings.max_input_chars)
        started = time.perf_counter()
        texts = [row["text"] for row in rows]
        for _ in range(3):
            targets = record.write_targets()
            vectors = {
                t.version: await embed(self._encoder, texts, served_version(self._encoder, record, t.version))
                for t in targets
            }
            async with self._milvus.write_lock(name):
                record = await self._catalog.get(name)
                if record.write_targets() != targets:
                    continue  # a re-index started or finished while embedding: embed for the new targets
                for target in targets:
                    batch = [{**row, "vector": v} for row, v in zip(rows, vectors[target.version], strict=True)]
                    await self._milvus.upsert(name, target.name, batch)
            version = served_version(self._encoder, record, record.active.version)
            self._metrics.observe_upsert(name, record.model, version.version, time.perf_counter() - started)
            self._after_write(name)
            return version
        raise ServiceUnavailable(f"collection '{name}' kept changing version during the upsert; retry it.")

    @_traced
    async def get(self, name: str, item_id: str) -> Item:
        check_id(item_id, "the item id in the path", param="id")
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        rows = await self._milvus.get(record.active.name, [item_id])
        if not rows:
            raise NotFound(f"collection '{name}' has no item '{item_id[:MAX_ID_CHARS]}'.")
        row = rows[0]
        return Item(id=row["id"], text=row["text"], metadata=row.get("metadata") or {})

    @_traced
    async def delete(self, name: str, item_id: str) -> None:
        check_id(item_id, "the item id in the path", param="id")
        record = await self._catalog.get(name)
        _tag(record.model, record.active.version)
        async with self._milvus.write_lock(name):
            record = await self._catalog.get(name)
            if not await self._milvus.get(record.active.name, [item_id]):
                raise NotFound(f"collection '{name}' has no item '{item_id[:MAX_ID_CHARS]}'.")
            for target in record.write_targets():
                await self._milvus.delete(name, target.name, [item_id])
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
        version = served_version(self._encoder, record, record.active.version)
        _tag(version.model, version.version, mode=request.mode, top_k=request.top_k)
        expression = compile_filter(request.filter, record.fields) if request.filter is not None else ""
        wanted, keys = _outputs(request.output_fields, record.fields)
        query = check_query(request, self._settings.max_input_chars)
        vector: list[float] | None = None
        if request.mode in ("dense", "hybrid"):
            if request.vector is not None:
                vector = check_vector(request.vector, record.active.dimension)
            else:
                assert query is not None  # check_query requires one of them
                vector = (await embed(self._encoder, [query], version))[0]
        started = time.perf_counter()
        physical = record.active.name
        ef = max(self._settings.vector_search_ef, request.top_k)
        dense_params = {"metric_type": "COSINE", "params": {"ef": ef} if record.active.index_type == "HNSW" else {}}
        keyword_params = {"metric_type": "BM25"}
        if request.mode == "dense":
            assert vector is not None
            hits = await self._milvus.search(
                physical, [vector], "vector", request.top_k, expression, wanted, dense_params
            )
        elif request.mode == "keyword":
            assert query is not None
            hits = await self._milvus.search(
                physical, [query], "sparse", request.top_k, expression, wanted, keyword_params
            )
        else:
            assert query is not None and vector is not None
            # More candidates per leg than asked for, so the fusion has something to re-rank.
            leg = max(2 * request.top_k, 20)
            legs = [
                AnnSearchRequest(data=[vector], anns_field="vector", param=dense_params, limit=leg, expr=expression),
                AnnSearchRequest(data=[query], anns_field="sparse", param=keyword_params, limit=leg, expr=expression),
            ]
            hits = await self._milvus.hybrid_search(physical, legs, RRFRanker(RRF_K), request.top_k, wanted)
        self._metrics.observe_search(name, record.model, version.version, request.mode, time.perf_counter() - started)
        return [_hit(hit, wanted, keys, keyword=request.mode == "keyword") for hit in hits], version


def _outputs(requested: list[str] | None, fields: dict[str, FieldType]) -> tuple[list[str], set[str] | None]:
    """(Milvus output fields, the metadata keys to return or None for all)."""
    if requested is None:
        return list(SEARCH_OUTPUTS), None
    unknown = [f for f in requested if f not in SEARCH_OUTPUTS and f not in fields]
    if unknown:
        allowed = ", ".join([*SEARCH_OUTPUTS, *sorted(fields)])
        raise InvalidRequest(
            f"output_fields: {unknown[0][:64]!r} is unknown; use any of {allowed}.", param="output_fields"
        )
    wanted = [f for f in SEARCH_OUTPUTS if f in requested]
    keys = {f for f in requested if f in fields}
    if keys and "metadata" not in wanted:
        wanted.append("metadata")
        return wanted, keys
    return wanted, None


def _hit(hit: dict[str, Any], wanted: list[str], keys: set[str] | None, *, keyword: bool) -> Hit:
    entity = hit.get("entity", {})
    metadata = entity.get("metadata") if "metadata" in wanted else None
    if metadata is not None and keys is not None:
        metadata = {k: v for k, v in metadata.items() if k in keys}
    # Milvus reports BM25 scores as positive numbers and Milvus Lite as negative distances, both best first.
    score = abs(hit["distance"]) if keyword else hit["distance"]
    return Hit(id=hit["id"], score=score, text=entity.get("text") if "text" in wanted else None, metadata=metadata)
