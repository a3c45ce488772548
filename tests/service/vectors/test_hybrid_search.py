"""Hybrid search through the real app: the route's hits are the fusion of its two legs for every setting, per-request
settings override the collection's, which PATCH changes; mistakes are 400s naming the field; records written before
the settings existed read the defaults."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.store import ModelStore
from service.settings import Settings
from service.vectors.fusion import DEFAULT_CANDIDATES, DEFAULT_FUSION, RrfFusion, WeightedFusion, fuse
from service.vectors.protocol import ItemIn, SearchRequest
from tests.service.test_bad_input import assert_openai_error
from tests.service.vectors.test_store import TableEncoder, open_store
from trainer.data.sample_text import sentences

QUERIES = ["the old city by the river", "music and dance", "a letter from the king", "zzzz qqqq"]
SETTINGS = [
    {"method": "rrf", "k": 1},
    {"method": "rrf", "k": 60},
    {"method": "weighted", "alpha": 0.3, "normalization": "minmax"},
    {"method": "weighted", "alpha": 0.7, "normalization": "zscore"},
    {"method": "weighted", "alpha": 1, "normalization": "minmax"},
]


@pytest.fixture(scope="module")
def api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    milvus = tmp_path_factory.mktemp("hybrid") / "milvus.db"
    with TestClient(create_app(settings.model_copy(update={"milvus_uri": str(milvus)}))) as client:
        texts = sentences()[:120]
        body = {"model": "tiny@1", "fields": {"part": "int"}}
        assert client.put("/v1/collections/texts", json=body).status_code == 201
        items = [{"id": f"t{i:03d}", "text": text, "metadata": {"part": i % 3}} for i, text in enumerate(texts)]
        assert client.post("/v1/collections/texts/items", json={"items": items}).status_code == 200
        yield client


def search(api: TestClient, name: str, **body: Any) -> list[dict[str, Any]]:
    response = api.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()["hits"]
    return hits


def leg(api: TestClient, name: str, mode: str, query: str, depth: int, **body: Any) -> list[tuple[str, float]]:
    hits = search(api, name, query=query, mode=mode, top_k=depth, output_fields=[], **body)
    return [(hit["id"], hit["score"]) for hit in hits]


def fused_locally(
    api: TestClient, name: str, query: str, fusion: dict[str, Any], depth: int, top_k: int, **body: Any
) -> list[tuple[str, float]]:
    setting = RrfFusion(**fusion) if fusion["method"] == "rrf" else WeightedFusion(**fusion)
    dense, keyword = leg(api, name, "dense", query, depth, **body), leg(api, name, "keyword", query, depth, **body)
    return fuse(dense, keyword, setting)[:top_k]


@pytest.mark.parametrize("fusion", SETTINGS, ids=json.dumps)
def test_hybrid_hits_are_the_fusion_of_the_two_legs(api: TestClient, fusion: dict[str, Any]) -> None:
    for query in QUERIES:
        for depth, extra in [(15, {}), (40, {"filter": {"field": "part", "ne": 1}})]:
            expected = fused_locally(api, "texts", query, fusion, depth, 7, **extra)
            hits = search(api, "texts", query=query, mode="hybrid", top_k=7, fusion=fusion, candidates=depth, **extra)
            assert [(hit["id"], hit["score"]) for hit in hits] == expected
            assert len(hits) == 7
            if extra:
                assert all(hit["metadata"]["part"] != 1 for hit in hits)
    # The legs differ, so the settings rank differently: the comparison above is not vacuous.
    distinct = [
        len({tuple(h["id"] for h in search(api, "texts", query=query, mode="hybrid", fusion=f)) for f in SETTINGS})
        for query in QUERIES
    ]
    assert max(distinct) >= 3, distinct


def test_hybrid_hits_carry_text_and_metadata_unless_asked_for_none(api: TestClient) -> None:
    hits = search(api, "texts", query=QUERIES[0], mode="hybrid", top_k=5)
    texts = dict(enumerate(sentences()[:120]))
    assert all(
        hit["text"] == texts[int(hit["id"][1:])] and hit["metadata"] == {"part": int(hit["id"][1:]) % 3} for hit in hits
    )
    only_part = search(api, "texts", query=QUERIES[0], mode="hybrid", top_k=5, output_fields=["part"])
    assert [h["id"] for h in only_part] == [h["id"] for h in hits] and all("text" not in h for h in only_part)
    bare = search(api, "texts", query=QUERIES[0], mode="hybrid", top_k=5, output_fields=[])
    assert [set(h) for h in bare] == [{"id", "score"}] * 5


def test_without_settings_hybrid_uses_the_gateway_defaults(api: TestClient) -> None:
    info = api.get("/v1/collections/texts").json()
    assert info["hybrid"] == {"fusion": DEFAULT_FUSION.model_dump(), "candidates": DEFAULT_CANDIDATES}
    assert info["keyword_analyzer"] == "english_stop"
    for query in QUERIES:
        expected = fused_locally(api, "texts", query, DEFAULT_FUSION.model_dump(), DEFAULT_CANDIDATES, 10)
        assert [(h["id"], h["score"]) for h in search(api, "texts", query=query, mode="hybrid")] == expected


def test_collection_defaults_apply_until_a_request_overrides_them(api: TestClient) -> None:
    weighted = {"method": "weighted", "alpha": 0.8, "normalization": "zscore"}
    body = {"model": "tiny@1", "fields": {"part": "int"}, "hybrid": {"fusion": weighted, "candidates": 12}}
    created = api.put("/v1/collections/tuned", json=body)
    assert created.status_code == 201 and created.json()["hybrid"] == {"fusion": weighted, "candidates": 12}
    items = [{"id": f"t{i:03d}", "text": text} for i, text in enumerate(sentences()[:120])]
    assert api.post("/v1/collections/tuned/items", json={"items": items}).status_code == 200
    query = QUERIES[1]

    def hybrid(**body: Any) -> list[tuple[str, float]]:
        return [(h["id"], h["score"]) for h in search(api, "tuned", query=query, mode="hybrid", top_k=6, **body)]

    assert hybrid() == fused_locally(api, "tuned", query, weighted, 12, 6)
    rrf = {"method": "rrf", "k": 5}
    assert hybrid(fusion=rrf) == fused_locally(api, "tuned", query, rrf, 12, 6)
    assert hybrid(candidates=30) == fused_locally(api, "tuned", query, weighted, 30, 6)
    assert hybrid() != hybrid(fusion=rrf)
    # The same body again changes nothing; leaving hybrid out too; other hybrid defaults are a conflict.
    assert api.put("/v1/collections/tuned", json=body).status_code == 200
    assert api.put("/v1/collections/tuned", json={"model": "tiny@1", "fields": {"part": "int"}}).status_code == 200
    other = {**body, "hybrid": {"fusion": rrf}}
    assert_openai_error(api.put("/v1/collections/tuned", json=other), 409, "PATCH /v1/collections/tuned")
    # PATCH: the fields given change, null goes back to the gateway's default, the others stay.
    patched = api.patch("/v1/collections/tuned", json={"hybrid": {"fusion": rrf}})
    assert patched.status_code == 200 and patched.json()["hybrid"] == {"fusion": rrf, "candidates": 12}
    assert hybrid() == fused_locally(api, "tuned", query, rrf, 12, 6)
    reset = api.patch("/v1/collections/tuned", json={"hybrid": {"fusion": None}}).json()["hybrid"]
    assert reset == {"fusion": DEFAULT_FUSION.model_dump(), "candidates": 12}
    assert api.get("/v1/collections/tuned").json()["hybrid"] == reset
    assert hybrid() == fused_locally(api, "tuned", query, DEFAULT_FUSION.model_dump(), 12, 6)
    # Asking for more hits than the collection's candidates: each leg goes top_k deep.
    deep = search(api, "tuned", query=query, mode="hybrid", top_k=20)
    assert [(h["id"], h["score"]) for h in deep] == fused_locally(
        api, "tuned", query, DEFAULT_FUSION.model_dump(), 20, 20
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "param", "says"),
    [
        ("POST", "search", {"query": "x", "fusion": {"method": "rrf", "k": 5}}, "fusion", "hybrid search only"),
        ("POST", "search", {"query": "x", "mode": "keyword", "candidates": 50}, "candidates", "hybrid search only"),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "top_k": 20, "candidates": 10},
            "candidates",
            "at least top_k",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "candidates": 0},
            "candidates",
            "greater than or equal to 1",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "candidates": 5000},
            "candidates",
            "less than or equal to 1000",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "fusion": {"method": "borda"}},
            "fusion",
            "'rrf', 'weighted'",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "fusion": {"method": "weighted"}},
            "fusion",
            "Field required",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "fusion": {"method": "weighted", "alpha": 1.5}},
            "fusion",
            "less than or equal to 1",
        ),
        (
            "POST",
            "search",
            {"query": "x", "mode": "hybrid", "fusion": {"method": "weighted", "alpha": 0.5, "normalization": "l2"}},
            "fusion",
            "'minmax' or 'zscore'",
        ),
        ("POST", "search", {"query": "x", "mode": "hybrid", "fusion": {"method": "rrf", "k": -3}}, "fusion", "greater"),
        ("POST", "search", {"query": "x", "mode": "hybrid", "fusion": "rrf"}, "fusion", "dictionary"),
        ("PATCH", "", {"hybrid": {"candidates": 0}}, "hybrid", "greater than or equal to 1"),
        ("PATCH", "", {"hybrid": {"fusion": {"method": "rrf", "k": 5}, "depth": 3}}, "hybrid", "Extra inputs"),
        ("PATCH", "", {}, "hybrid", "Field required"),
        ("PUT", "", {"model": "tiny@1", "fields": {"part": "int"}, "hybrid": {"fusion": {"k": 5}}}, "hybrid", "method"),
    ],
)
def test_hybrid_mistakes_are_400s_naming_the_field(
    api: TestClient, method: str, path: str, body: dict[str, Any], param: str, says: str
) -> None:
    response = api.request(method, f"/v1/collections/texts{'/' + path if path else ''}", json=body)
    assert_openai_error(response, 400, says)
    assert response.json()["error"]["param"] == param


def test_patch_of_an_unknown_collection_is_404(api: TestClient) -> None:
    assert_openai_error(api.patch("/v1/collections/nowhere", json={"hybrid": {}}), 404, "does not exist")


async def test_a_record_from_before_hybrid_settings_reads_the_defaults(models: ModelStore, tmp_path: Path) -> None:
    encoder = TableEncoder(models)
    async with open_store(tmp_path / "milvus.db", encoder) as store:
        await store.create("legacy", "tiny@1", {})
        await store.upsert("legacy", [ItemIn(id=f"i{n}", text=text) for n, text in enumerate(sentences()[:30])])
        # As a gateway wrote it before hybrid settings and analysers were recorded.
        raw = (await store._catalog.get("legacy")).model_dump(mode="json")
        del raw["hybrid"], raw["active"]["keyword_analyzer"]
        await store._catalog._table.save("legacy", json.dumps(raw))
    async with open_store(tmp_path / "milvus.db", encoder) as store:
        info = await store.describe("legacy")
        assert info.hybrid.fusion == DEFAULT_FUSION and info.hybrid.candidates == DEFAULT_CANDIDATES
        assert info.keyword_analyzer == "standard"
        hits, _ = await store.search("legacy", SearchRequest(query=sentences()[3], mode="hybrid", top_k=3))
        assert hits[0].id == "i3"


@pytest.fixture(scope="module")
def models(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)
