"""The release budget, shared by replicas through Redis: triggers beyond it are refused and counted; a release
resumed under its id keeps its place; the signals say when the stable version is stale."""

import asyncio
from pathlib import Path

import httpx
import pytest

from client import cli
from loadtests.processes import MilvusLiteServer
from tests.helpers import metric, read_metrics, until
from tests.replicas import gateways, replica_env

ADMIN = {"Authorization": "Bearer release-admin"}


def budget_env(repository: Path, milvus: MilvusLiteServer, prefix: str, **settings: str) -> dict[str, str]:
    return replica_env(
        repository,
        milvus.uri,
        prefix,
        EMBEDSERVE_ADMIN_API_KEY="release-admin",
        EMBEDSERVE_RELEASE_MAX_PER_WINDOW="1",
        EMBEDSERVE_RELEASE_WINDOW_S="3600",
        **settings,
    )


async def claim(client: httpx.AsyncClient, release_id: str, trigger: str, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "trigger": trigger, "release_id": release_id}
    return await client.post("/v1/admin/releases", json=body, headers=ADMIN)


async def refused(clients: list[httpx.AsyncClient]) -> float:
    found = [await read_metrics(c) for c in clients]
    return sum(metric(f, "embedserve_release_triggers_total", decision="refused") for f in found)


async def test_three_triggers_in_a_window_that_allows_one_start_exactly_one_release(
    model_repository: Path, tmp_path: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    env = budget_env(model_repository, shared_milvus, shared_redis_prefix)
    with gateways(2, env, tmp_path / "logs") as urls:
        clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
        try:
            # Three triggers at once, spread over both replicas: one place, one release.
            answers = await asyncio.gather(
                claim(clients[0], "r-schedule", "schedule"),
                claim(clients[1], "r-drift", "drift"),
                claim(clients[0], "r-stale", "staleness"),
            )
            statuses = sorted(a.status_code for a in answers)
            assert statuses.count(201) == 1, [a.text for a in answers]
            started = next(a.json()["release"] for a in answers if a.status_code == 201)
            for answer in answers:
                if answer.status_code != 201:
                    assert answer.json()["error"]["code"] in ("release_running", "release_budget_exhausted")

            # The release ends; a later trigger in the same window is refused by the budget, with Retry-After.
            ended = await clients[1].patch(
                f"/v1/admin/releases/{started['release_id']}",
                json={"stage": "report", "outcome": "promoted", "version": 3, "training_hours": 0.01},
                headers=ADMIN,
            )
            assert ended.status_code == 200, ended.text
            later = await claim(clients[1], "r-later", "drift")
            assert later.status_code == 429
            assert later.json()["error"]["code"] == "release_budget_exhausted"
            assert "EMBEDSERVE_RELEASE_MAX_PER_WINDOW" in later.json()["error"]["message"]
            assert 3000 < int(later.headers["Retry-After"]) <= 3600

            assert await refused(clients) == 3  # two at once, one later
            found = [await read_metrics(c) for c in clients]
            assert sum(metric(f, "embedserve_release_triggers_total", decision="started") for f in found) == 1
            assert sum(metric(f, "embedserve_release_total", outcome="promoted") for f in found) == 1

            # The ledger both replicas read says the same.
            for client in clients:
                ledger = (await client.get("/v1/admin/releases", headers=ADMIN)).json()
                assert ledger["started_in_window"] == 1
                assert [r["outcome"] for r in ledger["releases"]] == ["promoted"]
        finally:
            for client in clients:
                await client.aclose()


async def test_a_resumed_release_keeps_its_place_and_an_outcome_is_final(
    model_repository: Path,
    tmp_path: Path,
    shared_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = budget_env(model_repository, shared_milvus, shared_redis_prefix)
    with gateways(1, env, tmp_path / "logs") as (url,):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = await claim(client, "r-1", "manual")
            assert first.status_code == 201 and first.json()["resumed"] is False
            again = await claim(client, "r-1", "manual")  # the trainer crashed and runs again
            assert again.status_code == 201 and again.json()["resumed"] is True
            other = await claim(client, "r-2", "manual")
            assert other.status_code == 409 and other.json()["error"]["code"] == "release_running"
            report = {"outcome": "canary_failed", "detail": "neighbour agreement 0.12 < 0.7"}
            assert (await client.patch("/v1/admin/releases/r-1", json=report, headers=ADMIN)).status_code == 200
            flip = await client.patch("/v1/admin/releases/r-1", json={"outcome": "promoted"}, headers=ADMIN)
            assert flip.status_code == 409, flip.text
            # What an SRE sees from the command line.
            monkeypatch.setenv("EMBEDSERVE_ADMIN_API_KEY", "release-admin")
            assert cli.main(["--url", url, "releases", "list"]) == 0
            listed = capsys.readouterr().out
            assert "1 of 1 releases started" in listed and "r-1  tiny  manual" in listed and "canary_failed" in listed
            assert cli.main(["--url", url, "releases", "signals", "tiny"]) == 0
            assert "due: nothing" in capsys.readouterr().out
            unknown = await client.patch("/v1/admin/releases/nope", json={"stage": "train"}, headers=ADMIN)
            assert unknown.status_code == 404
            assert (await client.post("/v1/admin/releases", json={"model": "tiny"})).status_code in (401, 403)


@pytest.mark.parametrize(("max_age_s", "due"), [("1", ["staleness"]), ("100000000", [])])
async def test_signals_say_a_release_is_due_when_the_stable_version_is_older_than_allowed(
    model_repository: Path,
    tmp_path: Path,
    shared_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
    max_age_s: str,
    due: list[str],
) -> None:
    env = budget_env(model_repository, shared_milvus, shared_redis_prefix, EMBEDSERVE_RELEASE_MAX_MODEL_AGE_S=max_age_s)
    with gateways(1, env, tmp_path / "logs") as (url,):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            signals = (await client.get("/v1/admin/releases/signals/tiny", headers=ADMIN)).json()
            assert signals["stable_version"] == 2
            assert signals["due"] == due
            assert signals["stable_age_s"] > 1

            async def age_exported() -> bool:
                found = await read_metrics(client)
                return metric(found, "embedserve_model_age_seconds", model="tiny", version="2", role="stable") > 1

            await until(age_exported, timeout_s=30)


async def test_drift_above_the_threshold_for_n_intervals_makes_a_release_due_until_one_runs(
    model_repository: Path, tmp_path: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    env = budget_env(
        model_repository,
        shared_milvus,
        shared_redis_prefix,
        EMBEDSERVE_RELEASE_DRIFT_MMD="0.0",
        EMBEDSERVE_RELEASE_DRIFT_INTERVALS="3",
        EMBEDSERVE_DRIFT_INTERVAL_S="0.3",
        EMBEDSERVE_DRIFT_MIN_SAMPLES="16",
    )
    with gateways(1, env, tmp_path / "logs") as (url,):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            before = (await client.get("/v1/admin/releases/signals/tiny", headers=ADMIN)).json()
            assert before["due"] == [] and before["drift_streak"] == 0
            # Inputs nothing like the version's reference texts (English sentences).
            for number in range(40):
                text = f"{number * 7919:x} zq {number % 13} xv {'#' * (number % 5)} 0x{number:04x}"
                answer = await client.post("/v1/embeddings", json={"model": "tiny@2", "input": [text]})
                assert answer.status_code == 200

            async def drift_due() -> bool:
                signals = (await client.get("/v1/admin/releases/signals/tiny", headers=ADMIN)).json()
                return "drift" in signals["due"]

            await until(drift_due, timeout_s=30)
            signals = (await client.get("/v1/admin/releases/signals/tiny", headers=ADMIN)).json()
            assert signals["drift_mmd"] > 0 and signals["drift_streak"] >= 3
            assert metric(await read_metrics(client), "embedserve_drift_alerts_total", model="tiny") == 1

            # A release starts: the drift it was started for is not a reason to start another.
            assert (await claim(client, "r-drift", "drift")).status_code == 201
            signals = (await client.get("/v1/admin/releases/signals/tiny", headers=ADMIN)).json()
            assert signals["due"] == [] and signals["release_running"] == "r-drift"
            found = await read_metrics(client)
            assert metric(found, "embedserve_release_running", model="tiny") == 1
