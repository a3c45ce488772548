"""The TEI-compatible routes through the real ASGI stack: the same vectors, versions and cache as /v1/embeddings,
TEI's shapes, status codes, error bodies and timing headers, per-request truncation, /tokenize, /info, /health."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from service.settings import ApiKey, Settings
from tests.helpers import metric, private_settings, queued_at_least, read_metrics, running_gateway, until
from tests.service.rollouts.test_fail_closed import add_failing_version

Gateway = tuple[FastAPI, httpx.AsyncClient]
TIMING_HEADERS = (
    "x-compute-time",
    "x-total-time",
    "x-compute-characters",
    "x-compute-tokens",
    "x-tokenization-time",
    "x-queue-time",
    "x-inference-time",
)
# Long enough that a lone request's input visibly waits for its batch to fill.
MAX_WAIT_MS = 100
# Over tiny's limit of 64 tokens whatever the tokenizer does with it.
LONG_WORDS = [f"word{i}" for i in range(200)]


@pytest.fixture(scope="module")
async def gateway(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    milvus = tmp_path_factory.mktemp("tei") / "milvus.db"
    async with running_gateway(settings.model_copy(update={"milvus_uri": str(milvus)})) as running:
        yield running


async def openai_vectors(client: httpx.AsyncClient, texts: list[str], model: str) -> np.ndarray:
    response = await client.post("/v1/embeddings", json={"input": texts, "model": model, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def assert_tei_error(response: httpx.Response, status: int, error_type: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    for word in words:
        assert word in body["error"], body


async def test_embed_answers_a_bare_array_of_the_vectors_v1_embeddings_gives(gateway: Gateway) -> None:
    _, client = gateway
    texts = ["The cat sat on the mat.", "A feline rested on the rug.", "Stock markets fell sharply."]
    response = await client.post("/embed", json={"inputs": texts})
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "1"  # minilm, the default model
    vectors = np.array(response.json(), dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, await openai_vectors(client, texts, "minilm"), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    # A single string is a batch of one, as in TEI.
    single = await client.post("/embed", json={"inputs": texts[0]})
    np.testing.assert_allclose(np.array(single.json()), vectors[:1], atol=1e-6)


async def test_the_model_comes_from_the_query_and_the_version_from_x_model_version(gateway: Gateway) -> None:
    _, client = gateway
    text = [f"which version {uuid.uuid4().hex}"]
    default = await client.post("/embed?model=tiny", json={"inputs": text})
    assert default.headers["x-model-version"] == "2"  # tiny's highest version, its default
    pinned = await client.post("/embed?model=tiny", json={"inputs": text}, headers={"x-model-version": "1"})
    assert pinned.status_code == 200 and pinned.headers["x-model-version"] == "1"
    in_query = await client.post("/embed?model=tiny@1", json={"inputs": text})
    np.testing.assert_allclose(np.array(pinned.json()), await openai_vectors(client, text, "tiny@1"), atol=1e-6)
    np.testing.assert_allclose(np.array(in_query.json()), np.array(pinned.json()), atol=1e-6)
    np.testing.assert_allclose(np.array(default.json()), await openai_vectors(client, text, "tiny@2"), atol=1e-6)
    assert not np.allclose(np.array(default.json()), np.array(pinned.json()), atol=1e-3)


async def test_post_to_the_root_is_embed_as_in_tei(gateway: Gateway) -> None:
    _, client = gateway
    response = await client.post("/?model=tiny@1", json={"inputs": ["rooted"]})
    assert response.status_code == 200 and response.headers["x-model-version"] == "1"
    np.testing.assert_allclose(np.array(response.json()), await openai_vectors(client, ["rooted"], "tiny@1"), atol=1e-6)


async def test_every_embedding_response_carries_teis_timing_headers(settings: Settings) -> None:
    waiting = settings.model_copy(update={"max_wait_ms": MAX_WAIT_MS})
    async with running_gateway(waiting) as (_, client):
        text = f"timed {uuid.uuid4().hex}"
        computed = await client.post("/embed?model=tiny@1", json={"inputs": [text, "another input"]})
        again = await client.post("/embed?model=tiny@1", json={"inputs": [text]})  # a cache hit now
        openai = await client.post("/v1/embeddings", json={"input": [f"openai {uuid.uuid4().hex}"], "model": "tiny@1"})
    for response in (computed, again, openai):
        assert response.status_code == 200, response.text
        assert all(response.headers[name].isdigit() for name in TIMING_HEADERS), response.headers
    # The two inputs waited for their batch to fill (MAX_WAIT_MS), then ran in it.
    assert int(computed.headers["x-queue-time"]) >= MAX_WAIT_MS - 10
    assert int(computed.headers["x-compute-time"]) >= int(computed.headers["x-queue-time"])
    assert int(computed.headers["x-compute-characters"]) == len(text) + len("another input")
    assert int(openai.headers["x-queue-time"]) >= MAX_WAIT_MS - 10
    assert int(openai.headers["x-compute-tokens"]) == openai.json()["usage"]["prompt_tokens"]
    # Answered by the cache: no queue, no inference.
    assert again.headers["x-queue-time"] == "0" and again.headers["x-inference-time"] == "0"
    assert int(again.headers["x-compute-tokens"]) > 2


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"inputs": []}, 400, "Empty", ["'inputs' is an empty list"]),
        ({"inputs": ["x"] * 3000}, 413, "Validation", ["'inputs' has 3000 items, over the limit of 2048"]),
        ({"inputs": ["ok", ""]}, 422, "Validation", ["inputs[1] is an empty string"]),
        ({"inputs": 5}, 422, "Validation", ["'inputs' is invalid"]),
        ({"inputs": [[101, 2023, 102]]}, 422, "Validation", ["token ids"]),
        ({"inputs": "x", "normalize": False}, 422, "Validation", ["'normalize' false", "unit length"]),
        ({"inputs": "x", "dimensions": 12}, 422, "Validation", ["'dimensions' is 12", "384"]),
        ({"inputs": "x", "prompt_name": "query"}, 422, "Validation", ["'prompt_name'"]),
        ({"inputs": "x", "truncation_direction": "middle"}, 422, "Validation", ["'truncation_direction'"]),
        ({"inputs": " ".join(LONG_WORDS) * 2, "truncate": False}, 422, "Validation", ["tokens", "limit of 256"]),
    ],
)
async def test_teis_status_codes_and_error_body(
    gateway: Gateway, body: dict[str, Any], status: int, error_type: str, words: list[str]
) -> None:
    _, client = gateway
    assert_tei_error(await client.post("/embed", json=body), status, error_type, *words)


async def test_unknown_models_versions_and_bodies_are_422s_in_teis_body(gateway: Gateway) -> None:
    _, client = gateway
    assert_tei_error(await client.post("/embed?model=nope", json={"inputs": "x"}), 422, "Validation", "'nope'")
    pinned = await client.post("/embed?model=tiny", json={"inputs": "x"}, headers={"x-model-version": "9"})
    assert_tei_error(pinned, 422, "Validation", "no version 9")
    malformed = await client.post("/embed", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert_tei_error(malformed, 422, "Validation", "not valid JSON")
    # The OpenAI route keeps OpenAI's body and status for the same mistake.
    openai = await client.post("/v1/embeddings", json={"input": []})
    assert openai.status_code == 400 and openai.json()["error"]["type"] == "invalid_request_error"


async def test_a_body_over_the_byte_limit_is_a_413_in_teis_body(settings: Settings) -> None:
    async with running_gateway(settings.model_copy(update={"max_request_bytes": 1024})) as (_, client):
        response = await client.post("/embed", json={"inputs": ["x" * 600, "y" * 600]})
    assert_tei_error(response, 413, "Validation", "over the limit of 1024")


async def test_a_full_queue_is_a_429_overloaded_with_retry_after(settings: Settings) -> None:
    # A lone batch waits 2 s to fill while holding the whole queue (4 inputs): the next request does not fit.
    tight = settings.model_copy(update={"cache_enabled": False, "max_queue_inputs": 4, "max_wait_ms": 2000})
    async with running_gateway(tight) as (_, client):
        first = asyncio.ensure_future(client.post("/embed?model=tiny", json={"inputs": ["a", "b", "c", "d"]}))
        await until(lambda: queued_at_least(client, 4, model="tiny"))
        refused = await client.post("/embed?model=tiny", json={"inputs": "one more"})
        assert_tei_error(refused, 429, "Overloaded", "retry")
        assert int(refused.headers["retry-after"]) >= 1
        assert (await first).status_code == 200


async def test_a_model_failing_on_its_batch_is_a_424_backend_and_a_stopped_one_503_unhealthy(
    repository_copy: Path,
) -> None:
    add_failing_version(repository_copy)  # tiny@3 fails on every batch
    async with running_gateway(private_settings(repository_copy)) as (app, client):
        failed = await client.post("/embed?model=tiny@3", json={"inputs": "x"})
        assert_tei_error(failed, 424, "Backend", "inference failed in tiny@3")
        assert failed.headers["x-model-version"] == "3"
        await app.state.batchers[("tiny", 1)].stop()
        stopped = await client.post("/embed?model=tiny@1", json={"inputs": "x"})
        assert_tei_error(stopped, 503, "Unhealthy", "tiny@1")
        assert stopped.headers["retry-after"] == "5"
        # /health: whether the version can take requests (it runs no inference of its own).
        assert_tei_error(await client.get("/health?model=tiny@1"), 503, "Unhealthy", "tiny@1")
        assert (await client.get("/health?model=tiny@2")).status_code == 200
        assert (await client.get("/health")).status_code == 200  # minilm's default version


async def test_truncation_is_per_request_and_the_cache_never_answers_across_modes(gateway: Gateway) -> None:
    _, client = gateway
    tail = " ".join(LONG_WORDS) + f" {uuid.uuid4().hex}"
    text, other_start = f"first start {tail}", f"another beginning entirely {tail}"
    # The gateway truncates by default (EMBEDSERVE_TRUNCATE): the end is cut, as /v1/embeddings does.
    right = await client.post("/embed?model=tiny@1", json={"inputs": [text]})
    assert right.status_code == 200 and right.headers["x-compute-tokens"] == "64"
    np.testing.assert_allclose(np.array(right.json()), await openai_vectors(client, [text], "tiny@1"), atol=1e-6)
    # The truncated vector is in the cache now, but a request that refuses truncation is refused.
    refused = await client.post("/embed?model=tiny@1", json={"inputs": [text], "truncate": False})
    assert_tei_error(refused, 422, "Validation", "limit of 64")
    # Cut at the start, two texts that differ only there have one vector, unlike cut at the end.
    body = {"inputs": [text, other_start], "truncate": True, "truncation_direction": "left"}
    left = np.array((await client.post("/embed?model=tiny@1", json=body)).json())
    np.testing.assert_allclose(left[0], left[1], atol=1e-6)
    right_other = np.array((await client.post("/embed?model=tiny@1", json={"inputs": [other_start]})).json())
    assert not np.allclose(right_other[0], np.array(right.json())[0], atol=1e-3)
    assert not np.allclose(left[0], np.array(right.json())[0], atol=1e-3)
    # Inputs within the limit have one vector whatever the mode.
    short = {"inputs": ["short enough"], "truncate": True, "truncation_direction": "Left"}
    np.testing.assert_allclose(
        np.array((await client.post("/embed?model=tiny@1", json=short)).json()),
        await openai_vectors(client, ["short enough"], "tiny@1"),
        atol=1e-6,
    )


async def test_a_gateway_that_does_not_truncate_truncates_only_when_asked(settings: Settings) -> None:
    strict = settings.model_copy(update={"truncate": False})
    text = " ".join(LONG_WORDS) + f" {uuid.uuid4().hex}"
    async with running_gateway(strict) as (_, client):
        assert (await client.get("/info?model=tiny")).json()["auto_truncate"] is False
        omitted = await client.post("/embed?model=tiny@1", json={"inputs": text})
        assert_tei_error(omitted, 422, "Validation", "limit of 64")
        asked = await client.post("/embed?model=tiny@1", json={"inputs": text, "truncate": True})
        assert asked.status_code == 200
        # The OpenAI route of this gateway still refuses the text its cache now holds a truncated vector of.
        openai = await client.post("/v1/embeddings", json={"input": text, "model": "tiny@1"})
        assert openai.status_code == 400 and openai.json()["error"]["code"] == "context_length_exceeded"


async def test_tokenize_gives_each_inputs_tokens_with_utf8_byte_offsets(gateway: Gateway) -> None:
    _, client = gateway
    texts = ["Héllo wörld, 東京!", "hello world"]
    response = await client.post("/tokenize", json={"inputs": texts})
    assert response.status_code == 200 and response.headers["x-model-version"] == "1"
    tokens = response.json()
    assert [len(row) for row in tokens] == [8, 4]
    first = tokens[0]
    assert first[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert first[-1]["text"] == "[SEP]" and first[-1]["special"]
    assert [t["text"] for t in first[1:-1]] == ["Héllo", "wörld", ",", "東", "京", "!"]
    for token in first[1:-1]:  # byte offsets, as TEI's: the slice of the UTF-8 bytes is the piece
        assert texts[0].encode()[token["start"] : token["stop"]].decode() == token["text"]
    assert first[4]["start"] == len("Héllo wörld, ".encode())
    # As many tokens as /embed counts for the same text.
    embedded = await client.post("/embed", json={"inputs": texts[0]})
    assert int(embedded.headers["x-compute-tokens"]) == len(first)
    bare = (await client.post("/tokenize", json={"inputs": texts[1], "add_special_tokens": False})).json()[0]
    assert bare == tokens[1][1:-1] and not any(token["special"] for token in bare)
    assert [(t["start"], t["stop"]) for t in bare] == [(0, 5), (6, 11)]  # "hello", "world"
    assert_tei_error(await client.post("/tokenize", json={"inputs": []}), 400, "Empty")


async def test_info_describes_the_version_served_and_the_limits(gateway: Gateway, settings: Settings) -> None:
    _, client = gateway
    info = await client.get("/info")
    assert info.status_code == 200 and info.headers["x-model-version"] == "1"
    body = info.json()
    assert body["model_id"] == "minilm" and body["model_version"] == 1 and body["served_model_name"] == "minilm@1"
    assert body["model_type"] == {"embedding": {"pooling": "mean"}} and body["model_dtype"] == "float32"
    assert body["max_input_length"] == 256 and body["auto_truncate"] is True
    assert body["max_client_batch_size"] == settings.max_inputs_per_request
    assert body["max_batch_tokens"] == settings.max_batch_tokens
    assert body["max_batch_requests"] == settings.max_batch_size and body["version"] == "0.1.0"
    assert len(body["model_sha"]) == 64
    tiny = (await client.get("/info?model=tiny", headers={"x-model-version": "1"})).json()
    assert (tiny["model_id"], tiny["model_version"], tiny["max_input_length"]) == ("tiny", 1, 64)
    assert (await client.get("/info?model=tiny")).json()["model_version"] == 2


async def test_tei_routes_take_the_embed_scope_and_health_is_open(settings: Settings) -> None:
    keyed = settings.model_copy(
        update={"api_keys": [ApiKey(key=SecretStr("reader"), scopes=frozenset({"search"})), ApiKey(key=SecretStr("k"))]}
    )
    async with running_gateway(keyed) as (_, client):
        for method, path in (("POST", "/embed"), ("POST", "/tokenize"), ("GET", "/info"), ("POST", "/")):
            body = {"inputs": "x"} if method == "POST" else None
            anonymous = await client.request(method, path, json=body)
            assert_tei_error(anonymous, 401, "Validation", "missing API key")
            scoped = await client.request(method, path, json=body, headers={"authorization": "Bearer reader"})
            assert_tei_error(scoped, 403, "Validation", "'embed' scope")
            allowed = await client.request(method, path, json=body, headers={"authorization": "Bearer k"})
            assert allowed.status_code == 200, (path, allowed.text)
        assert (await client.get("/health")).status_code == 200
        # /health is a probe: no access-log line, no request metrics, no span.
        found = await read_metrics(client)
        assert metric(found, "embedserve_requests_total", route="/health") == 0
        assert metric(found, "embedserve_requests_total", route="/embed", status="200") == 1


async def test_the_openapi_document_describes_embed_which_reads_its_request_by_hand(gateway: Gateway) -> None:
    """/embed reads its API key, model, headers and body itself (not as FastAPI parameters): the document TEI
    clients are generated from must still show all of them, and the response."""
    _, client = gateway
    paths = (await client.get("/openapi.json")).json()["paths"]
    operation = paths["/embed"]["post"]
    assert {(p["in"], p["name"]) for p in operation["parameters"]} == {
        ("query", "model"),
        ("header", "authorization"),
        ("header", "x-model-version"),
        ("header", "x-routing-key"),
    }
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"inputs", "normalize", "truncate", "truncation_direction", "dimensions", "prompt_name"} <= set(
        body["properties"]
    )
    assert operation["requestBody"]["required"] is True
    response = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert response == {"$ref": "#/components/schemas/EmbedResponse"}
    assert "/" not in paths  # POST / is /embed again, for huggingface_hub; documented once


async def test_embed_is_routed_recorded_and_mirrored_like_v1_embeddings(settings: Settings) -> None:
    configured = settings.model_copy(update={"admin_api_key": SecretStr("admin"), "stable_versions": {"tiny": 1}})
    async with running_gateway(configured) as (app, client):
        body = {"canary_version": 2, "steps": [0, 50], "shadow_percent": 100}
        started = await client.put("/v1/rollouts/tiny", json=body, headers={"authorization": "Bearer admin"})
        assert started.status_code == 200, started.text
        served = await client.post("/embed?model=tiny", json={"inputs": f"mirrored {uuid.uuid4().hex}"})
        assert served.headers["x-model-version"] == "1"
        await asyncio.gather(*app.state.shadow._in_flight)
        found = await read_metrics(client)
    assert metric(found, "embedserve_shadow_requests_total", model="tiny", version="2", outcome="ok") == 1
    assert metric(found, "embedserve_inputs_embedded_total", model="tiny", version="1") == 1


async def test_requests_in_flight_together_share_a_computation_only_in_the_same_truncation_mode(
    settings: Settings,
) -> None:
    waiting = settings.model_copy(update={"max_wait_ms": MAX_WAIT_MS})
    text = " ".join(LONG_WORDS) + f" {uuid.uuid4().hex}"
    async with running_gateway(waiting) as (_, client):
        truncating, refusing = await asyncio.gather(
            client.post("/embed?model=tiny@1", json={"inputs": text, "truncate": True}),
            client.post("/embed?model=tiny@1", json={"inputs": text, "truncate": False}),
        )
    assert truncating.status_code == 200
    assert_tei_error(refusing, 422, "Validation", "limit of 64")
