"""The routes of Hugging Face text-embeddings-inference (TEI): POST /embed (and POST /, where TEI's clients
send it), POST /tokenize, GET /info, GET /health — on the same embedder, versions, cache, canary routing and
metrics as /v1/embeddings.

A model is chosen by the ``model`` query parameter (a name, or name@version) or is the default model; a
version is pinned by ``x-model-version``. Errors are answered in TEI's body, ``{"error", "error_type"}``,
with TEI's status codes (``TeiRoute``); the OpenAI routes keep OpenAI's.
"""

import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from service.backends.contract import Backend
from service.edge.auth import authorize, caller_identity, require
from service.edge.json_body import invalid_request, json_body, openapi_parameter, read_json_body, request_schema
from service.embeddings.batcher import Batcher
from service.embeddings.embedder import Embedder, Truncation
from service.embeddings.serving import CLIENT_CLOSED_REQUEST, serve, timing_headers
from service.embeddings.tei_protocol import (
    EmbeddingModel,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    ErrorType,
    Info,
    ModelType,
    SimpleToken,
    TokenizeRequest,
    TokenizeResponse,
)
from service.errors import (
    ApiError,
    EmptyInput,
    Forbidden,
    InferenceFailed,
    InvalidRequest,
    Overloaded,
    ServiceUnavailable,
    TooManyInputs,
    Unauthorized,
)
from service.models.store import ModelVersion
from service.settings import Settings


class TeiRoute(APIRoute):
    """A TEI route: whatever fails in it (authentication and body reading included) is answered in TEI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as error:
                return tei_error(request, invalid_request(error))
            except HTTPException as error:  # a body over EMBEDSERVE_MAX_REQUEST_BYTES (413)
                return _response(error.status_code, str(error.detail), "Validation", dict(error.headers or {}))
            except ApiError as error:
                return tei_error(request, error)

        return answer


def tei_error(request: Request, error: ApiError) -> Response:
    """``error`` in TEI's body, with TEI's status for its kind (statuses TEI has no kind for keep their own)."""
    status, error_type = _tei_status(error)
    headers = dict(error.headers)
    chosen: ModelVersion | None = getattr(request.state, "model_version", None)
    if chosen is not None:  # failed after a version was chosen: say which one, as on success
        headers.setdefault("x-model-version", str(chosen.version))
    return _response(status, error.message, error_type, headers)


def _tei_status(error: ApiError) -> tuple[int, ErrorType]:
    if isinstance(error, EmptyInput):
        return 400, "Empty"
    if isinstance(error, TooManyInputs):
        return 413, "Validation"
    if isinstance(error, Overloaded):
        return 429, "Overloaded"
    if isinstance(error, InferenceFailed):
        return 424, "Backend"
    if isinstance(error, ServiceUnavailable):
        return 503, "Unhealthy"
    if isinstance(error, Unauthorized | Forbidden):
        return error.status_code, "Validation"
    if error.status_code < 500:  # a model or version that does not exist, a bad field, an input too long
        return 422, "Validation"
    return error.status_code, "Backend"  # 504: past the request deadline


def _response(status: int, message: str, error_type: ErrorType, headers: dict[str, str]) -> Response:
    body = ErrorBody(error=message, error_type=error_type)
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def _error_examples(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


router = APIRouter(route_class=TeiRoute, tags=["TEI"])
EMBED_SCOPE = [Depends(require("embed"))]
# What the model query and the version and routing-key headers mean: declared as parameters of the routes that
# take them from FastAPI, and in /embed's OpenAPI document (it reads them itself).
_MODEL = "A model name, or name@version to pin one; omitted = the default model."
_VERSION = "Pin a version (e.g. 2) when model has none."
_ROUTING_KEY = "Sticky key of a canary rollout; default: the API key; none: stable."
ModelQuery = Annotated[str | None, Query(description=_MODEL)]
VersionHeader = Annotated[str | None, Header(description=_VERSION)]
RoutingKeyHeader = Annotated[str | None, Header(description=_ROUTING_KEY)]


async def routed(
    request: Request,
    model: ModelQuery = None,
    x_model_version: VersionHeader = None,
    x_routing_key: RoutingKeyHeader = None,
) -> tuple[ModelVersion, bool]:
    """The version a request goes to, as for /v1/embeddings (a pin wins; else the caller's canary routing), and
    whether it pinned one; kept for the access log and the error answer."""
    return route(request, model, x_model_version, x_routing_key)


def route(
    request: Request, model: str | None, x_model_version: str | None, x_routing_key: str | None
) -> tuple[ModelVersion, bool]:
    """``routed`` for a route that reads its query and headers itself."""
    embedder: Embedder = request.app.state.embedder
    identity = x_routing_key or caller_identity(request.headers.get("authorization"))
    version, pinned = embedder.route(model, x_model_version, identity)
    request.state.model_version = version
    return version, pinned


Routed = Annotated[tuple[ModelVersion, bool], Depends(routed)]
# /embed reads these itself (see embed); declared here for the OpenAPI document.
_EMBED_PARAMETERS = [
    openapi_parameter("model", "query", _MODEL),
    openapi_parameter("authorization", "header", "Bearer <API key>"),
    openapi_parameter("x-model-version", "header", _VERSION),
    openapi_parameter("x-routing-key", "header", _ROUTING_KEY),
]


async def embed(request: Request) -> Response:
    """Vectors of ``inputs``, a bare JSON array of arrays, with TEI's timing headers and ``x-model-version``.

    A hot route for TEI's clients: it reads its API key, query, headers and body itself, as /v1/embeddings
    does, rather than as FastAPI dependencies and parameters (their solving took ~15 % of the event loop)."""
    headers = request.headers
    authorize(request.app.state.settings, "embed", headers.get("authorization"))
    body = await read_json_body(request, EmbedRequest)
    started = time.perf_counter()
    embedder: Embedder = request.app.state.embedder
    model = request.query_params.get("model")
    version, pinned = route(request, model, headers.get("x-model-version"), headers.get("x-routing-key"))
    texts = embedder.check_inputs(body.inputs, "inputs")
    _check_options(body, version)
    result = await serve(request, texts, version, pinned, _truncation(body, request.app.state.settings))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST, headers={"x-model-version": str(version.version)})
    return Response(
        content=orjson.dumps(result.vectors, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers={"x-model-version": str(version.version), **timing_headers(result, texts, started)},
    )


router.add_api_route(
    "/embed",
    embed,
    methods=["POST"],
    response_model=EmbedResponse,
    responses=_error_examples(400, 401, 403, 413, 422, 424, 429, 503),
    openapi_extra={**request_schema(EmbedRequest), "parameters": _EMBED_PARAMETERS},
)
# TEI serves /embed at / too: huggingface_hub's InferenceClient(model=URL) posts to the URL itself.
router.add_api_route("/", embed, methods=["POST"], include_in_schema=False)


def _check_options(body: EmbedRequest, version: ModelVersion) -> None:
    """What TEI offers that these models cannot do: a 422 saying so, rather than an answer that ignores it."""
    if not body.normalize:
        raise InvalidRequest(
            f"'normalize' false is not available: {version.name} normalises inside its exported graph, so its "
            "vectors are always unit length; send true or omit it.",
            param="normalize",
        )
    if body.dimensions is not None and body.dimensions != version.dimension:
        raise InvalidRequest(
            f"'dimensions' is {body.dimensions} but {version.name} makes {version.dimension}-dimensional vectors; "
            f"omit it or send {version.dimension}.",
            param="dimensions",
        )
    _refuse_prompt_name(body.prompt_name, version)


def _refuse_prompt_name(prompt_name: str | None, version: ModelVersion) -> None:
    if prompt_name is not None:
        raise InvalidRequest(
            f"'prompt_name' is not available: {version.name} has no prompts; prepend the prompt to the text.",
            param="prompt_name",
        )


def _truncation(body: EmbedRequest, settings: Settings) -> Truncation:
    truncate = settings.truncate if body.truncate is None else body.truncate
    if not truncate:
        return "none"
    return "left" if body.truncation_direction.lower() == "left" else "right"


@router.post(
    "/tokenize",
    dependencies=EMBED_SCOPE,
    response_model=TokenizeResponse,
    responses=_error_examples(400, 413, 422),
    openapi_extra=request_schema(TokenizeRequest),
)
async def tokenize(
    request: Request,
    response: Response,
    body: Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest))],
    target: Routed,
) -> TokenizeResponse:
    """Each input's tokens by the tokenizer of the version /embed would use for this caller, never truncated."""
    embedder: Embedder = request.app.state.embedder
    version, _ = target
    texts = embedder.check_inputs(body.inputs, "inputs")
    _refuse_prompt_name(body.prompt_name, version)
    tokens = await embedder.tokens(texts, version, body.add_special_tokens)
    request.state.log_fields = {"inputs": len(texts)}
    response.headers["x-model-version"] = str(version.version)
    return TokenizeResponse([[SimpleToken.model_validate(t, from_attributes=True) for t in row] for row in tokens])


@router.get("/info", dependencies=EMBED_SCOPE, response_model=Info, responses=_error_examples(422))
async def info(
    request: Request, response: Response, model: ModelQuery = None, x_model_version: VersionHeader = None
) -> Info:
    """The model version a request without a pin gets (its stable version), or the one pinned, and the limits."""
    embedder: Embedder = request.app.state.embedder
    settings: Settings = request.app.state.settings
    version = embedder.resolve(model, x_model_version)
    response.headers["x-model-version"] = str(version.version)
    manifest = version.manifest
    triton = settings.backend == "triton"
    return Info(
        model_id=version.model,
        model_sha=manifest.sha256,
        model_version=version.version,
        model_dtype="float32" if manifest.precision == "fp32" else manifest.precision,
        served_model_name=version.name,
        model_type=ModelType(embedding=EmbeddingModel(pooling=manifest.pooling)),
        max_concurrent_requests=settings.max_queue_inputs,
        max_input_length=version.tokenizer.max_seq_length,
        max_batch_tokens=settings.triton_max_batch_tokens if triton else settings.max_batch_tokens,
        max_batch_requests=settings.max_batch_size,
        max_client_batch_size=settings.max_inputs_per_request,
        auto_truncate=settings.truncate,
        tokenization_workers=1,  # on the event loop; inputs past a few thousand characters on a worker thread
        version=request.app.version,
    )


@router.get("/health", responses=_error_examples(422, 503))
async def health(request: Request, model: ModelQuery = None) -> Response:
    """200 while the default version of the model (default: the default model) takes inference requests; 503
    otherwise. Open to anyone, as a probe."""
    embedder: Embedder = request.app.state.embedder
    version = embedder.resolve(model)
    backend: Backend = request.app.state.backend
    batchers: dict[tuple[str, int], Batcher] = request.app.state.batchers
    batcher = batchers.get((version.model, version.version))  # None: unloaded since (hot-loading)
    if batcher is None or not batcher.running or not (await backend.availability(version)).ready:
        raise ServiceUnavailable(f"{version.name} cannot serve now; see /readyz.")
    return Response(status_code=200)
