"""POST /v1/embeddings — OpenAI-compatible."""

import base64
import time
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service.edge.auth import authorize, caller_identity
from service.edge.json_body import openapi_parameter, read_json_body, request_schema
from service.embeddings.embedder import Embedder
from service.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from service.embeddings.serving import CLIENT_CLOSED_REQUEST, serve, timing_headers
from service.errors import InvalidRequest
from service.settings import Settings

router = APIRouter()


# The route reads these itself (see create_embeddings); declared here for the OpenAPI document.
_HEADERS = [
    openapi_parameter("authorization", "header", "Bearer <API key>"),
    openapi_parameter("x-model-version", "header", "Pin a version (e.g. 2) when model has none."),
    openapi_parameter(
        "x-routing-key", "header", "Sticky key of a canary rollout; default: 'user', else the API key; none: stable."
    ),
]


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    openapi_extra={**request_schema(EmbeddingRequest), "parameters": _HEADERS},
)
async def create_embeddings(request: Request) -> Response:
    """The gateway's hot route reads its request itself (API key, body, headers), where the other routes take
    them as FastAPI dependencies and parameters: solving those for every request took ~15 % of the event loop's
    time at concurrency 32, time the inference threads lost on a small machine."""
    settings: Settings = request.app.state.settings
    headers = request.headers
    authorize(settings, "embed", headers.get("authorization"))
    body = await read_json_body(request, EmbeddingRequest)
    started = time.perf_counter()
    embedder: Embedder = request.app.state.embedder
    # The caller's identity: a canary's share is one of callers, and a caller never sees two versions.
    identity = headers.get("x-routing-key") or body.user or caller_identity(headers.get("authorization"))
    version, pinned = embedder.route(body.model, headers.get("x-model-version"), identity)
    request.state.model_version = version
    texts = embedder.check_inputs(body.input)
    if body.dimensions is not None and body.dimensions != version.dimension:
        raise InvalidRequest(
            f"'dimensions' is {body.dimensions} but {version.name} makes {version.dimension}-dimensional "
            f"vectors; omit it or send {version.dimension}.",
            param="dimensions",
        )
    result = await serve(request, texts, version, pinned)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST, headers={"x-model-version": str(version.version)})
    return Response(
        content=response_json(result.vectors, body.encoding_format, version.name, result.prompt_tokens),
        media_type="application/json",
        headers={"x-model-version": str(version.version), **timing_headers(result, texts, started)},
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
