"""The served vectors are all-MiniLM-L6-v2's: sentence-transformers on the same weights agrees."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from trainer.data.sample_text import sentences
from trainer.encoder import packaged_minilm


@pytest.fixture(scope="module")
def reference_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(packaged_minilm().path), device="cpu")


def test_100_real_sentences_match_sentence_transformers(client: TestClient, reference_model) -> None:
    texts = list(sentences()[::15][:100])
    assert len(texts) == 100
    body = client.post("/v1/embeddings", json={"input": texts, "model": "minilm"}).json()
    served = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    expected = reference_model.encode(texts, normalize_embeddings=True, batch_size=32)
    cosines = (served * expected).sum(axis=1)
    assert cosines.min() >= 0.999, f"worst cosine {cosines.min():.6f} for {texts[int(cosines.argmin())]!r}"
