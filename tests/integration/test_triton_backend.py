"""The gateway through a real Triton Inference Server: same vectors, clean failure, recovery."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.helpers import running_gateway
from tests.triton_server import LocalTriton
from trainer.sample_text import paragraphs, sentences
from trainer.triton_config import write_python_repository


@pytest.fixture(scope="module")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    workdir = tmp_path_factory.mktemp("triton")
    assert write_python_repository(model_repository, workdir / "repository") == ["minilm@1", "tiny@1", "tiny@2"]
    server = LocalTriton(workdir / "repository", workdir / "triton.log")
    server.start()
    yield server
    server.stop()


def triton_settings(settings: Settings, triton: LocalTriton) -> Settings:
    # The cache is off so every vector really comes from Triton.
    return settings.model_copy(
        update={"backend": "triton", "triton_url": triton.grpc_url, "cache_enabled": False, "triton_timeout_s": 5.0}
    )


def vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


@pytest.mark.parametrize("model", ["minilm@1", "tiny@1", "tiny@2"])
async def test_triton_and_in_process_backends_give_the_same_vectors(
    model: str, settings: Settings, triton: LocalTriton, client: TestClient
) -> None:
    texts = [*sentences()[200:220], *paragraphs()[:4], "short"]
    expected = vectors(client.post("/v1/embeddings", json={"input": texts, "model": model}).json())
    async with running_gateway(triton_settings(settings, triton)) as (_, gateway):
        response = await gateway.post("/v1/embeddings", json={"input": texts, "model": model})
        assert response.status_code == 200
        assert response.headers["x-model-version"] == model.split("@")[1]
        served = vectors(response.json())
        ready = (await gateway.get("/readyz")).json()
    assert ready["ready"] is True and ready["backend"] == "triton"
    cosines = (served * expected).sum(axis=1) / np.linalg.norm(served, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.9999, cosines.min()


async def test_killing_triton_gives_503s_and_restarting_recovers(settings: Settings, triton: LocalTriton) -> None:
    body = {"input": "is the inference server there?", "model": "tiny@1"}
    async with running_gateway(triton_settings(settings, triton)) as (_, gateway):
        assert (await gateway.post("/v1/embeddings", json=body)).status_code == 200

        triton.stop()
        down = await gateway.post("/v1/embeddings", json=body)
        assert down.status_code == 503
        error = down.json()["error"]
        assert error["message"].startswith("the inference server is unavailable for tiny@1")
        assert "grpc" not in error["message"].lower() and "StatusCode" not in error["message"]
        ready = await gateway.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "tiny@1 is not ready in the triton backend" in ready.json()["problems"]
        # Only the embedding routes depend on Triton.
        assert (await gateway.get("/v1/models")).status_code == 200

        triton.start()
        for _ in range(60):  # the gRPC channel reconnects with back-off
            if (await gateway.post("/v1/embeddings", json=body)).status_code == 200:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("the gateway did not recover after Triton came back")
        assert (await gateway.get("/readyz")).status_code == 200
