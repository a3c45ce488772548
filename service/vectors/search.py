"""A search of a collection's active physical collection: dense (vectors), keyword (BM25 on the stored text) or
hybrid (both legs fused by reciprocal rank fusion); the score is higher for more similar hits in every mode."""

import time
from typing import Any

from opentelemetry import trace
from pymilvus import AnnSearchRequest, RRFRanker

from service.errors import InvalidRequest
from service.models.store import ModelVersion
from service.settings import Settings
from service.vectors.catalog import CollectionRecord, Encoder, embed, served_version
from service.vectors.checks import check_query, check_vector
from service.vectors.filters import FieldType, compile_filter
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus
from service.vectors.protocol import Hit, SearchRequest

RRF_K = 60
SEARCH_OUTPUTS = ("text", "metadata")


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
    expression = compile_filter(request.filter, record.fields) if request.filter is not None else ""
    wanted, keys = _outputs(request.output_fields, record.fields)
    query = check_query(request, settings.max_input_chars)
    vector: list[float] | None = None
    if request.mode in ("dense", "hybrid"):
        if request.vector is not None:
            vector = check_vector(request.vector, record.active.dimension)
        else:
            assert query is not None  # check_query requires one of them
            vector = (await embed(encoder, [query], version))[0]
    started = time.perf_counter()
    physical = record.active.name
    ef = max(settings.vector_search_ef, request.top_k)
    dense_params = {"metric_type": "COSINE", "params": {"ef": ef} if record.active.index_type == "HNSW" else {}}
    keyword_params = {"metric_type": "BM25"}
    if request.mode == "dense":
        assert vector is not None
        hits = await milvus.search(physical, [vector], "vector", request.top_k, expression, wanted, dense_params)
    elif request.mode == "keyword":
        assert query is not None
        hits = await milvus.search(physical, [query], "sparse", request.top_k, expression, wanted, keyword_params)
    else:
        assert query is not None and vector is not None
        # More candidates per leg than asked for, so the fusion has something to re-rank.
        leg = max(2 * request.top_k, 20)
        legs = [
            AnnSearchRequest(data=[vector], anns_field="vector", param=dense_params, limit=leg, expr=expression),
            AnnSearchRequest(data=[query], anns_field="sparse", param=keyword_params, limit=leg, expr=expression),
        ]
        hits = await milvus.hybrid_search(physical, legs, RRFRanker(RRF_K), request.top_k, wanted)
    metrics.observe_search(record.name, record.model, version.version, request.mode, time.perf_counter() - started)
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
