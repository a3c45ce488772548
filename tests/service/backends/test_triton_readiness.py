"""/readyz through a real Triton: a pod is ready when every version it routes traffic to is loaded.

Routed: each model's default (stable) version, the canary of an active rollout, and every version a
collection is bound to. Triton lacks tiny@3 here (conftest.py); with tiny's stable version pinned to 2,
nothing uses tiny@3 until a canary or a collection does.
"""

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import SecretStr
from redis.asyncio import Redis

from service.rollouts.state import AnalysisSettings, rollback, start
from service.rollouts.store import RedisRolloutStore
from service.settings import Settings
from tests.conftest import SHARED_REDIS_URL
from tests.helpers import running_gateway
from tests.replicas import gateways
from tests.service.backends.conftest import triton_settings
from tests.triton_server import LocalTriton

ADMIN_KEY = "admin-secret"


def pinned_to_2(settings: Settings, triton: LocalTriton, gateway_repository: Path, tmp_path: Path) -> Settings:
    return triton_settings(
        settings,
        triton,
        model_repository=gateway_repository,
        stable_versions={"tiny": 2},
        admin_api_key=SecretStr(ADMIN_KEY),
        milvus_uri=str(tmp_path / "milvus.db"),
    )


async def readiness(gateway: httpx.AsyncClient) -> tuple[int, dict, dict[str, dict]]:
    """(status, body, versions by name@version) of /readyz."""
    response = await gateway.get("/readyz", headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # the detail
    body = response.json()
    return response.status_code, body, {f"{v['model']}@{v['version']}": v for v in body["versions"]}


async def test_a_version_nothing_routes_to_may_be_missing_in_triton(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, tmp_path: Path
) -> None:
    async with running_gateway(pinned_to_2(settings, triton, gateway_repository, tmp_path)) as (_, gateway):
        status, body, versions = await readiness(gateway)
        assert status == 200 and body["ready"] is True, body
        assert body["problems"] == []
        assert versions["tiny@3"]["state"] == "not_loaded" and versions["tiny@3"]["used_by"] == []
        assert versions["tiny@3"]["reason"].startswith("not loaded in Triton")
        assert versions["tiny@2"]["state"] == "ready" and versions["tiny@2"]["used_by"] == ["default"]
        assert versions["tiny@1"]["state"] == "ready" and versions["tiny@1"]["used_by"] == []
        # Pinned requests for it still get their 503.
        missing = await gateway.post("/v1/embeddings", json={"input": "x", "model": "tiny@3"})
        assert missing.status_code == 503


async def test_the_canary_of_an_active_rollout_must_be_loaded(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, tmp_path: Path
) -> None:
    async with running_gateway(pinned_to_2(settings, triton, gateway_repository, tmp_path)) as (app, gateway):
        # Starting a canary this replica's Triton lacks is refused: it would take the pods out of rotation.
        refused = await gateway.put(
            "/v1/rollouts/tiny",
            json={"canary_version": 3, "steps": [5, 50, 100]},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert refused.status_code == 400, refused.text
        assert "tiny@3" in refused.json()["error"]["message"] and "/readyz" in refused.json()["error"]["message"]
        assert (await readiness(gateway))[0] == 200

        # A rollout started elsewhere (another replica, whose Triton had it) reaches this one through the store.
        await app.state.rollouts.update(
            "tiny", lambda current: start(current, "tiny", 2, 3, [5, 50, 100], 0.0, AnalysisSettings())
        )
        status, body, versions = await readiness(gateway)
        assert status == 503 and body["ready"] is False
        assert versions["tiny@3"]["used_by"] == ["canary"]
        (problem,) = body["problems"]
        assert "tiny@3" in problem and "canary" in problem

        await app.state.rollouts.update("tiny", lambda current: rollback(current, "tiny", "not loaded"))
        status, body, versions = await readiness(gateway)
        assert status == 200, body
        assert versions["tiny@3"]["used_by"] == []


async def test_a_version_a_collection_is_bound_to_must_be_loaded(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, tmp_path: Path
) -> None:
    async with running_gateway(pinned_to_2(settings, triton, gateway_repository, tmp_path)) as (_, gateway):
        created = await gateway.put("/v1/collections/docs", json={"model": "tiny@3"})
        assert created.status_code == 201, created.text
        status, body, versions = await readiness(gateway)
        assert status == 503, body
        assert versions["tiny@3"]["used_by"] == ["collection docs"]
        (problem,) = body["problems"]
        assert "tiny@3" in problem and "collection docs" in problem

        assert (await gateway.delete("/v1/collections/docs")).status_code == 200
        status, body, versions = await readiness(gateway)
        assert status == 200, body
        assert versions["tiny@3"]["used_by"] == []


async def until_every(urls: list[str], holds: Callable[[httpx.Response], bool], timeout_s: float = 30) -> None:
    """Poll every replica's /readyz until ``holds`` is true of each; the deadline only stops a broken gateway."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            answers = await asyncio.gather(*(client.get(f"{url}/readyz") for url in urls))
            if all(holds(answer) for answer in answers):
                return
            assert time.monotonic() < deadline, [answer.json() for answer in answers]
            await asyncio.sleep(0.1)


def canary_problem(answer: httpx.Response) -> bool:
    problems = answer.json()["problems"]
    return answer.status_code == 503 and len(problems) == 1 and problems[0].startswith("tiny@3, used by canary")


async def test_replicas_follow_the_shared_rollout_state_into_and_out_of_readiness(
    triton: LocalTriton, gateway_repository: Path, shared_redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "EMBEDSERVE_BACKEND": "triton",
        "EMBEDSERVE_TRITON_URL": triton.grpc_url,
        "EMBEDSERVE_MODEL_REPOSITORY": str(gateway_repository),
        "EMBEDSERVE_STABLE_VERSIONS": json.dumps({"tiny": 2}),
        "EMBEDSERVE_REDIS_URL": SHARED_REDIS_URL,
        "EMBEDSERVE_REDIS_PREFIX": shared_redis_prefix,
        "EMBEDSERVE_ROLLOUT_REFRESH_S": "0.2",
        "EMBEDSERVE_MILVUS_URI": str(tmp_path / "milvus.db"),
    }
    store = RedisRolloutStore(Redis.from_url(SHARED_REDIS_URL, socket_timeout=5), shared_redis_prefix)
    # Each replica only becomes ready (gateways() waits for /readyz 200) though Triton lacks tiny@3.
    with gateways(2, env, tmp_path) as urls:
        adopted = await store.load("tiny")  # the stable version the first replica recorded
        assert adopted is not None and adopted.stable_version == 2
        state = await store.save(start(adopted, "tiny", 2, 3, [5, 50, 100], 0.0, AnalysisSettings()))
        await until_every(urls, canary_problem)
        await store.save(rollback(state, "tiny", "Triton lacks it"))
        await until_every(urls, lambda answer: answer.status_code == 200)
    await store.close()
