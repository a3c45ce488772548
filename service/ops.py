"""Operations routes: liveness, readiness and the Prometheus metrics."""

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from service.embeddings.embedder import Embedder
from service.errors import ApiError
from service.models.store import ModelStore
from service.telemetry.metrics import Metrics

router = APIRouter()


class VersionReadiness(BaseModel):
    model: str
    version: int
    state: Literal["ready", "refused", "not_loaded"]
    reason: str | None = None


class Readiness(BaseModel):
    ready: bool
    backend: str
    versions: list[VersionReadiness]
    problems: list[str] = Field(default_factory=list)


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
