"""Canary rollouts end to end with real versions of MiniLM, real traffic through the app and the analysis loop:
a healthy canary is stepped up and promoted with its collections; a bad or slow one is rolled back."""

import asyncio
import itertools
import json
import random
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from service.settings import Settings
from tests.helpers import metric, read_metrics, running_gateway
from trainer.data.sample_text import sentences
from trainer.encoder import from_scratch, packaged_minilm
from trainer.release.export import ExportRequest, export_version

ADMIN = {"Authorization": "Bearer canary-admin"}
# Judged every 2 s on at least 10 requests per version (traffic runs at 20/s, the canary starts at 50 %);
# two passes in a row step, two failures fail.
FAST_ANALYSIS: dict[str, Any] = {
    "enabled": True,
    "interval_s": 2.0,
    "passes_to_step": 2,
    "failures_to_rollback": 2,
    # Identical weights on a shared 2-core machine differ in P95 by chance, by any factor under load: latency
    # is judged only where it is the point (the slow canary's own 2x threshold).
    "thresholds": {"min_requests": 10, "max_p95_latency_ratio": 1000.0},
}


def export_random_minilm_shape(repository: Path, hidden: int, layers: int, heads: int, seed: int) -> Path:
    """A randomly initialised encoder with MiniLM's tokenizer as the next version of minilm."""
    encoder = from_scratch(
        vocab_size=30522, hidden_size=hidden, layers=layers, heads=heads, max_seq_length=256, seed=seed
    )
    request = ExportRequest(
        model="minilm",
        source=f"test:random-init {layers}x{hidden} seed={seed}",
        tokenizer_dir=packaged_minilm().path,
        validation_texts=list(sentences()[:64]),
    )
    return export_version(encoder, request, repository)


@pytest.fixture(scope="module")
def canary_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """minilm 1 (all-MiniLM-L6-v2); 2: a copy of 1's weights; 3: a random encoder of MiniLM's shape;
    4: a random encoder of BERT-base's shape (12 x 768), several times slower than MiniLM."""
    repository = tmp_path_factory.mktemp("canary_repository")
    shutil.copytree(model_repository / "minilm", repository / "minilm")
    copy = repository / "minilm" / "2"
    shutil.copytree(repository / "minilm" / "1", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(version=2, parent_version=1, source="test: a copy of minilm@1's weights")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    export_random_minilm_shape(repository, hidden=384, layers=6, heads=12, seed=3)
    export_random_minilm_shape(repository, hidden=768, layers=12, heads=12, seed=4)
    return repository


@asynccontextmanager
async def gateway(repository: Path, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = Settings(
        model_repository=repository,
        milvus_uri=str(tmp_path / "milvus.db"),
        allow_anonymous_writes=True,
        admin_api_key=SecretStr("canary-admin"),
        stable_versions={"minilm": 1},
        reindex_batch_size=64,
    )
    async with running_gateway(settings) as running:
        yield running


@dataclass
class Traffic:
    """What ``traffic`` got back: answers counted by the version that served them, and every request that did
    not get a 200 (its status and body, or the exception)."""

    served: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@contextmanager
def traffic(client: httpx.AsyncClient, per_second: float = 20, clients: int | None = None) -> Iterator[Traffic]:
    """Requests for minilm with fresh texts and random routing keys until the block ends. By default they are sent
    at a steady rate whatever the answers' latency (as independent clients do); with ``clients``, that many
    clients each send their next request when the last is answered, so a version slower than the offered rate
    cannot pile up a backlog on a slow machine. The block fails if any answer was not a 200; requests still in
    flight when it ends are cancelled, which is not a failure."""
    sent = Traffic()
    pool = sentences()
    rng = random.Random(11)
    numbers = itertools.count(1)

    async def one(number: int) -> None:
        texts = [f"{rng.choice(pool)} #{number}-{i}" for i in range(rng.randint(1, 3))]
        body = {"model": "minilm", "input": texts, "user": f"user-{rng.getrandbits(48):x}"}
        try:
            response = await client.post("/v1/embeddings", json=body)
        except Exception as error:  # a cancellation is a BaseException: not caught, not counted
            sent.failures.append(f"request {number}: {error!r}")
            return
        if response.status_code != 200:
            sent.failures.append(f"request {number}: {response.status_code} {response.text}")
            return
        version = response.headers["x-model-version"]
        sent.served[version] = sent.served.get(version, 0) + 1

    async def at_a_steady_rate() -> None:
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                task = asyncio.create_task(one(next(numbers)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(1 / per_second)
        finally:
            for task in in_flight:
                task.cancel()

    async def one_after_another() -> None:
        while True:
            await one(next(numbers))

    async def send() -> None:
        if clients is None:
            await at_a_steady_rate()
        else:
            await asyncio.gather(*(one_after_another() for _ in range(clients)))

    sender = asyncio.create_task(send())
    try:
        yield sent
    finally:
        sender.cancel()
    # Only when the block itself succeeded (an exception from it propagates from the yield, unmasked).
    assert not sent.failures, f"{len(sent.failures)} of the traffic's requests failed: {sent.failures[:5]}"


async def rollout(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/rollouts/minilm", headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_until_phase(client: httpx.AsyncClient, phases: set[str], timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (state := await rollout(client))["phase"] not in phases:
        assert time.monotonic() < deadline, f"{state['phase']} at {state['weight']} %: {state['last_judgement']}"
        await asyncio.sleep(0.25)
    return state


async def start_canary(client: httpx.AsyncClient, version: int, **analysis: Any) -> None:
    body = {"canary_version": version, "steps": [50, 100], "analysis": {**FAST_ANALYSIS, **analysis}}
    started = await client.put("/v1/rollouts/minilm", json=body, headers=ADMIN)
    assert started.status_code == 200, started.text


async def test_a_healthy_canary_steps_up_and_is_promoted_with_its_collections(
    canary_repository: Path, tmp_path: Path
) -> None:
    async with gateway(canary_repository, tmp_path) as (_, client):
        created = await client.put("/v1/collections/docs", json={"model": "minilm"})
        assert created.status_code in (200, 201), created.text
        items = [{"id": f"d{i}", "text": text} for i, text in enumerate(sentences()[100:160])]
        assert (await client.post("/v1/collections/docs/items", json={"items": items})).status_code == 200
        await start_canary(client, 2)
        with traffic(client) as sent:
            state = await wait_until_phase(client, {"promoted", "failed", "rolled_back"})
        assert state["phase"] == "promoted", state["history"][-1]
        assert state["stable_version"] == 2 and state["canary_version"] is None
        actions = [(decision["action"], decision["to_weight"]) for decision in state["history"]]
        assert actions == [("adopt", 0), ("start", 50), ("step", 100), ("promoting", 100), ("promote", 0)]
        assert sent.served.get("2", 0) > 0
        # The collection followed the canary before it became stable, and answers from it.
        collection = (await client.get("/v1/collections/docs")).json()
        assert (collection["version"], collection["state"], collection["items"]) == (2, "ready", 60)
        query = {"query": sentences()[107], "top_k": 1}
        search = await client.post("/v1/collections/docs/search", json=query)
        assert search.status_code == 200, search.text
        assert (search.json()["hits"][0]["id"], search.json()["model"]) == ("d7", "minilm@2")
        # Unpinned traffic now gets version 2.
        answer = await client.post("/v1/embeddings", json={"model": "minilm", "input": "after", "user": "u"})
        assert answer.headers["x-model-version"] == "2"
        found = await read_metrics(client)
        assert metric(found, "embedserve_rollout_analysis_total", model="minilm", version="2", result="pass") >= 4
        assert metric(found, "embedserve_neighbour_agreement", model="minilm", version="2") > 0.99
        assert metric(found, "embedserve_rollout_phase", model="minilm", version="2", phase="promoted") == 1


async def test_a_randomly_initialised_canary_is_rolled_back_for_its_neighbourhoods(
    canary_repository: Path, tmp_path: Path
) -> None:
    async with gateway(canary_repository, tmp_path) as (_, client):
        await start_canary(client, 3)
        with traffic(client):
            state = await wait_until_phase(client, {"promoted", "failed", "rolled_back"})
        assert (state["phase"], state["weight"], state["stable_version"]) == ("failed", 0, 1)
        decision = state["history"][-1]
        assert (decision["action"], decision["actor"]) == ("fail", "analysis")
        assert "neighbour agreement" in decision["reason"]
        assert [d["action"] for d in state["history"]] == ["adopt", "start", "fail"]  # never stepped up
        answers = [
            (await client.post("/v1/embeddings", json={"model": "minilm", "input": "x", "user": f"u{i}"}))
            for i in range(20)
        ]
        assert {answer.headers["x-model-version"] for answer in answers} == {"1"}


async def test_a_slow_canary_is_rolled_back_for_its_latency(canary_repository: Path, tmp_path: Path) -> None:
    async with gateway(canary_repository, tmp_path) as (_, client):
        # Judge latency alone (a random encoder's neighbourhoods would fail it first). Six clients one request
        # after another: the slow canary (several times MiniLM's compute) cannot build a backlog that times
        # requests out on a slow machine, as open-loop traffic did in CI; 5 requests judge an interval.
        thresholds = {
            **FAST_ANALYSIS["thresholds"],
            "max_p95_latency_ratio": 2.0,
            "min_neighbour_agreement": 0.0,
            "max_drift_mmd": 100.0,
            "min_requests": 5,
        }
        await start_canary(client, 4, thresholds=thresholds)
        with traffic(client, clients=6):
            state = await wait_until_phase(client, {"promoted", "failed", "rolled_back"})
        assert (state["phase"], state["weight"]) == ("failed", 0), json.dumps(state)
        reason = state["history"][-1]["reason"]
        assert "P95 latency" in reason and "neighbour" not in reason
        judgement = state["last_judgement"]
        assert judgement["canary_p95_s"] > 2.0 * judgement["stable_p95_s"]
