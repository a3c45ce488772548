"""A search of a collection's active physical collection: dense (vectors), keyword (BM25 on the stored text) or
hybrid; the score is higher for more similar hits in every mode.

Hybrid runs both legs here, side by side with the same filter, each ``candidates`` deep (the keyword leg starts
while the query is being embedded), and fuses them with ``service.vectors.fusion`` as the request, else the
collection, says. A leg is exactly the search of its own mode with ``top_k = candidates``, so a client that fetches
the legs itself and fuses them with the same module gets the same hits (``client.evaluate`` relies on it).
"""

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from opentelemetry import trace

from service.errors import InvalidRequest
from service.models.store import ModelVersion
from service.settings import Settings
from service.vectors.catalog import CollectionRecord, Encoder, embed, served_version
from service.vectors.checks import check_query, check_vector
from service.vectors.filters import FieldType, compile_filter
from service.vectors.fusion import ResolvedHybrid, fuse
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus
from service.vectors.protocol import Hit, SearchRequest

SEARCH_OUTPUTS = ("text", "metadata")

T = TypeVar("T")
U = TypeVar("U")


async def search_active(
    milvus: Milvus,
    encoder: Encoder,
    settings: Settings,
    metrics: VectorMetrics,
    record: CollectionRecord,
    request: SearchRequest,
) -> tuple[list[Hit], ModelVersion]:
    """The ``top_k`` best hits of ``request`` in ``record``'s active collection, best first, and the version
    that embedded the query (503 when that version is not served, or is other content now)."""
    version = served_version(encoder, record, record.active)
    trace.get_current_span().set_attributes(
        {"model": version.model, "version": version.version, "mode": request.mode, "top_k": request.top_k}
    )
    hybrid = hybrid_settings(request, record)
    expression = compile_filter(request.filter, record.fields) if request.filter is not None else ""
    wanted, keys = _outputs(request.output_fields, record.fields)
    query = check_query(request, settings.max_input_chars)
    legs = _Legs(milvus, settings, record, expression)

    async def query_vector() -> list[float]:
        if request.vector is not None:
            return check_vector(request.vector, record.active.dimension)
        assert query is not None  # check_query requires one of them
        return (await embed(encoder, [query], version))[0]

    if request.mode == "dense":
        vector = await query_vector()
        started = time.perf_counter()
        hits = await legs.dense(vector, request.top_k, wanted)
    elif request.mode == "keyword":
        assert query is not None
        started = time.perf_counter()
        hits = await legs.keyword(query, request.top_k, wanted)
    else:
        assert query is not None and hybrid is not None
        started = time.perf_counter()
        depth = max(hybrid.candidates, request.top_k)

        async def dense_leg() -> list[dict[str, Any]]:
            return await legs.dense(await query_vector(), depth, [])

        dense, keyword = await _both(dense_leg(), legs.keyword(query, depth, []))
        fused = fuse(_ranked(dense, keyword=False), _ranked(keyword, keyword=True), hybrid.fusion)[: request.top_k]
        hits = await legs.with_outputs(fused, wanted)
    metrics.observe_search(record.name, record.model, version.version, request.mode, time.perf_counter() - started)
    return [_hit(hit, wanted, keys, keyword=request.mode == "keyword") for hit in hits], version


def hybrid_settings(request: SearchRequest, record: CollectionRecord) -> ResolvedHybrid | None:
    """The fusion and depth of a hybrid search: the request's, else the collection's, else the gateway's; None in
    the other modes, which refuse them."""
    if request.mode != "hybrid":
        for field in ("fusion", "candidates"):
            if getattr(request, field) is not None:
                raise InvalidRequest(
                    f"'{field}' applies to hybrid search only; send mode 'hybrid' or leave '{field}' out.", param=field
                )
        return None
    if request.candidates is not None and request.candidates < request.top_k:
        raise InvalidRequest(
            f"'candidates' ({request.candidates}) is less than 'top_k' ({request.top_k}): each leg must retrieve at "
            "least top_k hits; raise candidates or leave it out.",
            param="candidates",
        )
    resolved = record.hybrid.resolved()
    return ResolvedHybrid(
        fusion=request.fusion if request.fusion is not None else resolved.fusion,
        candidates=request.candidates if request.candidates is not None else resolved.candidates,
    )


class _Legs:
    """The dense and keyword searches of one collection, with one filter."""

    def __init__(self, milvus: Milvus, settings: Settings, record: CollectionRecord, expression: str) -> None:
        self._milvus = milvus
        self._settings = settings
        self._physical = record.active
        self._where = expression

    async def dense(self, vector: list[float], limit: int, outputs: list[str]) -> list[dict[str, Any]]:
        ef = max(self._settings.vector_search_ef, limit)
        params = {"metric_type": "COSINE", "params": {"ef": ef} if self._physical.index_type == "HNSW" else {}}
        return await self._milvus.search(self._physical.name, [vector], "vector", limit, self._where, outputs, params)

    async def keyword(self, query: str, limit: int, outputs: list[str]) -> list[dict[str, Any]]:
        params = {"metric_type": "BM25"}
        return await self._milvus.search(self._physical.name, [query], "sparse", limit, self._where, outputs, params)

    async def with_outputs(self, fused: list[tuple[str, float]], outputs: list[str]) -> list[dict[str, Any]]:
        """Fused (id, score) as hits carrying ``outputs``, read by id (an item deleted since the legs ran is left
        out)."""
        if not outputs or not fused:
            return [{"id": item, "distance": score, "entity": {}} for item, score in fused]
        rows = await self._milvus.get(self._physical.name, [item for item, _ in fused], tuple(outputs))
        entities = {row["id"]: row for row in rows}
        return [{"id": item, "distance": score, "entity": entities[item]} for item, score in fused if item in entities]


async def _both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Both results, run side by side; when one fails, the other is cancelled and awaited before the error goes on."""
    tasks = (asyncio.ensure_future(first), asyncio.ensure_future(second))
    try:
        return await tasks[0], await tasks[1]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _ranked(hits: list[dict[str, Any]], *, keyword: bool) -> list[tuple[str, float]]:
    return [(str(hit["id"]), _score(hit, keyword=keyword)) for hit in hits]


def _score(hit: dict[str, Any], *, keyword: bool) -> float:
    # Milvus reports BM25 scores as positive numbers and Milvus Lite as negative distances, both best first.
    return abs(float(hit["distance"])) if keyword else float(hit["distance"])


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
    return Hit(
        id=hit["id"],
        score=_score(hit, keyword=keyword),
        text=entity.get("text") if "text" in wanted else None,
        metadata=metadata,
    )
