"""JSON request bodies read as a route dependency, so the cheap refusals come before the costly work.

FastAPI parses a declared body before any dependency runs, authentication included, and pydantic then
walks every element of it. Read here instead, a body is parsed only after the route's authentication;
fields a model ignores are dropped unread (one that forbids them gets its 400); its bulk list is counted
(``RequestBody.check_size``) before anything walks it; and the walk for lone surrogates runs only when
the raw bytes hold a surrogate escape at all. The errors are the ones FastAPI's own parsing raises, so the app maps them
to the same 400s.
"""

import json
import re
from collections.abc import Awaitable, Callable
from email.message import Message
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.edge.protocol import LONE_SURROGATE, SURROGATE_ESCAPES, RequestBody
from service.errors import InvalidRequest
from service.settings import Settings

Body = TypeVar("Body", bound=RequestBody)
# A \uD800-\uDFFF escape (either half of a pair, or a lone one): without one no string can hold a surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency that reads the request's body as ``model``: 400s in the app's usual shapes."""

    async def read(request: Request) -> Body:
        return await read_json_body(request, model)

    return read


async def read_json_body(request: Request, model: type[Body]) -> Body:
    """``request``'s body read as ``model``, as the ``json_body`` dependency reads it (for a route that reads its
    request itself)."""
    return _parsed(model, await request.body(), request)


def optional_json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body | None]]:
    """``json_body`` for a route whose body may be left out (None then)."""

    async def read(request: Request) -> Body | None:
        raw = await request.body()
        return _parsed(model, raw, request) if raw else None

    return read


def _parsed(model: type[Body], raw: bytes, request: Request) -> Body:
    if not raw or not _declares_json(request.headers.get("content-type")):
        raise _invalid("dict_type", "Input should be a valid dictionary")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; nesting past the parser's limit
        raise _invalid("json_invalid", "JSON decode error") from None
    if not isinstance(document, dict):
        raise _invalid("dict_type", "Input should be a valid dictionary")
    declared = document
    if model.model_config.get("extra") != "forbid":  # fields it would ignore: dropped before anything walks them
        declared = {key: value for key, value in document.items() if key in model.model_fields}
    settings: Settings = request.app.state.settings
    model.check_size(declared, settings)
    context = {SURROGATE_ESCAPES: _SURROGATE_ESCAPE.search(raw) is not None}
    try:
        return model.model_validate(declared, context=context)
    except ValidationError as error:
        raise RequestValidationError(
            [{**detail, "loc": ("body", *detail["loc"])} for detail in error.errors()]
        ) from None


def invalid_request(error: RequestValidationError) -> InvalidRequest:
    """What a request whose body (or a parameter) failed validation is told: the first thing wrong, named, with
    what to send instead."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON; send a JSON object.", code="invalid_json")
    if first.get("type") == LONE_SURROGATE:
        context = first.get("ctx") or {}
        return InvalidRequest(f"{first['msg']}.", param=context.get("param") or None, code="invalid_text")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not location:
        return InvalidRequest(
            "The request body must be a JSON object; send it with Content-Type: application/json.", code="invalid_body"
        )
    param = location[0]
    return InvalidRequest(f"'{param}' is invalid: {first.get('msg', 'is invalid')}.", param=param, code="invalid_type")


def request_schema(model: type[RequestBody], required: bool = True) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that reads ``model`` with ``json_body`` (``optional_json_body``:
    ``required=False``). Nested models are written out in place: ``#/$defs/...`` would not resolve there."""
    schema = model.model_json_schema()
    inlined = _inline(schema, schema.pop("$defs", {}))
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": inlined}}}}


def openapi_parameter(name: str, where: str, description: str) -> dict[str, Any]:
    """An optional string parameter (``where``: header or query) of a route that reads it itself, declared for
    the OpenAPI document in ``openapi_extra``."""
    return {"name": name, "in": where, "required": False, "schema": {"type": "string"}, "description": description}


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/Name"}`` replaced by that definition (request models nest, never
    recursively)."""
    if isinstance(node, dict):
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            return _inline(definitions[reference.removeprefix("#/$defs/")], definitions)
        return {key: _inline(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(value, definitions) for value in node]
    return node


def _declares_json(content_type: str | None) -> bool:
    """As FastAPI decides (strict): application/json or application/*+json."""
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _invalid(error_type: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": error_type, "loc": ("body",), "msg": message, "input": None}])
