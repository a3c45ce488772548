"""Structured JSON filters compiled to Milvus boolean expressions; a client's text never reaches Milvus raw.

A filter is a JSON object, one of::

    {"field": "price", "lt": 100}                 a comparison: eq ne lt lte gt gte in not_in
    {"field": "tags", "contains": "sale"}         string lists: contains contains_any contains_all
    {"field": "color", "exists": true}            the item has (true) / lacks (false) the field
    {"and": [f, ...]}   {"or": [f, ...]}   {"not": f}

Every field name is checked against the collection's declared fields (plus ``id``), every value against
the field's declared type; strings are escaped, numbers must be finite. Declared fields live in the
``metadata`` JSON column, where Milvus treats a comparison on a missing key as unknown (three-valued
logic: ``not (m["x"] == 1)`` is false when ``x`` is missing). Each comparison is therefore guarded by
``exists``, which makes every leaf plain true/false: a comparison on a missing field is false, and
``not`` is the plain complement.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from service.errors import InvalidRequest

FieldType = Literal["string", "int", "float", "bool", "string_list"]
FIELD_TYPES: tuple[FieldType, ...] = ("string", "int", "float", "bool", "string_list")

ID_FIELD = "id"
METADATA_FIELD = "metadata"
MAX_DEPTH = 16
MAX_NODES = 256
MAX_LIST_VALUES = 256
MAX_STRING_CHARS = 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

COMPARISONS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in")
LIST_OPERATORS = ("contains", "contains_any", "contains_all")
_SYMBOLS = {"eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_ORDERED = ("lt", "lte", "gt", "gte")
# Operators each field type accepts (``exists`` is accepted by every declared field).
_OPERATORS: dict[str, tuple[str, ...]] = {
    "string": COMPARISONS,
    "int": COMPARISONS,
    "float": COMPARISONS,
    "bool": ("eq", "ne", "in", "not_in"),
    "string_list": LIST_OPERATORS,
    ID_FIELD: COMPARISONS,
}
# Escapes the Milvus expression grammar understands (Milvus and Milvus Lite alike); other control
# characters have no escape there, so a string holding one is refused.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def compile_filter(spec: object, fields: Mapping[str, FieldType]) -> str:
    """The Milvus expression for ``spec``, or InvalidRequest (param ``filter``) naming what to fix."""
    compiler = _Compiler(fields)
    return compiler.node(spec, "filter", 0)


def quote(text: str) -> str:
    """``text`` as a double-quoted Milvus string literal (InvalidRequest on characters it cannot carry)."""
    for char in text:
        if (ord(char) < 0x20 and char not in _ESCAPES) or ord(char) == 0x7F:
            raise _invalid(
                f"string {text[:40]!r} holds the control character U+{ord(char):04X}, which filters cannot carry; "
                "remove it."
            )
    return '"' + "".join(_ESCAPES.get(char, char) for char in text) + '"'


def metadata_path(field: str) -> str:
    """The JSON path of a declared field (names are checked at declaration: letters, digits, underscores)."""
    return f"{METADATA_FIELD}[{quote(field)}]"


class _Compiler:
    def __init__(self, fields: Mapping[str, FieldType]) -> None:
        self.fields = fields
        self.nodes = 0

    def node(self, spec: object, where: str, depth: int) -> str:
        self.nodes += 1
        if depth > MAX_DEPTH:
            raise _invalid(f"{where} is nested deeper than {MAX_DEPTH} levels; flatten it.")
        if self.nodes > MAX_NODES:
            raise _invalid(f"the filter has more than {MAX_NODES} conditions; simplify it.")
        if not isinstance(spec, dict):
            raise _invalid(f'{where} must be a JSON object such as {{"field": "category", "eq": "shoes"}}.')
        if "field" in spec:
            return self.leaf(spec, where)
        if len(spec) != 1:
            keys = ", ".join(sorted(map(str, spec))) or "nothing"
            raise _invalid(
                f"{where} has {keys}; a filter is one of: a condition with 'field', or exactly one of "
                "'and', 'or', 'not'."
            )
        ((key, value),) = spec.items()
        if key == "not":
            return f"not ({self.node(value, f'{where}.not', depth + 1)})"
        if key in ("and", "or"):
            if not isinstance(value, list) or not value:
                raise _invalid(f"{where}.{key} must be a non-empty list of filters.")
            parts = [self.node(item, f"{where}.{key}[{i}]", depth + 1) for i, item in enumerate(value)]
            return "(" + f" {key} ".join(parts) + ")"
        raise _invalid(f"{where} has the unknown key {str(key)[:40]!r}; use 'field', 'and', 'or' or 'not'.")

    def leaf(self, spec: dict[str, Any], where: str) -> str:
        field = spec["field"]
        if not isinstance(field, str):
            raise _invalid(f"{where}.field must be a string naming a declared field or 'id'.")
        operators = [key for key in spec if key != "field"]
        if len(operators) != 1:
            raise _invalid(
                f"{where} must have exactly one operator beside 'field' (one of "
                f"{', '.join((*COMPARISONS, *LIST_OPERATORS, 'exists'))}); it has {len(operators)}."
            )
        operator, value = operators[0], spec[operators[0]]
        kind = ID_FIELD if field == ID_FIELD else self.fields.get(field)
        if kind is None:
            declared = ", ".join(["id", *sorted(self.fields)])
            raise _invalid(f"{where}.field {field[:64]!r} is not a declared field; declared: {declared}.")
        if operator == "exists":
            return self.exists(field, kind, value, where)
        if operator not in _OPERATORS[kind]:
            allowed = ", ".join((*_OPERATORS[kind], *(("exists",) if kind != ID_FIELD else ())))
            raise _invalid(
                f"{where}: operator {str(operator)[:40]!r} does not apply to {field!r} ({_kind_name(kind)}); "
                f"use one of {allowed}."
            )
        where_value = f"{where}.{operator}"
        if kind == ID_FIELD:
            return self.id_condition(operator, value, where_value)
        path = metadata_path(field)
        if kind == "string_list":
            condition = self.list_condition(path, operator, value, where_value)
        elif operator in ("in", "not_in"):
            literals = [
                _literal(kind, item, f"{where_value}[{i}]") for i, item in enumerate(_values(value, where_value))
            ]
            if operator == "in":
                condition = "(" + " or ".join(f"{path} == {literal}" for literal in literals) + ")"
            else:
                condition = "(" + " and ".join(f"{path} != {literal}" for literal in literals) + ")"
        else:
            condition = f"{path} {_SYMBOLS[operator]} {_literal(kind, value, where_value)}"
        # The guard makes a missing field a plain "false" (see the module docstring).
        return f"(exists {path} and {condition})"

    def exists(self, field: str, kind: str, value: object, where: str) -> str:
        if kind == ID_FIELD:
            raise _invalid(f"{where}: every item has an id; 'exists' applies to declared fields only.")
        if not isinstance(value, bool):
            raise _invalid(f"{where}.exists must be true or false.")
        test = f"exists {metadata_path(field)}"
        return test if value else f"not ({test})"

    def id_condition(self, operator: str, value: object, where: str) -> str:
        if operator in ("in", "not_in"):
            literals = ", ".join(
                _literal("string", item, f"{where}[{i}]") for i, item in enumerate(_values(value, where))
            )
            return f"({ID_FIELD} {'in' if operator == 'in' else 'not in'} [{literals}])"
        return f"({ID_FIELD} {_SYMBOLS[operator]} {_literal('string', value, where)})"

    def list_condition(self, path: str, operator: str, value: object, where: str) -> str:
        if operator == "contains":
            return f"json_contains({path}, {_literal('string', value, where)})"
        literals = ", ".join(_literal("string", item, f"{where}[{i}]") for i, item in enumerate(_values(value, where)))
        return f"json_{operator}({path}, [{literals}])"


def _values(value: object, where: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise _invalid(f"{where} must be a non-empty list of values.")
    if len(value) > MAX_LIST_VALUES:
        raise _invalid(f"{where} has {len(value)} values, over the limit of {MAX_LIST_VALUES}.")
    return value


def _literal(kind: str, value: object, where: str) -> str:
    check = _CHECKS[kind]
    problem = check(value)
    if problem:
        raise _invalid(f"{where} {problem}.")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    return repr(value)


def _string_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {_json_type(value)}"
    if len(value) > MAX_STRING_CHARS:
        return f"has {len(value)} characters, over the limit of {MAX_STRING_CHARS}"
    return None


def _int_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer (the field is int), not {_json_type(value)}"
    if not INT64_MIN <= value <= INT64_MAX:
        return "is outside the 64-bit integer range"
    return None


def _float_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {_json_type(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return "is outside the 64-bit integer range"
    return None


def _bool_problem(value: object) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, not {_json_type(value)}"


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "string": _string_problem,
    "int": _int_problem,
    "float": _float_problem,
    "bool": _bool_problem,
}


def value_problem(kind: FieldType, value: object) -> str | None:
    """Why ``value`` cannot be stored in a field of type ``kind`` (None when it can)."""
    if kind == "string_list":
        if not isinstance(value, list):
            return f"must be a list of strings, not {_json_type(value)}"
        for item in value:
            problem = _string_problem(item)
            if problem:
                return f"must hold strings only; an element {problem}"
        return None
    return _CHECKS[kind](value)


def _kind_name(kind: str) -> str:
    return "the item id, a string" if kind == ID_FIELD else f"a {kind} field"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"invalid filter: {message}", param="filter", code="invalid_filter")
