"""Wire models of GET /v1/models: OpenAI's model list, each model with its versions' manifest summaries."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class VersionCard(BaseModel):
    version: int
    state: Literal["ready", "refused", "not_loaded"]
    is_default: bool = Field(description="Served when a request names the model without a version.")
    reason: str | None = Field(None, description="Why the version is not served.")
    sha256: str | None = None
    created_at: datetime | None = None
    source: str | None = None
    base_model: str | None = None
    parent_version: int | None = None
    dimension: int | None = None
    max_seq_length: int | None = None
    precision: str | None = None
    evaluation: dict[str, float] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedserve"
    versions: list[VersionCard]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
