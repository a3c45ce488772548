"""POST /v1/embeddings — OpenAI-compatible."""

import asyncio
import base64
import time
from collections.abc import Coroutine
from typing import Annotated, Any, Literal, Protocol, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, Request, Response

from service.edge.auth import caller_identity
from service.edge.json_body import json_body, request_schema
from service.embeddings.embedder import Embedder, EmbedResult
from service.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from service.errors import ApiError, InvalidRequest
from service.models.store import ModelVersion

router = APIRouter()


class ServedRecorder(Protocol):
    """Where each request's latency and outcome go (the rollout analysis's ``service.rollouts.window``)."""

    def record(self, model: str, version: int, seconds: float, failed: bool, computed: bool = True) -> None: ...


class Mirror(Protocol):
    """What sees each served request afterwards (shadow traffic: ``service.rollouts.shadow``)."""

    def after_served(self, texts: list[str], served: ModelVersion, pinned: bool) -> None: ...


T = TypeVar("T")
# nginx's code for "client closed request": nobody reads it, but the access log and metrics do.
CLIENT_CLOSED_REQUEST = 499


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work``; None, with ``work`` cancelled (its queued inputs dropped before inference), if the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _recorded(request: Request, work: Coroutine[Any, Any, EmbedResult], version: ModelVersion) -> EmbedResult:
    """``work``, its latency and outcome recorded in the canary window (what the rollout analysis judges)."""
    window: ServedRecorder = request.app.state.canary_window
    started = time.perf_counter()
    try:
        result = await work
    except ApiError as error:
        window.record(version.model, version.version, time.perf_counter() - started, error.status_code >= 500)
        raise
    except Exception:
        window.record(version.model, version.version, time.perf_counter() - started, failed=True)
        raise
    elapsed = time.perf_counter() - started
    window.record(version.model, version.version, elapsed, failed=False, computed=result.computed > 0)
    return result


@router.post("/v1/embeddings", response_model=EmbeddingResponse, openapi_extra=request_schema(EmbeddingRequest))
async def create_embeddings(
    request: Request,
    body: Annotated[EmbeddingRequest, Depends(json_body(EmbeddingRequest))],
    x_model_version: str | None = Header(None, description="Pin a version (e.g. 2) when model has none."),
    x_routing_key: str | None = Header(
        None, description="Sticky key of a canary rollout; default: 'user', else the API key; none: stable."
    ),
) -> Response:
    embedder: Embedder = request.app.state.embedder
    # The caller's identity: a canary's share is one of callers, and a caller never sees two versions.
    identity = x_routing_key or body.user or caller_identity(request.headers.get("authorization"))
    version, pinned = embedder.route(body.model, x_model_version, identity)
    request.state.model_version = version
    texts = embedder.check_inputs(body.input)
    if body.dimensions is not None and body.dimensions != version.dimension:
        raise InvalidRequest(
            f"'dimensions' is {body.dimensions} but {version.name} makes {version.dimension}-dimensional "
            f"vectors; omit it or send {version.dimension}.",
            param="dimensions",
        )
    result = await _unless_client_leaves(request, _recorded(request, embedder.embed(texts, version), version))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST, headers={"x-model-version": str(version.version)})
    shadow: Mirror = request.app.state.shadow
    shadow.after_served(texts, version, pinned)
    request.state.log_fields = {"inputs": len(texts), "tokens": result.prompt_tokens}
    return Response(
        content=response_json(result.vectors, body.encoding_format, version.name, result.prompt_tokens),
        media_type="application/json",
        headers={"x-model-version": str(version.version)},
    )


def response_json(vectors: np.ndarray, encoding_format: Literal["float", "base64"], model: str, tokens: int) -> bytes:
    """The ``EmbeddingResponse`` body, written straight from the float32 vectors: floats in their shortest
    repr that reads back as the same float32 (orjson's numpy support), base64 of little-endian float32."""
    if encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        embeddings: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        embeddings = list(vectors.astype(np.float32, copy=False))
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
