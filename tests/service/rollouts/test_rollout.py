"""Canary rollouts: sticky routing, compare-and-set stores, replicas that agree through Redis, the admin API."""

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.asyncio import Redis

from client.cli import main as embedserve
from loadtests.processes import gateway
from service.errors import Conflict, InvalidRequest
from service.models.store import ModelStore
from service.rollouts.state import (
    AnalysisSettings,
    RolloutState,
    begin_promotion,
    choose_version,
    promote,
    rollback,
    set_weight,
    shadow,
    start,
)
from service.rollouts.store import MemoryRolloutStore, RedisRolloutStore, RolloutStore, RolloutWatcher
from service.settings import Settings
from tests.conftest import SHARED_REDIS_URL
from tests.helpers import metric, read_metrics, running_gateway
from tests.redis_server import PrivateRedis

ADMIN_KEY = "admin-secret"


@pytest.fixture
def prefix(shared_redis_prefix: str) -> str:
    return shared_redis_prefix


@pytest.fixture(scope="module")
def models(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)


def canary(weight: int, model: str = "tiny") -> RolloutState:
    state = start(None, model, 1, 2, [5, 20, 50, 100], 0.0, AnalysisSettings())
    return set_weight(state, model, weight)


def keys(count: int) -> list[str]:
    rng = random.Random(7)
    return [f"user-{rng.getrandbits(64):x}" for _ in range(count)]


def test_weight_20_sends_20_percent_of_keys_to_the_canary_and_each_key_sticks() -> None:
    state = canary(20)
    chosen = {key: choose_version(state, key) for key in keys(10_000)}
    share = sum(version == 2 for version in chosen.values()) / len(chosen)
    assert abs(share - 0.20) <= 0.02
    assert all(choose_version(state, key) == version for key, version in chosen.items())


def test_raising_the_weight_only_moves_keys_from_stable_to_canary() -> None:
    at_20 = {key: choose_version(canary(20), key) for key in keys(10_000)}
    at_50 = {key: choose_version(canary(50), key) for key in keys(10_000)}
    assert not [key for key, version in at_20.items() if version == 2 and at_50[key] == 1]
    assert abs(sum(v == 2 for v in at_50.values()) / 10_000 - 0.5) <= 0.02


def test_callers_without_an_identity_get_stable_and_ended_rollouts_send_nothing_to_the_canary() -> None:
    rng = random.Random(1)
    assert {choose_version(canary(100), None) for _ in range(100)} == {1}
    promoted = promote(begin_promotion(canary(20), "tiny"), "tiny")
    assert (promoted.stable_version, promoted.canary_version, promoted.weight) == (2, None, 0)
    assert choose_version(promoted, "someone") == 2
    assert not shadow(promoted, rng)
    mirrored = canary(0).model_copy(update={"shadow_percent": 30.0})
    assert abs(sum(shadow(mirrored, rng) for _ in range(10_000)) / 10_000 - 0.30) <= 0.02


def test_actions_are_recorded_and_bad_ones_refused() -> None:
    state = canary(20)
    assert [(d.action, d.from_weight, d.to_weight, d.actor) for d in state.history] == [
        ("start", 0, 5, "admin-api"),
        ("weight", 5, 20, "admin-api"),
    ]
    with pytest.raises(Conflict, match="already rolling out"):
        start(state, "tiny", 1, 2, [5], 0.0, AnalysisSettings())
    with pytest.raises(InvalidRequest, match="climb"):
        start(None, "tiny", 1, 2, [50, 25], 0.0, AnalysisSettings())
    with pytest.raises(InvalidRequest, match="already"):
        start(None, "tiny", 1, 1, [5], 0.0, AnalysisSettings())
    with pytest.raises(InvalidRequest, match="shadow_percent"):
        start(None, "tiny", 1, 2, [0, 50], 0.0, AnalysisSettings())
    shadow_only = start(None, "tiny", 1, 2, [0, 50], 25.0, AnalysisSettings())
    assert (shadow_only.weight, shadow_only.shadow_percent) == (0, 25.0)
    with pytest.raises(Conflict, match="not promoting"):
        promote(state, "tiny")  # promotion goes through phase promoting (collections first)
    promoting = begin_promotion(state, "tiny")
    assert (promoting.phase, promoting.weight) == ("promoting", 20)
    with pytest.raises(Conflict, match="re-indexed"):
        rollback(promoting, "tiny")


async def check_compare_and_set(store: RolloutStore) -> None:
    first = await store.save(canary(5))
    assert first.revision == 1
    assert await store.load("tiny") == first
    second = await store.save(set_weight(first, "tiny", 10))
    assert second.revision == 2
    with pytest.raises(Conflict, match="re-read it and retry"):
        await store.save(set_weight(first, "tiny", 50))  # based on revision 1: stale
    with pytest.raises(Conflict):
        await store.save(canary(5))  # a "new" rollout over an existing one
    assert (await store.load_all())["tiny"] == second


async def test_memory_store_compare_and_set() -> None:
    await check_compare_and_set(MemoryRolloutStore())


async def test_redis_store_round_trip_and_compare_and_set(prefix: str) -> None:
    store = RedisRolloutStore(Redis.from_url(SHARED_REDIS_URL, socket_timeout=5), prefix)
    try:
        await check_compare_and_set(store)
        stored = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5).get(f"{prefix}rollout:tiny")
        assert stored is not None and RolloutState.model_validate_json(stored).weight == 10
    finally:
        await store.close()


async def test_two_replicas_sharing_redis_agree_within_2_s(prefix: str, models: ModelStore) -> None:
    replicas = [
        RolloutWatcher(
            RedisRolloutStore(Redis.from_url(SHARED_REDIS_URL, socket_timeout=5), prefix), models, refresh_s=0.2
        )
        for _ in range(2)
    ]
    for replica in replicas:
        replica.start()
    try:
        # On top of what is stored: the other replica may have recorded tiny's stable version first.
        await replicas[0].update(
            "tiny", lambda current: canary(20).model_copy(update={"revision": current.revision if current else 0})
        )
        changed = time.monotonic()
        while replicas[1].get("tiny") is None or replicas[1].get("tiny") != replicas[0].get("tiny"):
            assert time.monotonic() - changed < 2.0
            await asyncio.sleep(0.02)
        assert all(
            replica.route("tiny", key) == replicas[0].route("tiny", key) for key in keys(200) for replica in replicas
        )
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_lost_redis_keeps_the_last_known_state(tmp_path: Path, models: ModelStore) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    timeout = {"socket_timeout": 0.2, "socket_connect_timeout": 0.2}
    watcher = RolloutWatcher(RedisRolloutStore(Redis.from_url(server.url, **timeout), "t:"), models, refresh_s=0.05)
    try:
        await watcher.update("tiny", lambda current: canary(100))
        server.stop()
        await watcher.refresh()
        assert watcher.get("tiny") is not None and watcher.route("tiny", "anyone") == 2
    finally:
        server.stop()
        await watcher.close()


async def test_a_canary_this_replica_cannot_serve_gets_no_traffic(models: ModelStore) -> None:
    watcher = RolloutWatcher(MemoryRolloutStore(), models)
    unverified = start(None, "tiny", 1, 9, [100], 0.0, AnalysisSettings())
    await watcher.update("tiny", lambda current: unverified)
    assert {watcher.route("tiny", key) for key in keys(100)} == {1}


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_admin_api_drives_routing_of_embeddings(settings: Settings) -> None:
    configured = settings.model_copy(update={"admin_api_key": SecretStr(ADMIN_KEY), "stable_versions": {"tiny": 1}})
    async with running_gateway(configured) as (_, client):
        started = await client.put(
            "/v1/rollouts/tiny", json={"canary_version": 2, "steps": [20, 50, 100]}, headers=admin()
        )
        assert started.status_code == 200, started.text
        assert (started.json()["stable_version"], started.json()["weight"]) == (1, 20)

        async def served(user: str, **extra: str) -> str:
            body = {"input": "hello", "model": extra.pop("model", "tiny"), "user": user}
            response = await client.post("/v1/embeddings", json=body, headers=extra)
            assert response.status_code == 200, response.text
            return response.headers["x-model-version"]

        users = keys(200)
        first = [await served(user) for user in users]
        assert 0.08 < first.count("2") / len(first) < 0.32
        assert [await served(user) for user in users] == first  # sticky
        assert {await served(user, model="tiny@1") for user in users[:20]} == {"1"}  # pinned wins
        assert await served("ignored", **{"x-routing-key": users[0]}) == first[0]

        stale = started.json()["revision"]
        moved = await client.post(
            "/v1/rollouts/tiny/weight", json={"weight": 50, "reason": "looks fine"}, headers=admin()
        )
        assert moved.json()["history"][-1] == {**moved.json()["history"][-1], "reason": "looks fine", "to_weight": 50}
        conflict = await client.post("/v1/rollouts/tiny/pause", json={"revision": stale}, headers=admin())
        assert conflict.status_code == 409 and "retry" in conflict.json()["error"]["message"]

        found = await read_metrics(client)
        assert metric(found, "embedserve_rollout_weight", model="tiny", version="2") == 50
        assert metric(found, "embedserve_rollout_phase", model="tiny", version="2", phase="progressing") == 1

        promoting = await client.post("/v1/rollouts/tiny/promote", headers=admin())
        assert (promoting.json()["phase"], promoting.json()["stable_version"]) == ("promoting", 1)
        promoted = await wait_for_phase(client, "tiny", "promoted")  # no collection to re-index first
        assert promoted["stable_version"] == 2
        assert {await served(user) for user in users[:20]} == {"2"}
        found = await read_metrics(client)
        assert metric(found, "embedserve_rollout_weight", model="tiny", version="1") == 0
        assert metric(found, "embedserve_rollout_weight", model="tiny", version="2") == 100
        assert metric(found, "embedserve_rollout_phase", model="tiny", version="2", phase="promoted") == 1
        listed = await client.get("/v1/rollouts", headers=admin())
        # Every served model has a state: its stable version was recorded when it was first served.
        assert {r["model"]: r["phase"] for r in listed.json()["data"]} == {"minilm": "promoted", "tiny": "promoted"}
        refused = await client.put("/v1/rollouts/tiny", json={"canary_version": 7}, headers=admin())
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "canary_version"


async def wait_for_phase(client: httpx.AsyncClient, model: str, phase: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := (await client.get(f"/v1/rollouts/{model}", headers=admin())).json())["phase"] != phase:
        assert time.monotonic() < deadline, f"still {state['phase']}: {state['history'][-1]}"
        await asyncio.sleep(0.1)
    return state


def rollout_command(url: str, *argv: str) -> int:
    return embedserve(["--url", url, "rollout", *argv])


def test_two_gateway_processes_agree_within_2_s(
    model_repository: Path, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_REDIS_URL": SHARED_REDIS_URL,
        "EMBEDSERVE_REDIS_PREFIX": prefix,
        "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY,
        "EMBEDSERVE_STABLE_VERSIONS": '{"tiny": 1}',
        "EMBEDSERVE_LOG_LEVEL": "WARNING",
    }
    with (
        gateway({**env, "EMBEDSERVE_MILVUS_URI": str(tmp_path / "a.db")}, tmp_path / "a.log") as first,
        gateway({**env, "EMBEDSERVE_MILVUS_URI": str(tmp_path / "b.db")}, tmp_path / "b.log") as second,
    ):
        monkeypatch.setenv("EMBEDSERVE_ADMIN_API_KEY", ADMIN_KEY)
        assert rollout_command(first, "start", "tiny", "2", "--steps", "30,60", "--reason", "cli") == 0
        started = httpx.get(f"{first}/v1/rollouts/tiny", headers=admin())
        assert started.json()["history"][-1]["reason"] == "cli"
        changed = time.monotonic()
        while (seen := httpx.get(f"{second}/v1/rollouts/tiny", headers=admin())).status_code != 200 or seen.json()[
            "revision"
        ] != started.json()["revision"]:
            assert time.monotonic() - changed < 2.0
            time.sleep(0.05)
        # The second replica routes by its refreshed copy: every key lands where the first sends it.
        deadline = changed + 2.0
        for user in keys(30):
            body = {"input": "hi", "model": "tiny", "user": user}
            versions = {
                httpx.post(f"{url}/v1/embeddings", json=body).headers["x-model-version"] for url in (first, second)
            }
            while len(versions) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
                versions = {
                    httpx.post(f"{url}/v1/embeddings", json=body).headers["x-model-version"] for url in (first, second)
                }
            assert len(versions) == 1
        capsys.readouterr()
        assert rollout_command(second, "weight", "tiny", "60") == 0
        assert rollout_command(second, "pause", "tiny") == 0
        capsys.readouterr()
        assert rollout_command(first, "show", "tiny", "--json") == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["phase"], shown["weight"], shown["history"][-1]["action"]) == ("paused", 60, "pause")
        assert rollout_command(first, "resume", "tiny") == 0
        assert rollout_command(first, "rollback", "tiny", "--reason", "enough") == 0
        assert rollout_command(first, "promote", "tiny") == 1  # nothing left to promote: 409
        monkeypatch.setenv("EMBEDSERVE_ADMIN_API_KEY", "wrong")
        assert rollout_command(first, "list") == 1


async def test_shadow_traffic_mirrors_to_the_canary_without_serving_from_it(settings: Settings) -> None:
    configured = settings.model_copy(update={"admin_api_key": SecretStr(ADMIN_KEY), "stable_versions": {"tiny": 1}})
    async with running_gateway(configured) as (app, client):
        body = {"canary_version": 2, "steps": [0, 50], "shadow_percent": 100}
        started = await client.put("/v1/rollouts/tiny", json=body, headers=admin())
        assert (started.json()["weight"], started.json()["shadow_percent"]) == (0, 100)
        served = []
        for i in range(20):
            response = await client.post("/v1/embeddings", json={"model": "tiny", "input": f"shadowed {i}"})
            served.append(response.headers["x-model-version"])
        pinned = await client.post("/v1/embeddings", json={"model": "tiny@1", "input": "pinned, not mirrored"})
        assert pinned.status_code == 200
        assert set(served) == {"1"}  # the canary answers no client
        await asyncio.gather(*app.state.shadow._in_flight)  # the mirrors still running
        found = await read_metrics(client)
        mirrored = metric(found, "embedserve_shadow_requests_total", model="tiny", version="2", outcome="ok")
        skipped = metric(found, "embedserve_shadow_requests_total", model="tiny", version="2", outcome="skipped")
        assert mirrored > 0 and mirrored + skipped == 20  # skipped: only past 16 mirrors in flight
        # The mirrored requests count for the canary's analysis, like requests it served.
        window = app.state.canary_window.take("tiny", 2)
        assert (window.requests, window.errors, len(window.latencies_s)) == (mirrored, 0, mirrored)
        # But they are not client traffic: counted apart, and kept out of the canary's drift sample.
        assert metric(found, "embedserve_inputs_embedded_total", model="tiny", version="2") == 0
        shadow_inputs = {"model": "tiny", "version": "2", "purpose": "shadow"}
        assert metric(found, "embedserve_internal_inputs_embedded_total", **shadow_inputs) == mirrored
        assert app.state.drift.samples("tiny", 2) == 0 and app.state.drift.samples("tiny", 1) == 21


async def test_the_analysis_waits_and_never_passes_a_canary_without_traffic(settings: Settings) -> None:
    configured = settings.model_copy(update={"admin_api_key": SecretStr(ADMIN_KEY), "stable_versions": {"tiny": 1}})
    async with running_gateway(configured) as (_, client):
        analysis = {"enabled": True, "interval_s": 0.2, "passes_to_step": 1, "thresholds": {"min_requests": 5}}
        body = {"canary_version": 2, "steps": [10, 100], "analysis": analysis}
        assert (await client.put("/v1/rollouts/tiny", json=body, headers=admin())).status_code == 200

        async def waits() -> float:
            found = await read_metrics(client)
            return metric(found, "embedserve_rollout_analysis_total", model="tiny", version="2", result="wait")

        deadline = time.monotonic() + 30
        while await waits() < 3:  # several intervals without a request
            assert time.monotonic() < deadline, "the analysis judged fewer than 3 intervals"
            await asyncio.sleep(0.05)
        state = (await client.get("/v1/rollouts/tiny", headers=admin())).json()
        assert (state["phase"], state["weight"], state["passes"], state["failures"]) == ("progressing", 10, 0, 0)
        assert state["last_judgement"]["result"] == "wait"
        assert "0 canary requests < 5" in state["last_judgement"]["reason"]
        found = await read_metrics(client)
        assert metric(found, "embedserve_rollout_analysis_total", model="tiny", version="2", result="pass") == 0


async def test_one_replica_at_a_time_holds_a_rollouts_analysis_lease(prefix: str) -> None:
    store = RedisRolloutStore(Redis.from_url(SHARED_REDIS_URL, socket_timeout=5), prefix)
    try:
        assert await store.hold_lease("tiny", "replica-a", ttl_s=60)
        assert not await store.hold_lease("tiny", "replica-b", ttl_s=60)  # a's, still
        assert await store.hold_lease("tiny", "replica-a", ttl_s=60)  # renewed by its holder
        assert await store.hold_lease("minilm", "replica-b", ttl_s=60)  # one lease per model
        # a's last renewal is for a short time, then it stops renewing (crashed): once that runs out, b takes over.
        assert await store.hold_lease("tiny", "replica-a", ttl_s=0.3)
        deadline = time.monotonic() + 10
        while not await store.hold_lease("tiny", "replica-b", ttl_s=60):
            assert time.monotonic() < deadline, "a's lease never expired"
            await asyncio.sleep(0.05)
        assert not await store.hold_lease("tiny", "replica-a", ttl_s=60)
    finally:
        await store.close()


async def test_the_replica_that_judges_counts_what_every_replica_served(
    settings: Settings, prefix: str, tmp_path: Path
) -> None:
    shared = {
        "admin_api_key": SecretStr(ADMIN_KEY),
        "stable_versions": {"tiny": 1},
        "redis_url": SHARED_REDIS_URL,
        "redis_prefix": prefix,
        "rollout_refresh_s": 0.2,
    }
    first = settings.model_copy(update={**shared, "milvus_uri": str(tmp_path / "a.db")})
    second = settings.model_copy(update={**shared, "milvus_uri": str(tmp_path / "b.db")})
    async with running_gateway(first) as (app_a, client_a):
        analysis = {"enabled": True, "interval_s": 1.0, "thresholds": {"min_requests": 10}}
        body = {"canary_version": 2, "steps": [10, 100], "analysis": analysis}
        assert (await client_a.put("/v1/rollouts/tiny", json=body, headers=admin())).status_code == 200
        lease = redis.Redis.from_url(SHARED_REDIS_URL)
        deadline = time.monotonic() + 10
        while lease.get(f"{prefix}rollout-lease:tiny") != app_a.state.analysis.holder.encode():
            assert time.monotonic() < deadline, "the only replica never took the lease"
            await asyncio.sleep(0.05)
        # A replica started during the rollout knows it before it serves (its first interval starts at once),
        # and leaves the judging to the lease holder.
        async with running_gateway(second) as (_, client_b):
            for i in range(15):  # served by the follower only, pinned to the canary
                answer = await client_b.post("/v1/embeddings", json={"model": "tiny@2", "input": f"handed over {i}"})
                assert answer.headers["x-model-version"] == "2"
            # The follower hands over each interval: the 15 may land in one of the leader's judgements or be
            # split between two, so count every judgement (one every interval_s; polled far more often).
            counted: dict[str, int] = {}
            deadline = time.monotonic() + 15
            while sum(counted.values()) < 15:
                assert time.monotonic() < deadline, f"the leader counted {counted} of the follower's 15 requests"
                await asyncio.sleep(0.05)
                judgement = (await client_a.get("/v1/rollouts/tiny", headers=admin())).json()["last_judgement"]
                if judgement is not None:
                    counted[judgement["at"]] = judgement["canary_requests"]
            assert sum(counted.values()) == 15, counted
