"""GET /v1/models — OpenAI's model list; each model also lists its versions with a manifest summary."""

from typing import Protocol

from fastapi import APIRouter, Request

from service.errors import ApiError
from service.models.protocol import ModelCard, ModelList, VersionCard
from service.models.store import ModelStore, ModelVersion

router = APIRouter()


class DefaultVersions(Protocol):
    """Which version serves a model when a request pins none (``service.embeddings.embedder.Embedder`` knows)."""

    def default_version(self, model: str) -> ModelVersion: ...


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """OpenAI's model list; each entry also lists its versions with a manifest summary."""
    store: ModelStore = request.app.state.store
    embedder: DefaultVersions = request.app.state.embedder
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
