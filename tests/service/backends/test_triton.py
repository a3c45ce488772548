"""The gateway through a real Triton Inference Server: same vectors, clean failure, recovery.

One Triton serves the module (its graceful exit takes up to 30 s). Its repository is the python-backend
copy of the session repository, plus what the failure tests need: tiny's config takes at most
TRITON_TINY_MAX_BATCH rows per request (the gateway must split its batches), and a ``slow`` model whose
model.py sleeps past the gateway's timeout. The gateway-side repository ``gateway_repository`` adds
tiny@3, which Triton lacks, and slow@1.
"""

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.models.manifest import MANIFEST_FILE
from service.settings import Settings
from tests.helpers import running_gateway
from tests.triton_server import LocalTriton
from trainer.data.sample_text import paragraphs, sentences
from trainer.release.triton_config import PYTHON_MODEL_SOURCE, TritonOptions, python_config, write_python_repository

TRITON_TINY_MAX_BATCH = 4
SLOW_MODEL_SLEEP_S = 2.0
SLOW_CALL_TIMEOUT_S = 0.5
# model.py of the slow model: the real one, with execute() sleeping first.
SLOW_MODEL_PY = (
    PYTHON_MODEL_SOURCE.read_text()
    + f"""

class _Slow(TritonPythonModel):
    def execute(self, requests):
        import time

        time.sleep({SLOW_MODEL_SLEEP_S})
        return super().execute(requests)


TritonPythonModel = _Slow
"""
)


def add_version_copy(repository: Path, source: str, target: str) -> None:
    """``source`` (model/version) again as ``target``, its manifest renamed; the weights are hard-linked."""
    source_dir, target_dir = repository / source, repository / target
    shutil.copytree(source_dir, target_dir, copy_function=os.link)
    model, version = target.split("/")
    manifest = json.loads((source_dir / MANIFEST_FILE).read_text())
    (target_dir / MANIFEST_FILE).unlink()
    (target_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "model": model, "version": int(version)}))


@pytest.fixture(scope="module")
def gateway_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session repository plus tiny@3 (Triton lacks it) and slow@1 (Triton's copy sleeps)."""
    repository = tmp_path_factory.mktemp("gateway") / "repository"
    shutil.copytree(model_repository, repository, copy_function=os.link)
    add_version_copy(repository, "tiny/2", "tiny/3")
    (repository / "slow").mkdir()
    add_version_copy(repository, "tiny/1", "slow/1")
    return repository


@pytest.fixture(scope="module")
def triton(gateway_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    workdir = tmp_path_factory.mktemp("triton")
    repository = workdir / "repository"
    copied = write_python_repository(gateway_repository, repository)
    assert copied == ["minilm@1", "slow@1", "tiny@1", "tiny@2", "tiny@3"]
    shutil.rmtree(repository / "tiny" / "3")
    options = TritonOptions(instance_kind="cpu", max_batch_size=TRITON_TINY_MAX_BATCH)
    (repository / "tiny" / "config.pbtxt").write_text(python_config("tiny", 32, options))
    (repository / "slow" / "1" / "model.py").write_text(SLOW_MODEL_PY)
    server = LocalTriton(repository, workdir / "triton.log")
    server.start()
    yield server
    server.stop()


def triton_settings(settings: Settings, triton: LocalTriton, **update: object) -> Settings:
    # The cache is off so every vector really comes from Triton.
    return settings.model_copy(
        update={
            "backend": "triton",
            "triton_url": triton.grpc_url,
            "cache_enabled": False,
            "triton_timeout_s": 5.0,
            **update,
        }
    )


def vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def triton_counts(triton: LocalTriton, model: str, version: int) -> tuple[int, int]:
    """(requests that succeeded, rows inferred) for one version, from Triton's statistics."""
    url = f"http://127.0.0.1:{triton.http_port}/v2/models/{model}/versions/{version}/stats"
    (stats,) = httpx.get(url, timeout=5).json()["model_stats"]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["inference_count"])


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
    assert min_cosine(served, expected) >= 0.9999


async def test_a_batch_larger_than_tritons_max_batch_size_is_split(
    settings: Settings, triton: LocalTriton, client: TestClient
) -> None:
    texts = list(sentences()[300:310])
    expected = vectors(client.post("/v1/embeddings", json={"input": texts, "model": "tiny@1"}).json())
    requests_before, rows_before = triton_counts(triton, "tiny", 1)
    # One gateway batch of all ten inputs, more than the TRITON_TINY_MAX_BATCH rows Triton takes.
    wide = triton_settings(settings, triton, max_batch_size=256, max_batch_tokens=1_000_000, max_wait_ms=50.0)
    async with running_gateway(wide) as (_, gateway):
        response = await gateway.post("/v1/embeddings", json={"input": texts, "model": "tiny@1"})
    assert response.status_code == 200
    assert min_cosine(vectors(response.json()), expected) >= 0.9999
    requests_after, rows_after = triton_counts(triton, "tiny", 1)
    assert rows_after - rows_before == len(texts)
    assert requests_after - requests_before >= -(-len(texts) // TRITON_TINY_MAX_BATCH)


async def test_a_version_triton_lacks_gets_503s_while_the_others_serve(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="service.backends.triton")
    async with running_gateway(triton_settings(settings, triton, model_repository=gateway_repository)) as (_, gateway):
        missing = await gateway.post("/v1/embeddings", json={"input": "where is version 3?", "model": "tiny@3"})
        assert missing.status_code == 503
        message = missing.json()["error"]["message"]
        assert message == "the inference server has not loaded tiny@3 (see /readyz)."
        ready = await gateway.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["problems"] == ["tiny@3 is not ready in the triton backend"]
        for model in ("tiny@1", "tiny@2", "minilm@1"):
            served = await gateway.post("/v1/embeddings", json={"input": "still here", "model": model})
            assert served.status_code == 200, model
    # Triton's own words are logged for the operator, never returned to the client.
    logged = [r for r in caplog.records if getattr(r, "version", None) == 3 and getattr(r, "triton_message", None)]
    assert logged, [r.getMessage() for r in caplog.records]
    assert all(record.triton_message not in message for record in logged)


async def test_a_call_that_times_out_gets_a_503(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="service.backends.triton")
    impatient = triton_settings(
        settings, triton, model_repository=gateway_repository, triton_timeout_s=SLOW_CALL_TIMEOUT_S
    )
    async with running_gateway(impatient) as (_, gateway):
        slow = await gateway.post("/v1/embeddings", json={"input": "take your time", "model": "slow@1"})
        assert slow.status_code == 503
        message = slow.json()["error"]["message"]
        assert message == (
            f"the inference server did not answer for slow@1 within {SLOW_CALL_TIMEOUT_S:g} s; "
            "retry later (see /readyz)."
        )
        assert (await gateway.post("/v1/embeddings", json={"input": "quick", "model": "tiny@1"})).status_code == 200
    statuses = [getattr(r, "triton_status", None) for r in caplog.records if getattr(r, "model", None) == "slow"]
    assert "StatusCode.DEADLINE_EXCEEDED" in statuses


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
