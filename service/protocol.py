"""Wire models of the HTTP API (OpenAI-compatible where OpenAI defines the shape)."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

# JSON may escape half of a UTF-16 surrogate pair ("\ud800"); that is no text, and nothing downstream
# (tokenizers, Redis keys, Milvus, the error message quoting it) could carry it.
LONE_SURROGATE = "lone_surrogate"


class RequestBody(BaseModel):
    """A JSON request body: every string in it, keys included, must be Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        where = _lone_surrogate_at(data, ())
        if where is not None:
            raise PydanticCustomError(
                LONE_SURROGATE,
                "'{where}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text; "
                "send valid Unicode",
                {"where": ".".join(map(str, where)) or "body", "param": str(where[0]) if where else ""},
            )
        return data


def _lone_surrogate_at(document: object, path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """Where in ``document`` (decoded JSON) the first string, key or value, that is not encodable as UTF-8
    is. Walked with a stack, not recursion: nesting as deep as the JSON parser allows must not overflow."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(document, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and not _encodable(value):
                return where
        elif isinstance(value, list):
            stack.extend((element, (*where, index)) for index, element in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, element in reversed(list(value.items())):
                stack.append((element, (*where, key)))
                stack.append((key, where))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# Token-id inputs are accepted by the schema only so they can be refused with a message that says
# what to do instead: the ids of another tokenizer mean nothing to these models.
TokenIds = list[StrictInt]


class EmbeddingRequest(RequestBody):
    # Unknown fields are ignored, as the OpenAI API does, so SDKs that add fields keep working.
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="A string or a list of strings to embed."
    )
    model: StrictStr | None = Field(
        None, description="A model name, or name@version to pin a version; omitted = the default model."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    dimensions: Annotated[StrictInt, Field(gt=0)] | None = Field(
        None, description="Must equal the model's embedding size when given (no truncated embeddings)."
    )
    user: StrictStr | None = Field(None, description="An end-user id; also the sticky routing key.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="The model and version that made the vectors, as name@version.")
    usage: Usage


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
