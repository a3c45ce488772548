"""What embedserve knows about each public collection beyond what Milvus holds in its schemas: the model,
the declared fields, the active physical collection, a re-index in progress (with its cursor), and the
collections waiting to be dropped.

It is kept in Milvus itself, in the small ``_embedserve_catalog`` collection (one JSON record per public
collection, see ``service.vectors.milvus``): it lives beside the data, so it moves and is backed up with it, and
works the same on Milvus Lite and on a Milvus server. Collection properties were the alternative, but
they belong to one physical collection while a record spans several.

Each replica keeps a copy of the records. Before using one it asks ``Coordination`` for the collection's
current version (one Redis read) and re-reads the record from Milvus when its copy is older, so a change that
one replica acknowledged is what the next request on any replica sees. Changes are made holding the collection
exclusively (``Coordination.holding``): saves of one record never interleave, though Milvus has no
compare-and-set.

Each physical collection records the sha256 of the version content whose vectors it holds
(``Manifest.sha256``): a version deleted and exported again under the same number is other content, and a
collection bound to the old one is refused (503) rather than searched or written with mixed vector spaces.
"""

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel
from pymilvus import DataType, MilvusClient

from service.errors import InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from service.models.store import ModelVersion
from service.vectors.coordination import Coordination
from service.vectors.filters import FieldType, quote
from service.vectors.fusion import HybridSettings
from service.vectors.keywords import LEGACY_ANALYZER, KeywordAnalyzer
from service.vectors.milvus import CATALOG, Milvus

log = logging.getLogger(__name__)

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


class ContentChanged(ServiceUnavailable):
    """The served version with a collection's version number is not the content its vectors were made by."""

    code = "version_content_changed"


class Physical(BaseModel):
    """One physical Milvus collection: the vectors of one model version, and the index they were built with."""

    name: str
    version: int
    # The version's content (Manifest.sha256); None in records written before it was kept: see VectorStore._resume.
    sha256: str | None = None
    dimension: int
    index_type: str
    index_params: dict[str, int | float | str]
    # How its text is analysed for BM25, fixed when it was created (records from before it was kept: Milvus's default).
    keyword_analyzer: KeywordAnalyzer = LEGACY_ANALYZER


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
    # Hybrid-search defaults set by the collection's owner; records from before they existed hold none.
    hybrid: HybridSettings = HybridSettings()
    reindex: Reindex | None = None
    retired: list[Retired] = []

    @property
    def reindexing(self) -> bool:
        return self.reindex is not None and self.reindex.state == "running"

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


def physical_name(name: str, version: ModelVersion, active: Physical | None = None) -> str:
    """``<name>__<model>__v<version>``; followed by ``__<sha256 prefix>`` when that is the active collection's name
    (the same version number exported again with other content)."""
    model = re.sub(r"[^A-Za-z0-9_]", "_", version.model)[:64]
    physical = f"{name}__{model}__v{version.version}"
    if active is not None and active.name == physical:
        physical = f"{physical}__{version.manifest.sha256[:12]}"
    return physical


def served_version(encoder: Encoder, record: CollectionRecord, physical: Physical) -> ModelVersion:
    """The served version whose vectors ``physical`` holds; 503 when this gateway does not serve that version, or
    serves other content under its number."""
    try:
        version = encoder.resolve(f"{record.model}@{physical.version}")
    except ModelNotFound as error:
        raise ServiceUnavailable(
            f"collection '{record.name}' holds vectors of {record.model}@{physical.version}, which this gateway does "
            f"not serve ({error.message}); serve that version again or re-index the collection."
        ) from None
    if physical.sha256 is not None and version.manifest.sha256 != physical.sha256:
        raise ContentChanged(
            f"collection '{record.name}' holds vectors made by {version.name} with content sha256 "
            f"{physical.sha256[:12]}…, but the {version.name} this gateway serves is other content (sha256 "
            f"{version.manifest.sha256[:12]}…): the version was exported again under the same number, or replicas "
            "serve different exports of it. Searches and writes are refused rather than mixing vector spaces; "
            f"re-index the collection from a gateway serving the content you want: POST "
            f'/v1/collections/{record.name}/reindex {{"version": {physical.version}}}.'
        )
    return version


async def embed(
    encoder: Encoder, texts: list[str], version: ModelVersion, purpose: Purpose = "client"
) -> list[list[float]]:
    """``texts`` embedded by ``version``; ``purpose="reindex"`` for the gateway's own work, which must
    not count as served traffic in drift scores and rollout text samples."""
    result = await encoder.embed(texts, version, purpose)
    vectors: list[list[float]] = result.vectors.astype(np.float32, copy=False).tolist()
    return vectors


class CatalogTable:
    """The ``_embedserve_catalog`` collection: one row (name, record JSON) per public collection, created on first
    use (by whichever replica comes first)."""

    def __init__(self, milvus: Milvus, coordination: Coordination) -> None:
        self._milvus = milvus
        self._coordination = coordination
        self._ready = False

    async def rows(self) -> list[tuple[str, str]]:
        await self._create()
        rows = await self._milvus.query(CATALOG, 'name != ""', ["name", "record"], limit=16_384)
        return [(str(row["name"]), str(row["record"])) for row in rows]

    async def row(self, name: str) -> str | None:
        await self._create()
        rows = await self._milvus.query(CATALOG, f"name == {quote(name)}", ["record"])
        return str(rows[0]["record"]) if rows else None

    async def save(self, name: str, record: str) -> None:
        await self._milvus.upsert(CATALOG, [{"name": name, "record": record, "unused": [0.0, 0.0]}])
        self._milvus.after_writes(CATALOG)

    async def delete(self, name: str) -> None:
        await self._milvus.delete(CATALOG, [name], key="name")
        self._milvus.after_writes(CATALOG)

    async def _create(self) -> None:
        if self._ready:
            return
        if not await self._milvus.call("has_collection", CATALOG):
            async with self._coordination.holding(CATALOG, exclusive=True):  # replicas starting together
                if not await self._milvus.call("has_collection", CATALOG):
                    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                    schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=128)
                    schema.add_field("record", DataType.VARCHAR, max_length=65_535)
                    # Milvus wants a vector field (and an index on it to load); this one is never searched.
                    schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
                    indexes = MilvusClient.prepare_index_params()
                    indexes.add_index("unused", index_type="FLAT", metric_type="L2")
                    await self._milvus.call(
                        "create_collection", CATALOG, schema=schema, index_params=indexes, consistency_level="Strong"
                    )
        await self._milvus.load(CATALOG)
        self._ready = True


@dataclass(frozen=True)
class _Copy:
    """This replica's copy of a record (None: no such collection) as of catalog ``version``."""

    record: CollectionRecord | None
    version: int


class Catalog:
    """The records: read from Milvus, kept in memory, re-read when their version moved on; changes are written
    through (holding the collection exclusively)."""

    def __init__(self, milvus: Milvus, coordination: Coordination) -> None:
        self._table = CatalogTable(milvus, coordination)
        self._coordination = coordination
        self._copies: dict[str, _Copy] | None = None
        self._loading = asyncio.Lock()
        self._unsignalled: set[str] = set()  # changed in Milvus, but Redis was not told yet

    @property
    def loaded(self) -> bool:
        return self._copies is not None

    async def _load(self) -> dict[str, _Copy]:
        if self._copies is None:
            async with self._loading:
                if self._copies is None:
                    # Versions before records: a change in between leaves a newer record under an older version,
                    # which the next look re-reads; never the other way round.
                    versions = await self._coordination.versions()
                    rows = await self._table.rows()
                    copies = {
                        name: _Copy(CollectionRecord.model_validate_json(raw), _version(versions, name))
                        for name, raw in rows
                    }
                    for name in (versions or {}).keys() - copies.keys():
                        copies[name] = _Copy(None, versions[name] if versions else -1)
                    self._copies = copies
        return self._copies

    async def records(self) -> dict[str, CollectionRecord]:
        """Every collection's current record."""
        copies = await self._load()
        versions = await self._coordination.versions()
        if versions is not None:
            for name in sorted(versions.keys() | copies.keys()):
                copy = copies.get(name)
                if (copy.version if copy is not None else 0) != versions.get(name, 0):
                    await self._reread(name, versions.get(name, 0))
        return {name: copy.record for name, copy in sorted(copies.items()) if copy.record is not None}

    async def find(self, name: str) -> CollectionRecord | None:
        """``name``'s current record (None: no such collection). Without Redis, this replica's copy."""
        return await self.held(name, await self._coordination.version(name))

    async def held(self, name: str, version: int | None) -> CollectionRecord | None:
        """``name``'s record as of catalog ``version`` (a hold's, or the current one; None = unknown: this replica's
        copy)."""
        copies = await self._load()
        copy = copies.get(name)
        if version is None or (copy.version if copy is not None else 0) == version:
            return copy.record if copy is not None else None
        return await self._reread(name, version)

    async def _reread(self, name: str, version: int) -> CollectionRecord | None:
        copies = await self._load()
        before = copies.get(name)
        raw = await self._table.row(name)
        record = None if raw is None else CollectionRecord.model_validate_json(raw)
        if copies.get(name) is before:  # not replaced by a newer copy meanwhile
            copies[name] = _Copy(record, version)
        return record

    async def get(self, name: str, version: int | None = None) -> CollectionRecord:
        """``name``'s current record (or as of a hold's ``version``); 404 when there is no such collection."""
        check_collection_name(name)
        record = await (self.find(name) if version is None else self.held(name, version))
        if record is None:
            raise NotFound(f"collection '{name}' does not exist; create it with PUT /v1/collections/{name}.")
        return record

    async def save(self, record: CollectionRecord) -> None:
        """Write ``record`` (hold its collection exclusively)."""
        try:
            await self._table.save(record.name, record.model_dump_json())
        finally:
            version = await self._signal(record.name)
        (await self._load())[record.name] = _Copy(record, version)

    async def delete(self, name: str) -> None:
        """Delete ``name``'s record (hold its collection exclusively)."""
        try:
            await self._table.delete(name)
        finally:
            version = await self._signal(name)
        (await self._load())[name] = _Copy(None, version)

    async def _signal(self, name: str) -> int:
        """Tell the other replicas ``name`` changed. Should Redis fail right after the change was written, the
        other replicas would keep an older copy: ``signal_pending`` tells them later."""
        try:
            return await self._coordination.changed(name)
        except ServiceUnavailable:
            self._unsignalled.add(name)
            log.error("catalog change not signalled to other replicas yet", extra={"collection": name})
            return -1

    async def signal_pending(self) -> None:
        """Signal the changes whose signal failed (a background loop calls this)."""
        for name in sorted(self._unsignalled):
            await self._coordination.changed(name)
            self._unsignalled.discard(name)
            log.info("catalog change signalled", extra={"collection": name})


def _version(versions: dict[str, int] | None, name: str) -> int:
    """A collection's version in ``versions`` (0: never changed); -1 (re-read at the next look) when unknown."""
    return -1 if versions is None else versions.get(name, 0)
