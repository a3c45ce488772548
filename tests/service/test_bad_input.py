"""Everything a client can get wrong gets a 4xx in OpenAI's error shape that says what to fix."""

import json
import random

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def assert_openai_error(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["type"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "status", "fragments"),
    [
        ({"input": []}, 400, ["empty list"]),
        ({"input": ""}, 400, ["empty string"]),
        ({"input": ["ok", ""]}, 400, ["input[1]", "empty string"]),
        ({"input": ["x"] * 2049}, 400, ["2049", "2048"]),
        ({"input": "y" * 40_000}, 400, ["40000 characters", "32768"]),
        ({"input": 5}, 400, ["'input'"]),
        ({"input": [1.5, 2.5]}, 400, ["'input'"]),
        ({"input": {"text": "x"}}, 400, ["'input'"]),
        ({"input": [[1, 2], [3]]}, 400, ["token ids"]),
        ({"input": "x", "model": 7}, 400, ["'model'"]),
        ({"input": "x", "encoding_format": "hex"}, 400, ["'encoding_format'"]),
        ({"input": "x", "dimensions": 128}, 400, ["128", "384"]),
        ({"input": "x", "dimensions": "384"}, 400, ["'dimensions'"]),
        ({}, 400, ["'input'"]),
        ({"input": "x", "model": "no-such-model"}, 404, ["no-such-model", "minilm"]),
        ({"input": "x", "model": "minilm@9"}, 404, ["no version 9", "1"]),
        ({"input": "x", "model": "minilm@latest"}, 400, ["not a version number"]),
        ({"input": "x", "model": "minilm@\u00b2"}, 400, ["not a version number"]),  # "²".isdigit() is True
        ({"input": "x", "model": "minilm@\u0661"}, 400, ["not a version number"]),  # an Arabic-Indic one
        ({"input": "x", "model": "minilm@" + "9" * 5000}, 400, ["not a version number"]),  # over int()'s limit
        ({"input": "x", "model": "minilm@"}, 400, ["names no version", "minilm@<n>"]),
        ({"input": "\ud800"}, 400, ["'input'", "lone UTF-16 surrogate"]),
        ({"input": ["ok", "a\udfffb"]}, 400, ["'input.1'", "surrogate"]),
        ({"input": "x", "model": "\udc80"}, 400, ["'model'", "surrogate"]),
        ({"input": "x", "user": "\ud83d"}, 400, ["'user'", "surrogate"]),
        ({"input": "a pair is fine: \ud83d\ude00", "model": "minilm@" + "0" * 9}, 404, ["no version 0"]),
    ],
)
def test_bad_request_bodies(client: TestClient, body: dict, status: int, fragments: list[str]) -> None:
    # json.dumps escapes non-ASCII (httpx would write a lone surrogate raw, which is no UTF-8)
    content = json.dumps(body).encode()
    response = client.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, status, *fragments)


def test_unknown_fields_are_ignored_unread(client: TestClient) -> None:
    # Dropped before anything walks them: a body can't make the gateway work through fields it ignores.
    body = json.dumps({"input": "x", "\ud800": 1, "extra": [["\udfff"] * 3] * 1000}).encode()
    response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("pin", ["\u00b2".encode("latin-1"), b"9" * 5000, b"x"])
def test_a_bad_version_header_is_a_400(client: TestClient, pin: bytes) -> None:
    response = client.post("/v1/embeddings", json={"input": "x", "model": "minilm"}, headers={"x-model-version": pin})
    assert_openai_error(response, 400, "not a version number")


def test_errors_after_a_version_was_chosen_name_it(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"input": "", "model": "minilm@1"})
    assert_openai_error(response, 400, "empty string")
    assert response.headers["x-model-version"] == "1"


def test_a_body_over_the_size_limit_is_a_413_declared_or_streamed(settings: Settings) -> None:
    small = settings.model_copy(update={"max_request_bytes": 10_000})
    body = json.dumps({"input": ["word " * 400] * 10, "model": "tiny"}).encode()  # ~20 kB
    with TestClient(create_app(small)) as client:
        declared = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        error = assert_openai_error(declared, 413, f"{len(body)} bytes", "limit of 10000", "split it")
        assert error["code"] == "request_too_large"
        # Chunked, without a Content-Length: counted as it arrives.
        chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
        streamed = client.post("/v1/embeddings", content=chunks, headers={"content-type": "application/json"})
        assert_openai_error(streamed, 413, "more than 10000 bytes")
        items = {"items": [{"id": str(i), "text": "x" * 500} for i in range(40)]}
        assert client.post("/v1/collections/any/items", json=items).status_code == 413  # every route
        fits = client.post("/v1/embeddings", json={"input": ["word " * 400] * 2, "model": "tiny"})
        assert fits.status_code == 200


def test_nesting_as_deep_as_the_json_parser_allows_is_a_400(client: TestClient) -> None:
    # Around the parser's own limit (~1000 levels) a recursive walk of the body overflowed Python's stack.
    for depth in range(900, 1010):
        body = '{"model": "minilm", "input": ' + "[" * depth + '"x"' + "]" * depth + "}"
        response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (depth, response.text)


def test_malformed_json(client: TestClient) -> None:
    response = client.post("/v1/embeddings", content=b'{"input": "x",', headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "not valid JSON")


def test_body_that_is_not_json_says_how_to_send_it(client: TestClient) -> None:
    response = client.post("/v1/embeddings", content=b"input=hello")
    assert_openai_error(response, 400, "Content-Type: application/json")


def test_unknown_route_and_method_use_the_same_error_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert_openai_error(client.get("/v1/embeddings"), 405)


def test_over_the_token_limit_without_truncation_names_the_limit(settings: Settings) -> None:
    strict = settings.model_copy(update={"truncate": False})
    with TestClient(create_app(strict)) as client:
        error = assert_openai_error(
            client.post("/v1/embeddings", json={"input": ["fine", "word " * 400], "model": "minilm"}),
            400,
            "input[1]",
            "limit of 256",
        )
        assert error["code"] == "context_length_exceeded"
        assert client.post("/v1/embeddings", json={"input": "word " * 100, "model": "minilm"}).status_code == 200
        # The index is the request's own, whatever was cached or repeated before the long input.
        assert client.post("/v1/embeddings", json={"input": ["cached one"], "model": "minilm"}).status_code == 200
        inputs = ["cached one", "new", "new", "cached one", "word " * 400]
        response = client.post("/v1/embeddings", json={"input": inputs, "model": "minilm"})
        assert_openai_error(response, 400, "input[4]", "limit of 256")


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kinds = ["str", "int", "float", "bool", "null", "list", "dict"] if depth < 3 else ["str", "int", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        if rng.random() < 0.3:
            return rng.choice(["minilm@", "minilm@\u00b2", "minilm@" + "1" * 5000, "minilm@1", "@", "@1", "\ud800"])
        return "".join(rng.choice("ab \u00e9\u4e2d\x00\U0001f600@1\u00b2\ud800") for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, 10**30, 384])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["input", "model", "encoding_format", "dimensions", "user", "x"]): _random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def test_random_bodies_never_produce_a_server_error(client: TestClient) -> None:
    rng = random.Random(7)
    statuses = set()
    for _ in range(300):
        body = _random_json(rng)
        response = client.post(
            "/v1/embeddings", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        statuses.add(response.status_code)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert "error" in response.json()
    assert statuses & {400, 404}
