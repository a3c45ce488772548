"""The official openai SDK works unchanged against the gateway over real HTTP."""

import json

import numpy as np
import pytest
from openai import OpenAI


def test_sdk_float_and_base64_give_the_same_vectors(gateway_url: str) -> None:
    client = OpenAI(base_url=f"{gateway_url}/v1", api_key="not-needed")
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    as_default = client.embeddings.create(model="minilm", input=texts)
    floats = np.array([d.embedding for d in as_float.data])
    decoded = np.array([d.embedding for d in as_default.data])
    assert floats.shape == (3, 384)
    np.testing.assert_allclose(decoded, floats, atol=1e-7)
    assert as_float.model == "minilm@1" and as_float.usage.prompt_tokens > 0
    assert floats[0] @ floats[1] > floats[0] @ floats[2]  # a real model: related sentences are closer
    # What went over the wire by default was base64 (the SDK would pass floats through just as well).
    raw = client.embeddings.with_raw_response.create(model="minilm", input=texts)
    assert all(isinstance(item["embedding"], str) for item in json.loads(raw.text)["data"])


def test_sdk_sees_errors_as_exceptions_with_the_message(gateway_url: str) -> None:
    import openai

    client = OpenAI(base_url=f"{gateway_url}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model="minilm", input="")
    response = client.embeddings.with_raw_response.create(model="minilm", input="hello")
    assert response.headers["x-model-version"] == "1"
