"""Operations routes: liveness, readiness, the Prometheus metrics, and the admin reload of model versions.

A pod is ready when every version it routes traffic to can serve: each model's default (stable) version,
the canary of an active rollout, and every version a collection is bound to. Serving means loaded in the
backend, with the content this gateway verified, and a batcher worker running. Other versions are listed
with their state but leave the pod ready: an unused old version missing in Triton must not take every
pod out of rotation (requests pinned to it get their 503).
"""

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, Field

from service.backends.contract import Backend
from service.edge.auth import may_see_internals, require
from service.embeddings.batcher import Batcher
from service.embeddings.embedder import Embedder
from service.embeddings.versions import ReloadReport, VersionLoader
from service.errors import ApiError
from service.models.store import ModelStore
from service.rollouts.store import RolloutWatcher
from service.telemetry.metrics import Metrics
from service.vectors.store import VectorStore

router = APIRouter()

Uses = dict[tuple[str, int], list[str]]


class VersionReadiness(BaseModel):
    model: str
    version: int
    state: Literal["ready", "refused", "not_loaded", "content_mismatch", "restarting"]
    reason: str | None = None
    used_by: list[str] = Field(
        default_factory=list,
        description="What routes traffic to it: default, canary, collection <name>. A used version must be ready "
        "for the pod to be.",
    )


class ReadinessStatus(BaseModel):
    """What anyone may know of a pod's readiness (the status code says it too)."""

    ready: bool


class Readiness(ReadinessStatus):
    """The detail, for the admin scope (or anyone when no key is configured): versions, reasons, paths."""

    backend: str
    versions: list[VersionReadiness]
    problems: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="What was not checked, and why; never a problem.")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it says nothing about dependencies)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness | ReadinessStatus)
async def readyz(
    request: Request, authorization: str | None = Header(None, description="Bearer <admin key>")
) -> Response:
    """Ready only when every version this pod routes traffic to serves, and every model has one to serve. The
    detail (versions, problems) only for the admin scope when keys are configured: it names paths and reasons."""
    state = request.app.state
    store: ModelStore = state.store
    backend: Backend = state.backend
    batchers: dict[tuple[str, int], Batcher] = state.batchers
    problems: list[str] = []
    notes: list[str] = []
    if state.draining:
        problems.append("shutting down: draining for EMBEDSERVE_SHUTDOWN_DRAIN_S before the gateway stops")
    uses = await _uses(store, state.embedder, state.rollouts, state.vector_store, problems, notes)
    versions: list[VersionReadiness] = []
    served = store.all()
    for version, availability in zip(served, await asyncio.gather(*map(backend.availability, served)), strict=True):
        key = (version.model, version.version)
        batcher = batchers.get(key)
        readiness = VersionReadiness(
            model=version.model,
            version=version.version,
            state=availability.state,
            reason=availability.reason,
            used_by=uses.get(key, []),
        )
        if availability.ready and batcher is not None and not batcher.running:
            readiness.state, readiness.reason = "restarting", batcher.last_death
        if readiness.state != "ready" and readiness.used_by:
            problems.append(f"{version.name}, used by {', '.join(readiness.used_by)}, cannot serve: {readiness.reason}")
        versions.append(readiness)
    for refused in store.refused:
        versions.append(
            VersionReadiness(
                model=refused.model,
                version=refused.version,
                state="refused",
                reason=refused.reason,
                used_by=uses.get((refused.model, refused.version), []),
            )
        )
    if not store.models():
        problems.append(f"no model versions under {store.repository}; run `make bootstrap-model`.")
    body: ReadinessStatus = Readiness(
        ready=not problems, backend=backend.name, versions=versions, problems=problems, notes=notes
    )
    if not may_see_internals(state.settings, authorization):
        body = ReadinessStatus(ready=body.ready)
    return Response(body.model_dump_json(), status_code=200 if body.ready else 503, media_type="application/json")


async def _uses(
    store: ModelStore,
    embedder: Embedder,
    rollouts: RolloutWatcher,
    vector_store: VectorStore,
    problems: list[str],
    notes: list[str],
) -> Uses:
    """What routes traffic to each version; a use this gateway cannot serve at all goes to ``problems``."""
    uses: Uses = {}
    for model in store.models():
        try:
            default = embedder.default_version(model)
        except ApiError as error:
            problems.append(error.message)
            continue
        uses.setdefault((model, default.version), []).append("default")
    for rollout in rollouts.all():
        canary = rollout.canary_version
        # A canary this replica has not verified gets no traffic here: the watcher routes it all to stable.
        if rollout.active and canary is not None and store.get(rollout.model, canary) is not None:
            uses.setdefault((rollout.model, canary), []).append("canary")
    bound = await vector_store.bound_versions()
    if bound is None:
        notes.append("versions bound to collections are not checked until the vector store has read its catalog")
        return uses
    for (model, version), collections in bound.items():
        uses.setdefault((model, version), []).extend(f"collection {name}" for name in collections)
        if store.get(model, version) is None:
            refusal = store.refusal(model, version)
            why = refusal.reason if refusal else "it is not in the model repository"
            problems.append(
                f"{model}@{version}, used by collection {', '.join(collections)}, cannot be served: {why}; serve it "
                "again or re-index the collection."
            )
    return uses


@router.post(
    "/v1/admin/models/reload", response_model=ReloadReport, dependencies=[Depends(require("admin"))], tags=["admin"]
)
async def reload_models(request: Request) -> ReloadReport:
    """Scan the model repository now: load and serve new versions, stop serving gone or changed ones (the same
    as the periodic rescan, EMBEDSERVE_MODEL_RESCAN_S). This replica only: the others follow at their next
    rescan, or call it on each."""
    versions: VersionLoader = request.app.state.versions
    return await versions.reload()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
