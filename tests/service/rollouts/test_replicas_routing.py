"""Routing that never flaps for a caller, with two gateway processes on one Redis and one Milvus server:
a canary's share is a share of callers (routing key, else user, else API key), a caller without an
identity gets stable, and a rolling deploy that adds a version moves no unpinned caller."""

import shutil
import time
from collections import defaultdict
from pathlib import Path

import httpx

from loadtests.processes import MilvusLiteServer
from tests.helpers import metric, parse_metrics
from tests.replicas import gateways, replica_env

ADMIN_KEY = "replicas-admin-key"


def routing_env(repository: Path, milvus: MilvusLiteServer, prefix: str) -> dict[str, str]:
    return replica_env(
        repository,
        milvus.uri,
        prefix,
        EMBEDSERVE_ADMIN_API_KEY=ADMIN_KEY,
        EMBEDSERVE_ROLLOUT_REFRESH_S="0.2",
        EMBEDSERVE_LOG_LEVEL="WARNING",
    )


def identity_headers(kind: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(extra JSON body fields, headers) that make ``name`` the caller's identity of ``kind``."""
    if kind == "routing-key":
        return {}, {"x-routing-key": name}
    if kind == "user":
        return {"user": name}, {}
    return {}, {"Authorization": f"Bearer {name}"}  # an API key (not checked: EMBEDSERVE_API_KEYS is unset)


def test_a_canary_takes_a_share_of_callers_and_never_mixes_one_callers_versions(
    model_repository: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        **routing_env(model_repository, shared_milvus, shared_redis_prefix),
        "EMBEDSERVE_STABLE_VERSIONS": '{"tiny": 1}',
    }
    with gateways(2, env, tmp_path) as urls, httpx.Client(timeout=30) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        started = http.put(f"{urls[0]}/v1/rollouts/tiny", json={"canary_version": 2, "steps": [30, 100]}, headers=admin)
        assert started.status_code == 200, started.text
        assert started.json()["stable_version"] == 1
        deadline = time.monotonic() + 30
        for url in urls:  # both replicas route by the rollout (their own copy of it) before traffic starts
            while (
                metric(parse_metrics(http.get(f"{url}/metrics").text), "embedserve_rollout_weight", version="2") != 30
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)

        callers = [(kind, f"{kind}-{i}") for i, kind in enumerate(["routing-key", "user", "api-key"] * 17)][:50]
        seen: dict[str, set[str]] = defaultdict(set)
        for request in range(2_000):
            kind, name = callers[request % len(callers)]
            fields, headers = identity_headers(kind, name)
            body = {"model": "tiny", "input": f"text {request % 7}", **fields}
            answer = http.post(f"{urls[request % 2]}/v1/embeddings", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            seen[name].add(answer.headers["x-model-version"])
        assert all(len(versions) == 1 for versions in seen.values()), {n: v for n, v in seen.items() if len(v) > 1}
        on_canary = sum(versions == {"2"} for versions in seen.values()) / len(seen)
        assert 0.2 <= on_canary <= 0.4, on_canary
        assert {kind for kind, name in callers if seen[name] == {"2"}} == {"routing-key", "user", "api-key"}

        anonymous = {
            http.post(f"{urls[i % 2]}/v1/embeddings", json={"model": "tiny", "input": f"a {i}"}).headers[
                "x-model-version"
            ]
            for i in range(200)
        }
        assert anonymous == {"1"}


def test_a_rolling_deploy_that_adds_a_version_moves_no_unpinned_caller(
    model_repository: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str, tmp_path: Path
) -> None:
    # The old pods know tiny@1; the new pod also has tiny@2 (the highest). EMBEDSERVE_STABLE_VERSIONS is unset.
    old_repository = tmp_path / "old"
    shutil.copytree(model_repository, old_repository)
    shutil.rmtree(old_repository / "tiny" / "2")
    old_env = routing_env(old_repository, shared_milvus, shared_redis_prefix)
    new_env = routing_env(model_repository, shared_milvus, shared_redis_prefix)
    with httpx.Client(timeout=30) as http, gateways(1, old_env, tmp_path / "old-pod") as (old_pod,):
        first = http.post(f"{old_pod}/v1/embeddings", json={"model": "tiny", "input": "x"})
        assert first.headers["x-model-version"] == "1"
        with gateways(1, new_env, tmp_path / "new-pod") as (new_pod,):
            for url in (old_pod, new_pod):
                for caller in range(20):
                    body = {"model": "tiny", "input": "x", "user": f"caller-{caller}"}
                    assert http.post(f"{url}/v1/embeddings", json=body).headers["x-model-version"] == "1"
            cards = http.get(f"{new_pod}/v1/models").json()["data"]
            tiny = next(card for card in cards if card["id"] == "tiny")
            assert [v["version"] for v in tiny["versions"] if v["is_default"]] == [1]
            pinned = http.post(f"{new_pod}/v1/embeddings", json={"model": "tiny@2", "input": "x"})
            assert pinned.headers["x-model-version"] == "2"  # served, but only when asked for
            state = http.get(f"{new_pod}/v1/rollouts/tiny", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert (state.json()["stable_version"], state.json()["history"][0]["action"]) == (1, "adopt")


def test_stable_versions_names_the_version_recorded_first(
    model_repository: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        **routing_env(model_repository, shared_milvus, shared_redis_prefix),
        "EMBEDSERVE_STABLE_VERSIONS": '{"tiny": 1}',
    }
    with gateways(1, env, tmp_path) as (url,):
        answer = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "x", "user": "u"}, timeout=30)
        assert answer.headers["x-model-version"] == "1"
        state = httpx.get(f"{url}/v1/rollouts/tiny", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        assert "EMBEDSERVE_STABLE_VERSIONS" in state.json()["history"][0]["reason"]
