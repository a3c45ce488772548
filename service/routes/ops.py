"""Operations routes: health, readiness, metrics and the model list."""

from fastapi import APIRouter, Depends, Request, Response

from service.auth import require_client
from service.embedder import Embedder
from service.errors import ApiError
from service.metrics import Metrics
from service.model_store import ModelStore, ModelVersion
from service.protocol import ModelCard, ModelList, Readiness, VersionCard, VersionReadiness

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it says nothing about dependencies)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness)
async def readyz(request: Request) -> Response:
    """Ready only when every verified version is loaded in the backend and every model has one to serve."""
    store: ModelStore = request.app.state.store
    backend = request.app.state.backend
    embedder: Embedder = request.app.state.embedder
    versions: list[VersionReadiness] = []
    problems: list[str] = []
    if request.app.state.draining:
        problems.append("shutting down: draining for EMBEDSERVE_SHUTDOWN_DRAIN_S before the gateway stops")
    for version in store.all():
        loaded = await backend.ready(version)
        versions.append(
            VersionReadiness(
                model=version.model,
                version=version.version,
                state="ready" if loaded else "not_loaded",
                reason=None if loaded else f"not ready in the {backend.name} backend",
            )
        )
        if not loaded:
            problems.append(f"{version.name} is not ready in the {backend.name} backend")
    for refused in store.refused:
        versions.append(
            VersionReadiness(model=refused.model, version=refused.version, state="refused", reason=refused.reason)
        )
    for model in store.models():
        try:
            embedder.default_version(model)
        except ApiError as error:
            problems.append(error.message)
    if not store.models():
        problems.append(f"no model versions under {store.repository}; run `make bootstrap-model`.")
    body = Readiness(ready=not problems, backend=backend.name, versions=versions, problems=problems)
    return Response(body.model_dump_json(), status_code=200 if body.ready else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_client)])
async def list_models(request: Request) -> ModelList:
    """OpenAI's model list; each entry also lists its versions with a manifest summary."""
    store: ModelStore = request.app.state.store
    embedder: Embedder = request.app.state.embedder
    cards = []
    for model in store.models():
        try:
            default = embedder.default_version(model).version
        except ApiError:
            default = None
        versions = [_version_card(v, default) for v in store.versions_of(model)]
        versions += [
            VersionCard(version=r.version, state="refused", is_default=False, reason=r.reason)
            for r in store.refused
            if r.model == model
        ]
        versions.sort(key=lambda card: card.version)
        created = min((int(c.created_at.timestamp()) for c in versions if c.created_at), default=0)
        cards.append(ModelCard(id=model, created=created, versions=versions))
    return ModelList(data=cards)


def _version_card(version: ModelVersion, default: int | None) -> VersionCard:
    manifest = version.manifest
    return VersionCard(
        version=version.version,
        state="ready",
        is_default=version.version == default,
        sha256=manifest.sha256,
        created_at=manifest.created_at,
        source=manifest.source,
        base_model=manifest.base_model,
        parent_version=manifest.parent_version,
        dimension=manifest.embedding_dimension,
        max_seq_length=manifest.max_seq_length,
        precision=manifest.precision,
        evaluation=manifest.evaluation.metrics if manifest.evaluation else None,
    )
