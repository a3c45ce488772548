"""Wire models of the TEI-compatible routes: the shapes of Hugging Face text-embeddings-inference (TEI)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictInt, StrictStr

from service.edge.protocol import RequestBody
from service.embeddings.protocol import TokenIds, check_input_count
from service.settings import Settings

# TEI's error kinds, as its error bodies spell them; each goes with one status code (service.embeddings.tei).
ErrorType = Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


class EmbedRequest(RequestBody):
    # Unknown fields are ignored, as TEI's clients add some (huggingface_hub: encoding_format).
    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="A string or a list of strings to embed (token ids are refused: send text)."
    )
    normalize: StrictBool = Field(
        True, description="Unit-length vectors. Always true here: the exported graphs normalise; false is a 422."
    )
    truncate: StrictBool | None = Field(
        None,
        description="Cut inputs over the model's token limit instead of refusing them (422); omitted = the "
        "gateway's EMBEDSERVE_TRUNCATE (TEI's --auto-truncate).",
    )
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right", description="Which end of a truncated input is cut off."
    )
    prompt_name: StrictStr | None = Field(None, description="Not supported (these models have no prompts): a 422.")
    dimensions: Annotated[StrictInt, Field(gt=0)] | None = Field(
        None, description="Must equal the model's embedding size when given (no truncated embeddings)."
    )

    @classmethod
    def check_size(cls, fields: dict[str, Any], settings: Settings) -> None:
        check_input_count(fields, "inputs", settings)


class TokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr | list[StrictStr] = Field(description="A string or a list of strings to tokenize.")
    add_special_tokens: StrictBool = Field(True, description="Include the model's special tokens ([CLS], [SEP]).")
    prompt_name: StrictStr | None = Field(None, description="Not supported (these models have no prompts): a 422.")

    @classmethod
    def check_size(cls, fields: dict[str, Any], settings: Settings) -> None:
        check_input_count(fields, "inputs", settings)


class EmbedResponse(RootModel[list[list[float]]]):
    """One vector per input, in input order."""


class SimpleToken(BaseModel):
    id: int
    text: str = Field(description="The piece of the input the token stands for; a special token's own text.")
    special: bool
    start: int | None = Field(description="UTF-8 byte offset of the piece in the input; null for special tokens.")
    stop: int | None = Field(description="UTF-8 byte offset just past the piece; null for special tokens.")


class TokenizeResponse(RootModel[list[list[SimpleToken]]]):
    """Each input's tokens, in input order."""


class EmbeddingModel(BaseModel):
    pooling: str


class ModelType(BaseModel):
    embedding: EmbeddingModel


class Info(BaseModel):
    """TEI's /info, for the model version a request without a pin gets (or the one pinned)."""

    model_id: str = Field(description="The model's name.")
    model_sha: str | None = Field(description="sha256 of the version's manifest.")
    model_version: int = Field(description="The version described (not in TEI): what x-model-version pins.")
    model_dtype: str
    served_model_name: str = Field(description="What /v1/embeddings calls it: name@version.")
    model_type: ModelType
    max_concurrent_requests: int = Field(description="Inputs that may wait per version (EMBEDSERVE_MAX_QUEUE_INPUTS).")
    max_input_length: int = Field(description="Tokens per input, special tokens included.")
    max_batch_tokens: int = Field(description="Padded tokens per inference batch.")
    max_batch_requests: int | None = Field(description="Inputs per inference batch (EMBEDSERVE_MAX_BATCH_SIZE).")
    max_client_batch_size: int = Field(description="Inputs per request (EMBEDSERVE_MAX_INPUTS_PER_REQUEST).")
    auto_truncate: bool = Field(description="Whether a request that omits 'truncate' truncates (EMBEDSERVE_TRUNCATE).")
    tokenization_workers: int
    version: str = Field(description="The gateway's version.")
    sha: str | None = None
    docker_label: str | None = None


class ErrorBody(BaseModel):
    """TEI's error body."""

    error: str
    error_type: ErrorType
