"""What embedserve knows about each public collection beyond what Milvus holds in its schemas: the model,
the declared fields, the active physical collection, a re-index in progress (with its cursor), and the
collections waiting to be dropped.

It is kept in Milvus itself, in the small ``_embedserve_catalog`` collection (one JSON record per public
collection, see ``service.vectors.milvus``): it lives beside the data, so it moves and is backed up with it, and
works the same on Milvus Lite and on a Milvus server. Collection properties were the alternative, but
they belong to one physical collection while a record spans several.
"""

import asyncio
import re
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel

from service.errors import InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from service.models.store import ModelVersion
from service.vectors.filters import FieldType
from service.vectors.milvus import Milvus

COLLECTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


# Items a client upserts or searches, or the gateway's own re-indexing (counted apart, kept out of drift).
Purpose = Literal["client", "reindex"]


class Embedded(Protocol):
    @property
    def vectors(self) -> np.ndarray: ...


class Encoder(Protocol):
    """What the vector store needs from the embedding path (``service.embeddings.embedder.Embedder`` is one)."""

    def resolve(self, requested: str | None, header_version: str | None = None) -> ModelVersion: ...

    async def embed(self, texts: list[str], version: ModelVersion, purpose: Purpose = "client") -> Embedded: ...


class Physical(BaseModel):
    """One physical Milvus collection: the vectors of one model version, and the index they were built with."""

    name: str
    version: int
    dimension: int
    index_type: str
    index_params: dict[str, int | float | str]


class Reindex(BaseModel):
    target: Physical
    state: Literal["running", "failed"] = "running"
    copied: int = 0
    total: int = 0
    cursor: str | None = None  # the last id copied, in id order
    started_at: float
    error: str | None = None

    @property
    def progress(self) -> float:
        return min(1.0, self.copied / self.total) if self.total else 0.0


class Retired(BaseModel):
    name: str
    drop_after: float


class CollectionRecord(BaseModel):
    """A public collection as the catalog holds it."""

    name: str
    model: str
    fields: dict[str, FieldType]
    active: Physical
    created_at: float
    reindex: Reindex | None = None
    retired: list[Retired] = []

    def write_targets(self) -> list[Physical]:
        """Where upserts and deletes go: the active collection, and the new one while a re-index runs."""
        if self.reindex is not None and self.reindex.state == "running":
            return [self.active, self.reindex.target]
        return [self.active]


def check_collection_name(name: str) -> None:
    # "__" separates the parts of physical names.
    if not COLLECTION_NAME.fullmatch(name) or "__" in name:
        raise InvalidRequest(
            f"collection name {name[:80]!r} is invalid: use 1-63 lowercase letters, digits and single underscores, "
            "starting with a letter.",
            param="name",
        )


def physical_name(name: str, version: ModelVersion) -> str:
    model = re.sub(r"[^A-Za-z0-9_]", "_", version.model)[:64]
    return f"{name}__{model}__v{version.version}"


def served_version(encoder: Encoder, record: CollectionRecord, version: int) -> ModelVersion:
    """``version`` of the record's model, or 503 when this gateway does not serve it."""
    try:
        return encoder.resolve(f"{record.model}@{version}")
    except ModelNotFound as error:
        raise ServiceUnavailable(
            f"collection '{record.name}' holds vectors of {record.model}@{version}, which this gateway does not "
            f"serve ({error.message}); serve that version again or re-index the collection."
        ) from None


async def embed(
    encoder: Encoder, texts: list[str], version: ModelVersion, purpose: Purpose = "client"
) -> list[list[float]]:
    """``texts`` embedded by ``version``; ``purpose="reindex"`` for the gateway's own work, which must
    not count as served traffic in drift scores and rollout text samples."""
    result = await encoder.embed(texts, version, purpose)
    vectors: list[list[float]] = result.vectors.astype(np.float32, copy=False).tolist()
    return vectors


class Catalog:
    """The records, read from Milvus once and kept in memory; every change is written through."""

    def __init__(self, milvus: Milvus) -> None:
        self._milvus = milvus
        self._records: dict[str, CollectionRecord] | None = None
        self._loading = asyncio.Lock()

    async def records(self) -> dict[str, CollectionRecord]:
        if self._records is None:
            async with self._loading:
                if self._records is None:
                    rows = await self._milvus.catalog_rows()
                    self._records = {name: CollectionRecord.model_validate_json(raw) for name, raw in rows}
        return self._records

    async def find(self, name: str) -> CollectionRecord | None:
        return (await self.records()).get(name)

    async def get(self, name: str) -> CollectionRecord:
        check_collection_name(name)
        record = await self.find(name)
        if record is None:
            raise NotFound(f"collection '{name}' does not exist; create it with PUT /v1/collections/{name}.")
        return record

    async def save(self, record: CollectionRecord) -> None:
        await self._milvus.save_catalog_row(record.name, record.model_dump_json())
        (await self.records())[record.name] = record

    async def delete(self, name: str) -> None:
        await self._milvus.delete_catalog_row(name)
        (await self.records()).pop(name, None)
