"""Wire models of the collection routes (/v1/collections/...)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from service.edge.protocol import RequestBody
from service.errors import InvalidRequest
from service.settings import Settings
from service.vectors.filters import FieldType
from service.vectors.fusion import MAX_CANDIDATES, Fusion, HybridSettings, ResolvedHybrid
from service.vectors.keywords import KeywordAnalyzer

MAX_ITEMS_PER_REQUEST = 1000
MAX_TOP_K = 1000

MetadataValue = StrictStr | StrictBool | StrictInt | StrictFloat | list[StrictStr] | None


class CreateCollection(RequestBody):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(
        description="The model whose vectors the collection holds: a name (its default version) or name@version."
    )
    fields: dict[StrictStr, FieldType] = Field(
        default_factory=dict,
        description="Declared metadata fields and their types (string, int, float, bool, string_list); only "
        "these may be stored and filtered on.",
    )
    hybrid: HybridSettings | None = Field(
        None,
        description="Hybrid-search defaults of the collection (fusion, candidates); left out: the gateway's. Change "
        "them later with PATCH /v1/collections/{name}.",
    )


class UpdateCollection(RequestBody):
    model_config = ConfigDict(extra="forbid")

    hybrid: HybridSettings = Field(
        description="New hybrid-search defaults: the fields given replace the collection's (null: back to the "
        "gateway's default), the others stay."
    )


class IndexInfo(BaseModel):
    type: str
    metric: str
    params: dict[str, Any]


class ReindexInfo(BaseModel):
    version: int = Field(description="The version being built.")
    state: Literal["running", "failed"]
    copied: int = Field(description="Items re-embedded into the new version so far.")
    total: int = Field(description="Items in the collection when the re-index started.")
    progress: float = Field(description="copied / total, between 0 and 1.")
    started_at: float
    error: str | None = None


class CollectionInfo(BaseModel):
    name: str
    model: str
    version: int = Field(description="The model version whose vectors the collection serves.")
    dimension: int
    fields: dict[str, FieldType]
    items: int | None = Field(description="Items stored (null when it could not be counted).")
    index: IndexInfo
    keyword_analyzer: KeywordAnalyzer = Field(
        description="How the stored text is split into terms for keyword (BM25) search: english_stop or standard."
    )
    hybrid: ResolvedHybrid = Field(
        description="The hybrid-search defaults that apply: the collection's, else the gateway's."
    )
    state: Literal["ready", "reindexing", "reindex_failed"]
    reindex: ReindexInfo | None = None
    created_at: float


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(description="The item's id; upserting an existing id replaces the item.")
    text: StrictStr = Field(description="The text that is embedded, stored, and searched by keyword.")
    metadata: dict[StrictStr, MetadataValue] = Field(
        default_factory=dict, description="Values of declared fields; null or absent = the item lacks the field."
    )


class UpsertItems(RequestBody):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]

    @classmethod
    def check_size(cls, fields: dict[str, Any], settings: Settings) -> None:
        items = fields.get("items")
        if isinstance(items, list) and len(items) > MAX_ITEMS_PER_REQUEST:
            raise InvalidRequest(
                f"'items' has {len(items)} items, over the limit of {MAX_ITEMS_PER_REQUEST}; split it into "
                "several requests.",
                param="items",
            )


class UpsertResult(BaseModel):
    upserted: int
    model: str = Field(description="The model version that embedded the items, as name@version.")


class Item(BaseModel):
    id: str
    text: str
    metadata: dict[str, Any]


class Deleted(BaseModel):
    id: str
    deleted: bool = True


class SearchRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr | None = Field(None, description="Text to search for (embedded by the collection's version).")
    vector: list[StrictFloat | StrictInt] | None = Field(
        None, description="A query vector of the collection's dimension (dense and hybrid modes)."
    )
    top_k: Annotated[StrictInt, Field(ge=1, le=MAX_TOP_K)] = 10
    filter: dict[str, Any] | None = Field(None, description='A structured filter, e.g. {"field": "price", "lt": 100}.')
    output_fields: list[StrictStr] | None = Field(
        None, description="Any of text, metadata and declared field names; default: text and metadata."
    )
    mode: Literal["dense", "keyword", "hybrid"] = Field(
        "dense",
        description="dense: vector similarity; keyword: BM25 on the stored text; hybrid: both legs, fused (fusion).",
    )
    fusion: Fusion | None = Field(
        None,
        description='Hybrid only: how the legs are fused, {"method": "rrf", "k": 60} or {"method": "weighted", '
        '"alpha": 0.5, "normalization": "minmax"|"zscore"}; default: the collection\'s.',
    )
    candidates: Annotated[StrictInt, Field(ge=1, le=MAX_CANDIDATES)] | None = Field(
        None,
        description="Hybrid only: hits each leg retrieves before fusion (at least top_k); default: the collection's.",
    )


class Hit(BaseModel):
    id: str
    score: float = Field(description="Higher is more similar (cosine, BM25 or the fused score, by mode).")
    text: str | None = None
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]
    model: str = Field(description="The model version of the collection that answered, as name@version.")


class ReindexRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[StrictInt, Field(ge=1)] = Field(description="The version of the collection's model to move to.")
