"""Off-the-shelf clients against a gateway process over real HTTP: huggingface_hub's InferenceClient on the TEI
routes gets the vectors /v1/embeddings gives; LangChain's OpenAIEmbeddings embeds documents and a query."""

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from langchain_openai import OpenAIEmbeddings

DOCUMENTS = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


def openai_vectors(gateway_url: str, texts: list[str], model: str) -> np.ndarray:
    body = {"input": texts, "model": model, "encoding_format": "float"}
    response = httpx.post(f"{gateway_url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def test_inference_client_feature_extraction_gets_the_vectors_of_v1_embeddings(gateway_url: str) -> None:
    client = InferenceClient(model=gateway_url)  # posts to the URL itself, as to a TEI server
    vectors = client.feature_extraction(DOCUMENTS)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, openai_vectors(gateway_url, DOCUMENTS, "minilm"), atol=1e-6)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # a real model: related sentences are closer
    single = client.feature_extraction(DOCUMENTS[0], truncate=True, truncation_direction="left")
    np.testing.assert_allclose(single, vectors[:1], atol=1e-6)


def test_inference_client_pins_a_model_and_version(gateway_url: str) -> None:
    by_query = InferenceClient(model=f"{gateway_url}/embed?model=tiny@1").feature_extraction(DOCUMENTS)
    by_header = InferenceClient(model=f"{gateway_url}/embed?model=tiny", headers={"x-model-version": "1"})
    np.testing.assert_allclose(by_query, openai_vectors(gateway_url, DOCUMENTS, "tiny@1"), atol=1e-6)
    np.testing.assert_allclose(by_header.feature_extraction(DOCUMENTS), by_query, atol=1e-6)
    default = InferenceClient(model=f"{gateway_url}/embed?model=tiny").feature_extraction(DOCUMENTS)
    np.testing.assert_allclose(default, openai_vectors(gateway_url, DOCUMENTS, "tiny@2"), atol=1e-6)


def test_inference_client_sees_teis_errors_with_their_message(gateway_url: str) -> None:
    client = InferenceClient(model=gateway_url)
    with pytest.raises(HfHubHTTPError, match="'normalize' false is not available") as refused:
        client.feature_extraction("x", normalize=False)
    assert refused.value.response is not None and refused.value.response.status_code == 422
    assert refused.value.response.json()["error_type"] == "Validation"


def test_langchain_openai_embeddings_embeds_documents_and_a_query(gateway_url: str) -> None:
    embeddings = OpenAIEmbeddings(
        model="minilm", base_url=f"{gateway_url}/v1", api_key="not-needed", check_embedding_ctx_length=False
    )
    documents = np.array(embeddings.embed_documents(DOCUMENTS))
    query = np.array(embeddings.embed_query("Is it sunny?"))
    assert documents.shape == (3, 384) and query.shape == (384,)
    np.testing.assert_allclose(documents, openai_vectors(gateway_url, DOCUMENTS, "minilm"), atol=1e-6)
    np.testing.assert_allclose(query, openai_vectors(gateway_url, ["Is it sunny?"], "minilm")[0], atol=1e-6)
    assert int(np.argmax(documents @ query)) in (0, 1)  # a weather sentence, not the stadium
