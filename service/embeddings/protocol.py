"""Wire models of POST /v1/embeddings (OpenAI's shapes)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from service.edge.protocol import RequestBody
from service.errors import TooManyInputs
from service.settings import Settings

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

    @classmethod
    def check_size(cls, fields: dict[str, Any], settings: Settings) -> None:
        check_input_count(fields, "input", settings)


def check_input_count(fields: dict[str, Any], param: str, settings: Settings) -> None:
    """Refuse a request body whose list of inputs (``fields[param]``) is longer than a request may carry, before
    anything walks it."""
    inputs = fields.get(param)
    if isinstance(inputs, list) and len(inputs) > settings.max_inputs_per_request:
        raise TooManyInputs(
            f"'{param}' has {len(inputs)} items, over the limit of {settings.max_inputs_per_request}; "
            "split it into several requests.",
            param=param,
        )


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
