"""/v1/collections — collections of items, searched by vector, keyword or both (``store.VectorStore`` does the work)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from service.edge.auth import require
from service.edge.json_body import json_body, request_schema
from service.vectors.protocol import (
    CollectionInfo,
    CollectionList,
    CreateCollection,
    Deleted,
    Item,
    ReindexRequest,
    SearchRequest,
    SearchResponse,
    UpdateCollection,
    UpsertItems,
    UpsertResult,
)
from service.vectors.store import VectorStore

router = APIRouter(prefix="/v1/collections", tags=["collections"])
# Reading collections needs the search scope; changing them, the write scope (service/edge/auth.py).
READ = [Depends(require("search"))]
WRITE = [Depends(require("write"))]


def _store(request: Request) -> VectorStore:
    store: VectorStore = request.app.state.vector_store
    return store


@router.put(
    "/{name}", response_model=CollectionInfo, dependencies=WRITE, openapi_extra=request_schema(CreateCollection)
)
async def create_collection(
    name: str,
    body: Annotated[CreateCollection, Depends(json_body(CreateCollection))],
    request: Request,
    response: Response,
) -> CollectionInfo:
    """Create a collection on a model (201); the same request again changes nothing (200); other settings: 409."""
    info, created = await _store(request).create(name, body.model, body.fields, body.hybrid)
    response.status_code = 201 if created else 200
    return info


@router.patch(
    "/{name}", response_model=CollectionInfo, dependencies=WRITE, openapi_extra=request_schema(UpdateCollection)
)
async def update_collection(
    name: str, body: Annotated[UpdateCollection, Depends(json_body(UpdateCollection))], request: Request
) -> CollectionInfo:
    """Change the collection's hybrid-search defaults (the fields given; null = the gateway's default)."""
    return await _store(request).update_hybrid(name, body.hybrid)


@router.get("", response_model=CollectionList, dependencies=READ)
async def list_collections(request: Request) -> CollectionList:
    return CollectionList(data=await _store(request).list_collections())


@router.get("/{name}", response_model=CollectionInfo, dependencies=READ)
async def describe_collection(name: str, request: Request) -> CollectionInfo:
    return await _store(request).describe(name)


@router.delete("/{name}", dependencies=WRITE)
async def delete_collection(name: str, request: Request) -> dict[str, str | bool]:
    await _store(request).drop(name)
    return {"name": name, "deleted": True}


@router.post(
    "/{name}/items", response_model=UpsertResult, dependencies=WRITE, openapi_extra=request_schema(UpsertItems)
)
async def upsert_items(
    name: str, body: Annotated[UpsertItems, Depends(json_body(UpsertItems))], request: Request, response: Response
) -> UpsertResult:
    """Embed and store up to 1,000 items; an id that exists is replaced."""
    version = await _store(request).upsert(name, body.items)
    request.state.model_version = version
    request.state.log_fields = {"inputs": len(body.items)}
    response.headers["x-model-version"] = str(version.version)
    return UpsertResult(upserted=len(body.items), model=version.name)


@router.get("/{name}/items/{item_id:path}", response_model=Item, dependencies=READ)
async def get_item(name: str, item_id: str, request: Request) -> Item:
    return await _store(request).get(name, item_id)


@router.delete("/{name}/items/{item_id:path}", response_model=Deleted, dependencies=WRITE)
async def delete_item(name: str, item_id: str, request: Request) -> Deleted:
    await _store(request).delete(name, item_id)
    return Deleted(id=item_id)


@router.post("/{name}/search", response_model=SearchResponse, response_model_exclude_none=True, dependencies=READ)
async def search(
    name: str, body: Annotated[SearchRequest, Depends(json_body(SearchRequest))], request: Request, response: Response
) -> SearchResponse:
    """The top_k most similar items, best first: dense (vectors), keyword (BM25) or hybrid (both legs, fused)."""
    hits, version = await _store(request).search(name, body)
    request.state.model_version = version
    response.headers["x-model-version"] = str(version.version)
    return SearchResponse(hits=hits, model=version.name)


@router.post(
    "/{name}/reindex",
    response_model=CollectionInfo,
    status_code=202,
    dependencies=WRITE,
    openapi_extra=request_schema(ReindexRequest),
)
async def reindex(
    name: str, body: Annotated[ReindexRequest, Depends(json_body(ReindexRequest))], request: Request
) -> CollectionInfo:
    """Start re-embedding the collection with another version of its model; watch GET /v1/collections/{name}."""
    return await _store(request).reindex(name, body.version)
