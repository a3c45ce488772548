"""/v1/collections through the real app: collections, items, dense/keyword/hybrid search, re-index, errors, 503."""

import json
import random
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers import metric, parse_metrics
from tests.service.test_bad_input import assert_openai_error
from trainer.data.sample_text import sentences

RARE = "The zyzzyva is a tropical weevil that feeds on palm leaves."


@pytest.fixture(scope="module")
def api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    milvus = tmp_path_factory.mktemp("collections") / "milvus.db"
    with TestClient(
        create_app(settings.model_copy(update={"milvus_uri": str(milvus), "reindex_grace_s": 0}))
    ) as client:
        yield client


@pytest.fixture(scope="module")
def articles(api: TestClient) -> list[dict[str, Any]]:
    """The 'articles' collection on minilm: 60 real sentences and one with a rare word."""
    fields = {"category": "string", "year": "int", "score": "float", "draft": "bool", "tags": "string_list"}
    assert api.put("/v1/collections/articles", json={"model": "minilm", "fields": fields}).status_code == 201
    items = [
        {
            "id": f"a{i:02d}",
            "text": text,
            "metadata": {"category": ["news", "sport", "science"][i % 3], "year": 2000 + i},
        }
        for i, text in enumerate(sentences()[:60])
    ]
    items.append({"id": "rare", "text": RARE, "metadata": {"category": "science", "tags": ["insects"], "draft": False}})
    response = api.post("/v1/collections/articles/items", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json() == {"upserted": 61, "model": "minilm@1"}
    assert response.headers["x-model-version"] == "1"
    return items


def search(api: TestClient, name: str, **body: Any) -> Any:
    response = api.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return response


def test_create_is_idempotent_and_conflicts_name_the_difference(api: TestClient) -> None:
    body = {"model": "tiny@1", "fields": {"color": "string"}}
    created = api.put("/v1/collections/things", json=body)
    assert created.status_code == 201
    info = created.json()
    assert info["model"] == "tiny" and info["version"] == 1 and info["dimension"] == 32
    assert info["fields"] == {"color": "string"} and info["items"] == 0 and info["state"] == "ready"
    assert info["index"] == {"type": "HNSW", "metric": "COSINE", "params": {"M": 16, "efConstruction": 200}}
    assert api.put("/v1/collections/things", json=body).status_code == 200
    assert_openai_error(api.put("/v1/collections/things", json={"model": "tiny@2"}), 409, "tiny@1", "delete it first")
    assert "things" in [c["name"] for c in api.get("/v1/collections").json()["data"]]
    assert api.get("/v1/collections/things").json()["fields"] == {"color": "string"}
    assert api.delete("/v1/collections/things").json() == {"name": "things", "deleted": True}
    assert_openai_error(api.get("/v1/collections/things"), 404, "does not exist", "PUT /v1/collections/things")


@pytest.mark.parametrize(
    ("name", "body", "status", "says"),
    [
        ("Items", {"model": "tiny"}, 400, "lowercase"),
        ("a__b", {"model": "tiny"}, 400, "single underscores"),
        ("_catalog", {"model": "tiny"}, 400, "starting with a letter"),
        ("x" * 64, {"model": "tiny"}, 400, "1-63"),
        ("trailing%0A", {"model": "tiny"}, 400, "lowercase"),
        ("ok", {"model": "nope"}, 404, "model 'nope' does not exist"),
        ("ok", {"model": "tiny@7"}, 404, "no version 7"),
        ("ok", {"model": "tiny", "fields": {"when": "date"}}, 400, "'fields'"),
        ("ok", {"model": "tiny", "fields": {"id": "string"}}, 400, "field name 'id' is invalid"),
        ("ok", {"model": "tiny", "fields": {"has space": "int"}}, 400, "is invalid"),
        ("ok", {"model": "tiny", "fields": {"price\n": "int"}}, 400, "is invalid"),
        ("ok", {"model": "tiny", "colour": "red"}, 400, "'colour'"),
        ("ok", {}, 400, "'model'"),
    ],
)
def test_bad_collection_definitions_are_refused(api: TestClient, name: str, body: dict, status: int, says: str) -> None:
    assert_openai_error(api.put(f"/v1/collections/{name}", json=body), status, says)


def test_upsert_then_search_finds_the_item(api: TestClient, articles: list[dict[str, Any]]) -> None:
    response = search(api, "articles", query=articles[7]["text"], top_k=3)
    assert response.headers["x-model-version"] == "1"
    body = response.json()
    assert body["model"] == "minilm@1"
    top = body["hits"][0]
    assert top["id"] == "a07" and top["score"] > 0.99 and top["text"] == articles[7]["text"]
    assert top["metadata"] == articles[7]["metadata"]
    scores = [hit["score"] for hit in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    # Meaning, not words: a paraphrase finds the rare item too.
    assert search(api, "articles", query="a beetle eating leaves of palm trees").json()["hits"][0]["id"] == "rare"


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_keyword_and_hybrid_find_the_item_with_a_rare_word(api: TestClient, articles: list, mode: str) -> None:
    hits = search(api, "articles", query="zyzzyva", mode=mode, top_k=5).json()["hits"]
    assert hits[0]["id"] == "rare" and hits[0]["text"] == RARE and hits[0]["score"] > 0
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)


def test_filters_and_output_fields(api: TestClient, articles: list[dict[str, Any]]) -> None:
    spec = {"and": [{"field": "category", "eq": "sport"}, {"field": "year", "gte": 2040}]}
    hits = search(api, "articles", query="anything", top_k=100, filter=spec).json()["hits"]
    expected = {
        i["id"] for i in articles if i["metadata"]["category"] == "sport" and i["metadata"].get("year", 0) >= 2040
    }
    assert {hit["id"] for hit in hits} == expected
    hits = search(api, "articles", query="zyzzyva", mode="keyword", output_fields=["tags"]).json()["hits"]
    assert hits[0] == {"id": "rare", "score": hits[0]["score"], "metadata": {"tags": ["insects"]}}
    hits = search(api, "articles", query="x", top_k=2, output_fields=[]).json()["hits"]
    assert all(set(hit) == {"id", "score"} for hit in hits)
    injected = {"field": "category", "eq": 'sport" or id != "'}
    assert search(api, "articles", query="x", filter=injected).json()["hits"] == []


def test_an_id_upserted_twice_is_stored_once_get_and_delete(api: TestClient) -> None:
    assert api.put("/v1/collections/notes", json={"model": "tiny", "fields": {"n": "int"}}).status_code == 201
    for text in ("first", "second"):
        item = {"id": "dir/note 1", "text": text, "metadata": {"n": 1}}
        assert api.post("/v1/collections/notes/items", json={"items": [item]}).status_code == 200
    assert api.get("/v1/collections/notes").json()["items"] == 1
    assert api.get("/v1/collections/notes/items/dir/note 1").json() == {
        "id": "dir/note 1",
        "text": "second",
        "metadata": {"n": 1},
    }
    assert api.delete("/v1/collections/notes/items/dir/note 1").json() == {"id": "dir/note 1", "deleted": True}
    assert_openai_error(api.get("/v1/collections/notes/items/dir/note 1"), 404, "no item 'dir/note 1'")
    assert_openai_error(api.delete("/v1/collections/notes/items/dir/note 1"), 404)
    assert search(api, "notes", query="second").json()["hits"] == []
    assert api.get("/v1/collections/notes").json()["items"] == 0


QUOTING_IDS = ["it's", 'say "hi"', "back\\slash", "x'] or id not in ['", 'x"] or id not in ["', "a','b", "100%", "é🙂"]


def test_ids_with_quotes_and_backslashes_are_items_like_any_other(api: TestClient) -> None:
    """Ids reach Milvus escaped on every path: a crafted id is one item, never an expression."""
    assert api.put("/v1/collections/quoting", json={"model": "tiny@1"}).status_code == 201
    items = [{"id": item_id, "text": f"text {n}"} for n, item_id in enumerate([*QUOTING_IDS, "a", "b", "x"])]
    assert api.post("/v1/collections/quoting/items", json={"items": items}).status_code == 200
    for item in items:
        got = api.get(f"/v1/collections/quoting/items/{quote_path(item['id'])}")
        assert got.status_code == 200, (item, got.text)
        assert got.json()["id"] == item["id"] and got.json()["text"] == item["text"]
    crafted = ["x'] or id not in ['", 'x"] or id not in ["', "a','b"]
    for item_id in crafted:
        assert api.delete(f"/v1/collections/quoting/items/{quote_path(item_id)}").json()["deleted"] is True
    assert api.get("/v1/collections/quoting").json()["items"] == len(items) - len(crafted)
    for item_id in ("a", "b", "x"):
        assert api.get(f"/v1/collections/quoting/items/{item_id}").status_code == 200
    assert_openai_error(api.get("/v1/collections/quoting/items/nul%00"), 400, "control characters")
    started = api.post("/v1/collections/quoting/reindex", json={"version": 2})
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 60
    while (info := api.get("/v1/collections/quoting").json())["state"] == "reindexing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (info["state"], info["version"], info["items"]) == ("ready", 2, len(items) - len(crafted))
    assert api.get(f"/v1/collections/quoting/items/{quote_path(QUOTING_IDS[0])}").json()["text"] == "text 0"


def quote_path(item_id: str) -> str:
    return urllib.parse.quote(item_id, safe="")


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("items", {"items": []}, "'items'"),
        ("items", {"items": [{"id": str(i), "text": "t"} for i in range(1001)]}, "'items'"),
        ("items", {"items": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}, "appears twice"),
        ("items", {"items": [{"id": "a", "text": ""}]}, "items[0].text is empty"),
        ("items", {"items": [{"id": "", "text": "t"}]}, "items[0].id must be 1-256 characters"),
        ("items", {"items": [{"id": "a\x00", "text": "t"}]}, "control characters"),
        ("items", {"items": [{"id": "a", "text": "t", "metadata": {"colour": "red"}}]}, "colour is not a declared"),
        ("items", {"items": [{"id": "a", "text": "t", "metadata": {"year": "2020"}}]}, "year must be an integer"),
        ("items", {"items": [{"id": "a", "text": "t", "metadata": {"year": 20.5}}]}, "year must be an integer"),
        ("items", {"items": [{"id": "a", "text": "t", "metadata": {"tags": ["a", 1]}}]}, "'items'"),
        ("items", {"items": [{"id": "a", "text": "t" * 40_000}]}, "over the limit"),
        ("search", {"query": "x", "top_k": 0}, "'top_k'"),
        ("search", {"query": "x", "top_k": 1001}, "'top_k'"),
        ("search", {"vector": [0.1] * 3}, "3 dimensions; this collection's vectors have 384"),
        ("search", {"vector": [0.0] * 384}, "not all zero"),
        ("search", {"vector": [1e39] * 384}, "finite float32"),
        ("search", {"vector": [10**400] * 384}, "finite float32"),
        ("search", {"query": "x", "vector": [0.1] * 384}, "exactly one of"),
        ("search", {}, "exactly one of"),
        ("search", {"mode": "keyword", "vector": [0.1] * 384}, "needs 'query'"),
        ("search", {"query": "   "}, "non-blank"),
        ("search", {"query": "x", "mode": "fuzzy"}, "'mode'"),
        ("search", {"query": "x", "output_fields": ["vector"]}, "'vector' is unknown"),
        ("search", {"query": "x", "filter": {"field": "colour", "eq": "red"}}, "'colour' is not a declared field"),
        ("search", {"query": "x", "filter": {"field": "year", "eq": "2020"}}, "must be an integer"),
        ("search", {"query": "x", "filter": {"field": "year", "near": 3}}, "operator 'near'"),
        ("search", {"query": "x", "filter": "year > 3"}, "'filter'"),
        ("reindex", {"version": 1}, "already on minilm@1"),
        ("reindex", {"version": 9}, "no version 9"),
        ("reindex", {"version": "2"}, "'version'"),
    ],
)
def test_client_mistakes_get_a_4xx_that_says_what_to_fix(
    api: TestClient, articles: list, path: str, body: dict, says: str
) -> None:
    response = api.post(f"/v1/collections/articles/{path}", json=body)
    assert 400 <= response.status_code < 500
    assert_openai_error(response, response.status_code, says)


def test_a_nan_vector_is_refused(api: TestClient, articles: list) -> None:
    body = json.dumps({"vector": [float("nan")] * 384}).encode()  # json.dumps writes NaN, which Python reads back
    response = api.post("/v1/collections/articles/search", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "finite")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("items", {"items": [{"id": "\ud800", "text": "t"}]}, "items"),
        ("items", {"items": [{"id": "a", "text": "t\udc00"}]}, "items"),
        ("items", {"items": [{"id": "a", "text": "t", "metadata": {"category": "\ud800"}}]}, "items"),
        ("search", {"query": "\udfff"}, "query"),
        ("search", {"query": "x", "filter": {"field": "category", "eq": "\ud800"}}, "filter"),
    ],
)
def test_lone_surrogates_are_refused_wherever_they_are(
    api: TestClient, articles: list, path: str, body: dict, param: str
) -> None:
    content = json.dumps(body).encode()  # escapes the surrogate as \ud800, as a client's JSON would
    response = api.post(
        f"/v1/collections/articles/{path}", content=content, headers={"content-type": "application/json"}
    )
    assert assert_openai_error(response, 400, "surrogate")["param"] == param
    assert api.get("/v1/collections/%ED%A0%80/items/%ED%A0%80").status_code < 500


def test_unknown_collections_are_404_on_every_route(api: TestClient) -> None:
    for method, path, body in [
        ("GET", "/v1/collections/ghost", None),
        ("DELETE", "/v1/collections/ghost", None),
        ("POST", "/v1/collections/ghost/items", {"items": [{"id": "a", "text": "t"}]}),
        ("GET", "/v1/collections/ghost/items/a", None),
        ("DELETE", "/v1/collections/ghost/items/a", None),
        ("POST", "/v1/collections/ghost/search", {"query": "x"}),
        ("POST", "/v1/collections/ghost/reindex", {"version": 2}),
    ]:
        assert_openai_error(api.request(method, path, json=body), 404, "collection 'ghost' does not exist")


def test_reindex_moves_to_the_new_version_with_progress_and_metrics(api: TestClient) -> None:
    assert api.put("/v1/collections/moving", json={"model": "tiny@1"}).status_code == 201
    items = [{"id": f"m{i}", "text": sentence} for i, sentence in enumerate(sentences()[:300])]
    assert api.post("/v1/collections/moving/items", json={"items": items}).status_code == 200
    started = api.post("/v1/collections/moving/reindex", json={"version": 2})
    assert started.status_code == 202
    assert started.json()["state"] == "reindexing" and started.json()["reindex"]["version"] == 2
    assert started.json()["reindex"]["total"] == 300
    assert_openai_error(
        api.post("/v1/collections/moving/reindex", json={"version": 2}), 409, "already being re-indexed"
    )
    deadline = time.monotonic() + 60
    while (info := api.get("/v1/collections/moving").json())["state"] != "ready":
        assert info["state"] == "reindexing" and 0 <= info["reindex"]["progress"] <= 1
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (info["version"], info["items"], info["reindex"]) == (2, 300, None)
    response = search(api, "moving", query=items[5]["text"])
    assert response.headers["x-model-version"] == "2" and response.json()["model"] == "tiny@2"
    assert response.json()["hits"][0]["id"] == "m5"
    found = parse_metrics(api.get("/metrics").text)
    assert metric(found, "embedserve_collection_reindex_progress", collection="moving", version="2") == 1.0
    assert metric(found, "embedserve_collection_items", collection="moving", model="tiny", version="2") == 300


def test_metrics_are_labelled_by_collection_model_and_version(api: TestClient, articles: list) -> None:
    search(api, "articles", query="x", mode="hybrid")
    found = parse_metrics(api.get("/metrics").text)
    labels = {"collection": "articles", "model": "minilm", "version": "1"}
    assert metric(found, "embedserve_collection_upsert_duration_seconds_count", **labels) >= 1
    assert metric(found, "embedserve_collection_search_duration_seconds_count", **labels, mode="hybrid") >= 1
    assert metric(found, "embedserve_collection_items", **labels) == len(articles)
    route = "/v1/collections/{name}/search"
    assert metric(found, "embedserve_requests_total", route=route, model="minilm", version="1", status="200") >= 1


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kinds = ["str", "num", "bool", "null", "list", "dict"] if depth < 4 else ["str", "num", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(["", "x", "shoes", 'a"b', "\\", "year", "id", "\x00", "😀", "eq", "dense", "keyword"])
    if kind == "num":
        return rng.choice([0, -1, 1, 2**63, 10**30, 0.5, -1e308, 384, 1001])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["items", "id", "text", "metadata", "query", "vector", "top_k", "filter", "field", "eq", "in", "and", "not"]
    keys += ["mode", "output_fields", "model", "fields", "version", "exists", "contains"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_random_bodies_never_produce_a_server_error(api: TestClient, articles: list) -> None:
    rng = random.Random(3)
    for _ in range(150):
        path = rng.choice(["search", "items", "reindex"])
        body = _random_json(rng)
        response = api.post(
            f"/v1/collections/articles/{path}",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code < 500, (path, body, response.text)
    assert api.get("/v1/collections/articles").json()["state"] in ("ready", "reindexing")


def test_without_milvus_only_collection_routes_answer_503(settings: Settings) -> None:
    unreachable = settings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{_free_port()}"})
    with TestClient(create_app(unreachable)) as client:
        for response in (
            client.get("/v1/collections"),
            client.put("/v1/collections/x", json={"model": "tiny"}),
            client.post("/v1/collections/x/search", json={"query": "q"}),
        ):
            assert_openai_error(response, 503, "unreachable", "127.0.0.1")
            assert response.headers["retry-after"]
        assert client.post("/v1/embeddings", json={"input": "still works", "model": "tiny"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_milvus_going_away_gives_503_and_the_gateway_recovers_by_itself(settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    server = _milvus_lite_server(tmp_path / "data", port)
    served = settings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{port}"})
    try:
        with TestClient(create_app(served)) as client:
            assert client.put("/v1/collections/kept", json={"model": "tiny"}).status_code == 201
            item = {"id": "k", "text": "kept across the outage"}
            assert client.post("/v1/collections/kept/items", json={"items": [item]}).status_code == 200
            server.terminate()
            server.wait(timeout=30)
            assert_openai_error(client.post("/v1/collections/kept/search", json={"query": "kept"}), 503, "unreachable")
            assert client.post("/v1/embeddings", json={"input": "fine", "model": "tiny"}).status_code == 200
            server = _milvus_lite_server(tmp_path / "data", port)
            deadline = time.monotonic() + 30  # pymilvus reconnects in the background, as a client retries after 503
            while (response := client.post("/v1/collections/kept/search", json={"query": "kept"})).status_code == 503:
                assert time.monotonic() < deadline, response.text
                time.sleep(0.5)
            assert [hit["id"] for hit in response.json()["hits"]] == ["k"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _milvus_lite_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    """A standalone Milvus Lite gRPC server (a Milvus server, as far as the gateway can tell)."""
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "milvus-lite server did not start"
            time.sleep(0.2)
