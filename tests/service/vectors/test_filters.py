"""service/vectors/filters.py: structured JSON filters compiled to Milvus expressions.

``matches`` below is the reference semantics, evaluated in Python; tests/service/vectors/test_store.py checks
that Milvus returns exactly the items it accepts, for every operator and for crafted injection attempts.
"""

from typing import Any

import pytest
from milvus_lite.search.filter import parse_expr
from milvus_lite.search.filter.tokens import tokenize

from service.errors import InvalidRequest
from service.vectors.filters import MAX_DEPTH, MAX_LIST_VALUES, MAX_NODES, FieldType, compile_filter, quote

FIELDS: dict[str, FieldType] = {
    "category": "string",
    "price": "float",
    "stock": "int",
    "on_sale": "bool",
    "tags": "string_list",
}


def matches(spec: dict[str, Any], item_id: str, metadata: dict[str, Any]) -> bool:
    """The obviously-correct reading of a filter: a condition on a missing field is false; not = complement."""
    if "and" in spec:
        return all(matches(part, item_id, metadata) for part in spec["and"])
    if "or" in spec:
        return any(matches(part, item_id, metadata) for part in spec["or"])
    if "not" in spec:
        return not matches(spec["not"], item_id, metadata)
    field = spec["field"]
    ((operator, value),) = [(k, v) for k, v in spec.items() if k != "field"]
    present = True if field == "id" else field in metadata
    if operator == "exists":
        return present == value
    if not present:
        return False
    actual = item_id if field == "id" else metadata[field]
    return {
        "eq": lambda: actual == value,
        "ne": lambda: actual != value,
        "lt": lambda: actual < value,
        "lte": lambda: actual <= value,
        "gt": lambda: actual > value,
        "gte": lambda: actual >= value,
        "in": lambda: actual in value,
        "not_in": lambda: actual not in value,
        "contains": lambda: value in actual,
        "contains_any": lambda: any(v in actual for v in value),
        "contains_all": lambda: all(v in actual for v in value),
    }[operator]()


def compiled(spec: object) -> str:
    return compile_filter(spec, FIELDS)


def rejected(spec: object) -> str:
    with pytest.raises(InvalidRequest) as caught:
        compile_filter(spec, FIELDS)
    assert caught.value.param == "filter" and caught.value.code == "invalid_filter"
    return caught.value.message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"field": "category", "eq": "shoes"}, '(exists metadata["category"] and metadata["category"] == "shoes")'),
        ({"field": "price", "lt": 100}, '(exists metadata["price"] and metadata["price"] < 100)'),
        ({"field": "price", "gte": 2.5}, '(exists metadata["price"] and metadata["price"] >= 2.5)'),
        ({"field": "stock", "ne": -3}, '(exists metadata["stock"] and metadata["stock"] != -3)'),
        ({"field": "on_sale", "eq": True}, '(exists metadata["on_sale"] and metadata["on_sale"] == true)'),
        (
            {"field": "category", "in": ["a", "b"]},
            '(exists metadata["category"] and (metadata["category"] == "a" or metadata["category"] == "b"))',
        ),
        (
            {"field": "stock", "not_in": [1, 2]},
            '(exists metadata["stock"] and (metadata["stock"] != 1 and metadata["stock"] != 2))',
        ),
        ({"field": "tags", "contains": "x"}, '(exists metadata["tags"] and json_contains(metadata["tags"], "x"))'),
        (
            {"field": "tags", "contains_any": ["x", "y"]},
            '(exists metadata["tags"] and json_contains_any(metadata["tags"], ["x", "y"]))',
        ),
        (
            {"field": "tags", "contains_all": ["x"]},
            '(exists metadata["tags"] and json_contains_all(metadata["tags"], ["x"]))',
        ),
        ({"field": "price", "exists": True}, 'exists metadata["price"]'),
        ({"field": "price", "exists": False}, 'not (exists metadata["price"])'),
        ({"field": "id", "eq": "a1"}, '(id == "a1")'),
        ({"field": "id", "in": ["a1", "b2"]}, '(id in ["a1", "b2"])'),
        ({"field": "id", "not_in": ["a1"]}, '(id not in ["a1"])'),
        ({"field": "id", "gt": "m"}, '(id > "m")'),
        (
            {
                "and": [
                    {"field": "price", "lt": 1},
                    {"or": [{"field": "id", "eq": "x"}, {"not": {"field": "id", "eq": "y"}}]},
                ]
            },
            '((exists metadata["price"] and metadata["price"] < 1) and ((id == "x") or not ((id == "y"))))',
        ),
    ],
)
def test_each_operator_compiles_to_a_guarded_milvus_expression(spec: dict[str, Any], expected: str) -> None:
    expression = compiled(spec)
    assert expression == expected
    parse_expr(expression)  # and Milvus Lite's own parser reads it


def test_numbers_are_written_so_milvus_reads_them_back() -> None:
    for value in (0, -1, 2**63 - 1, -(2**63), 1e-5, 1.5e300, -2.25, 1e16):
        expression = compiled({"field": "price", "eq": value})
        parse_expr(expression)
        assert repr(value) in expression


@pytest.mark.parametrize(
    "text",
    [
        'quote " inside',
        "single ' quote",
        "back\\slash",
        "ends with backslash \\",
        '\\"',
        "new\nline, tab\t, return\r",
        "unicode: ünïcödé 😀 ✓ 中文",
        '" or 1 == 1 or "',
        "] or metadata[",
        "",
    ],
)
def test_strings_survive_quoting_exactly(text: str) -> None:
    """Milvus Lite's tokenizer reads back exactly the string that was quoted."""

    tokens = tokenize(quote(text))
    assert [token.value for token in tokens if token.kind.name == "STRING"] == [text]


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f"])
def test_control_characters_that_milvus_cannot_escape_are_refused(char: str) -> None:
    assert "control character" in rejected({"field": "category", "eq": f"a{char}b"})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"field": "colour", "eq": "red"}, "'colour' is not a declared field; declared: id, category, on_sale"),
        ({"field": 'category"] == "x" or metadata["a', "eq": "x"}, "is not a declared field"),
        ({"field": "id or 1==1", "eq": "x"}, "is not a declared field"),
        ({"field": "metadata", "eq": "x"}, "is not a declared field"),
        ({"field": "", "eq": "x"}, "is not a declared field"),
        ({"field": 3, "eq": "x"}, "field must be a string"),
        ({"field": "category", "like": "s%"}, "operator 'like' does not apply to 'category'"),
        ({"field": "category", "eq": "a", "ne": "b"}, "exactly one operator"),
        ({"field": "category"}, "exactly one operator"),
        ({"field": "category", "eq": 3}, "must be a string, not a number"),
        ({"field": "category", "eq": None}, "must be a string, not null"),
        ({"field": "price", "lt": "100"}, "must be a number, not a string"),
        ({"field": "price", "lt": True}, "must be a number, not a boolean"),
        ({"field": "price", "lt": float("nan")}, "must be a finite number"),
        ({"field": "price", "lt": float("inf")}, "must be a finite number"),
        ({"field": "price", "lt": 2**70}, "outside the 64-bit integer range"),
        ({"field": "stock", "eq": 1.5}, "must be an integer"),
        ({"field": "stock", "eq": False}, "must be an integer"),
        ({"field": "on_sale", "eq": "true"}, "must be true or false"),
        ({"field": "on_sale", "lt": True}, "operator 'lt' does not apply to 'on_sale'"),
        ({"field": "tags", "eq": "x"}, "operator 'eq' does not apply to 'tags'"),
        ({"field": "tags", "contains": ["x"]}, "must be a string, not a list"),
        ({"field": "tags", "contains_any": []}, "non-empty list"),
        ({"field": "category", "in": "shoes"}, "must be a non-empty list"),
        ({"field": "category", "in": []}, "must be a non-empty list"),
        ({"field": "category", "in": ["a"] * (MAX_LIST_VALUES + 1)}, "over the limit"),
        ({"field": "category", "in": ["a", 1]}, "filter.in[1] must be a string"),
        ({"field": "category", "contains": "x"}, "operator 'contains' does not apply"),
        ({"field": "category", "exists": "yes"}, "exists must be true or false"),
        ({"field": "id", "exists": True}, "every item has an id"),
        ({"field": "category", "eq": "x" * 5000}, "over the limit"),
        ({"and": []}, "non-empty list"),
        ({"and": {"field": "category", "eq": "x"}}, "non-empty list"),
        ({"or": [{"field": "category", "eq": "x"}, "category == 'x'"]}, "filter.or[1] must be a JSON object"),
        ({"not": "id != ''"}, "filter.not must be a JSON object"),
        ({"and": [{"field": "category", "eq": "x"}], "or": []}, "exactly one of 'and', 'or', 'not'"),
        ({"xor": []}, "unknown key 'xor'"),
        ({}, "has nothing"),
        ("category == 'shoes'", "must be a JSON object"),
        (["category"], "must be a JSON object"),
    ],
)
def test_mistakes_are_refused_naming_the_problem(spec: object, says: str) -> None:
    assert says in rejected(spec)


def test_depth_and_size_are_bounded() -> None:
    deep: dict[str, Any] = {"field": "category", "eq": "x"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"not": deep}
    assert "nested deeper" in rejected(deep)
    wide = {"or": [{"field": "category", "eq": str(i)} for i in range(MAX_NODES + 1)]}
    assert f"more than {MAX_NODES} conditions" in rejected(wide)


def test_reference_semantics_treat_missing_fields_as_false_and_not_as_complement() -> None:
    assert not matches({"field": "price", "ne": 1}, "a", {})
    assert matches({"not": {"field": "price", "eq": 1}}, "a", {})
    assert matches({"field": "price", "exists": False}, "a", {})
    assert matches({"field": "tags", "contains_all": ["x", "y"]}, "a", {"tags": ["y", "x", "z"]})
