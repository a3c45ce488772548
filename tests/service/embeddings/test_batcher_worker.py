"""A batcher worker that dies is restarted and counted; its version is not ready until it runs again."""

import asyncio
import logging
import time

import pytest

from service.embeddings import batcher as batcher_module
from service.settings import Settings
from tests.helpers import metric, read_metrics, running_gateway

RESTART_DELAY_S = 3.0


async def test_a_dead_worker_makes_its_version_unready_then_restarts_and_serves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Wide enough to read /readyz before the restart on a busy machine.
    monkeypatch.setattr(batcher_module, "RESTART_DELAYS_S", (RESTART_DELAY_S,))
    caplog.set_level(logging.ERROR, logger="service.embeddings.batcher")
    no_cache = settings.model_copy(update={"cache_enabled": False})
    async with running_gateway(no_cache) as (app, gateway):
        batcher = app.state.batchers[("tiny", 2)]  # tiny's default version

        def broken(lane: str) -> list:
            raise RuntimeError("the worker's own bug")

        monkeypatch.setattr(batcher._queue, "select", broken)  # the next batch kills the worker
        started = time.monotonic()
        failed = await gateway.post("/v1/embeddings", json={"input": "this input kills the worker", "model": "tiny"})
        assert failed.status_code == 503, failed.text
        assert "tiny@2" in failed.json()["error"]["message"] and "retry" in failed.json()["error"]["message"]
        monkeypatch.undo()  # the restarted worker works

        ready = await gateway.get("/readyz")
        assert time.monotonic() - started < RESTART_DELAY_S, "too slow to see the restart window"
        assert ready.status_code == 503
        versions = {(v["model"], v["version"]): v for v in ready.json()["versions"]}
        assert versions[("tiny", 2)]["state"] == "restarting"
        assert any("tiny@2" in problem for problem in ready.json()["problems"])
        # Requests meanwhile get a 503 at once rather than waiting for a worker that is not there.
        waiting = await gateway.post("/v1/embeddings", json={"input": "during the restart", "model": "tiny@2"})
        assert waiting.status_code == 503
        # Other versions serve throughout.
        assert (await gateway.post("/v1/embeddings", json={"input": "x", "model": "tiny@1"})).status_code == 200

        deadline = time.monotonic() + 30
        while (await gateway.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the worker never came back"
            await asyncio.sleep(0.1)
        served = await gateway.post("/v1/embeddings", json={"input": "after the restart", "model": "tiny"})
        assert served.status_code == 200 and served.headers["x-model-version"] == "2"
        found = await read_metrics(gateway)
    assert metric(found, "embedserve_batcher_restarts_total", model="tiny", version="2") == 1
    assert metric(found, "embedserve_batcher_restarts_total", model="tiny", version="1") == 0
    (logged,) = [r for r in caplog.records if r.getMessage() == "batcher worker stopped; restarting"]
    assert (logged.model, logged.version, logged.error_type) == ("tiny", 2, "RuntimeError")  # type: ignore[attr-defined]
