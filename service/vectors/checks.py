"""What clients send to the collection routes, checked before anything reaches Milvus.

Each check raises InvalidRequest naming the item or field and what to fix: declared fields, upserted
items (ids, texts, metadata against the declared types, Milvus's size limits), the search's query and
vector.
"""

import json
import math
import re
from typing import Any

from service.errors import InvalidRequest
from service.vectors.filters import FIELD_TYPES, MAX_LIST_VALUES, FieldType, value_problem
from service.vectors.protocol import ItemIn, SearchRequest

FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_FIELDS = frozenset({"id", "text", "metadata"})  # names output_fields and filters give a meaning
MAX_FIELDS = 64
MAX_ID_CHARS = 256
MAX_TEXT_BYTES = 65_535  # Milvus VARCHAR limit, in UTF-8 bytes
MAX_METADATA_BYTES = 65_536  # Milvus JSON field limit
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max: Milvus stores float32


def check_fields(fields: dict[str, FieldType]) -> None:
    if len(fields) > MAX_FIELDS:
        raise InvalidRequest(f"{len(fields)} fields declared, over the limit of {MAX_FIELDS}.", param="fields")
    for field, kind in fields.items():
        if not FIELD_NAME.fullmatch(field) or field in RESERVED_FIELDS:
            raise InvalidRequest(
                f"field name {field[:80]!r} is invalid: use letters, digits and underscores (at most 64, not starting "
                f"with a digit), and none of {', '.join(sorted(RESERVED_FIELDS))}.",
                param="fields",
            )
        if kind not in FIELD_TYPES:
            raise InvalidRequest(
                f"field {field!r} has type {kind!r}; use one of {', '.join(FIELD_TYPES)}.", param="fields"
            )


def check_items(items: list[ItemIn], fields: dict[str, FieldType], max_chars: int) -> list[dict[str, Any]]:
    """Milvus rows (without vectors) for ``items``, or a 400 naming the item and what to fix."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"items[{index}]"
        check_id(item.id, f"{where}.id")
        if item.id in seen:
            raise InvalidRequest(
                f"{where}.id '{item.id}' appears twice in the request; send each id once.", param="items"
            )
        seen.add(item.id)
        if not item.text:
            raise InvalidRequest(f"{where}.text is empty; send the text to embed.", param="items")
        if len(item.text) > max_chars or len(item.text.encode()) > MAX_TEXT_BYTES:
            raise InvalidRequest(
                f"{where}.text has {len(item.text)} characters, over the limit of {max_chars} characters "
                f"({MAX_TEXT_BYTES} bytes of UTF-8); shorten it.",
                param="items",
            )
        metadata: dict[str, Any] = {}
        for key, value in item.metadata.items():
            kind = fields.get(key)
            if kind is None:
                declared = ", ".join(sorted(fields)) or "none"
                raise InvalidRequest(
                    f"{where}.metadata.{key[:64]} is not a declared field (declared: {declared}); declare it when "
                    "creating the collection, or leave it out.",
                    param="items",
                )
            if value is None:
                continue  # null = the item lacks the field
            problem = value_problem(kind, value)
            if problem is None and isinstance(value, list) and len(value) > MAX_LIST_VALUES:
                problem = f"has {len(value)} elements, over the limit of {MAX_LIST_VALUES}"
            if problem:
                raise InvalidRequest(f"{where}.metadata.{key} {problem}.", param="items")
            metadata[key] = value
        if len(json.dumps(metadata).encode()) > MAX_METADATA_BYTES:
            raise InvalidRequest(
                f"{where}.metadata is over {MAX_METADATA_BYTES} bytes as JSON; trim it.", param="items"
            )
        rows.append({"id": item.id, "text": item.text, "metadata": metadata})
    return rows


def check_id(item_id: str, where: str, param: str = "items") -> None:
    if not item_id or len(item_id) > MAX_ID_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7F for c in item_id):
        raise InvalidRequest(f"{where} must be 1-{MAX_ID_CHARS} characters without control characters.", param=param)


def check_query(request: SearchRequest, max_chars: int) -> str | None:
    query = request.query
    if query is not None and (not query.strip() or len(query) > max_chars):
        raise InvalidRequest(f"'query' must be non-blank text of at most {max_chars} characters.", param="query")
    if request.mode == "dense" and (query is None) == (request.vector is None):
        raise InvalidRequest("dense search needs exactly one of 'query' (text) or 'vector'.", param="query")
    if request.mode in ("keyword", "hybrid") and query is None:
        raise InvalidRequest(f"{request.mode} search needs 'query' (text).", param="query")
    if request.mode == "keyword" and request.vector is not None:
        raise InvalidRequest("keyword search ranks by text only; drop 'vector' or use mode 'hybrid'.", param="vector")
    return query


def check_vector(vector: list[float], dimension: int) -> list[float]:
    if len(vector) != dimension:
        raise InvalidRequest(
            f"'vector' has {len(vector)} dimensions; this collection's vectors have {dimension}.", param="vector"
        )
    try:
        values = [float(v) for v in vector]
    except OverflowError:
        values = [math.inf]
    if not all(abs(v) <= FLOAT32_MAX for v in values) or not any(values):
        raise InvalidRequest(
            f"'vector' must hold finite float32 numbers (|v| <= {FLOAT32_MAX:.4g}), not all zero.", param="vector"
        )
    return values
