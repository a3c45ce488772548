"""Wire models every route shares: the base of every JSON request body, and the error body (OpenAI's shape)."""

from typing import Any

from pydantic import BaseModel, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from service.settings import Settings

# JSON may escape half of a UTF-16 surrogate pair ("\ud800"); that is no text, and nothing downstream
# (tokenizers, Redis keys, Milvus, the error message quoting it) could carry it.
LONE_SURROGATE = "lone_surrogate"
# Validation context key: False when the raw body holds no surrogate escape, so no string can hold one.
SURROGATE_ESCAPES = "surrogate_escapes"


class RequestBody(BaseModel):
    """A JSON request body: every string in it, keys included, must be Unicode text."""

    @classmethod
    def check_size(cls, fields: dict[str, Any], settings: Settings) -> None:
        """Refuse a body whose bulk (the list a request carries many of) is over its limit, before anything
        walks it (``service.edge.json_body`` calls this on the decoded JSON)."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is not None and info.context.get(SURROGATE_ESCAPES) is False:
            return data  # the raw body holds no \ud800-\udfff escape: nothing to look for
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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
