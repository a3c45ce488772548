"""The gateway through a real Triton Inference Server: same vectors, clean failure, recovery.

The Triton and its repositories are this package's (conftest.py).
"""

import asyncio
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.helpers import running_gateway
from tests.service.backends.conftest import (
    SLOW_MODEL_SLEEP_S,
    TRITON_TINY_MAX_BATCH,
    min_cosine,
    triton_counts,
    triton_settings,
    vectors,
)
from tests.triton_server import LocalTriton
from trainer.data.sample_text import paragraphs, sentences

SLOW_CALL_TIMEOUT_S = 0.5
assert SLOW_CALL_TIMEOUT_S < SLOW_MODEL_SLEEP_S


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
        # tiny@3 is tiny's default version (its highest): the pod is out of rotation.
        (problem,) = ready.json()["problems"]
        assert problem.startswith("tiny@3, used by default, cannot serve: not loaded in Triton")
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
        problems = ready.json()["problems"]
        assert [p.split(",")[0] for p in problems] == ["minilm@1", "tiny@2"]  # the defaults; tiny@1 is unused
        assert all("cannot serve: not loaded in Triton" in problem for problem in problems)
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
