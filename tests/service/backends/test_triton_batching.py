"""Batches in flight to Triton: a version's batches overlap in Triton instead of waiting for each round trip.

The ``sleepy`` model (conftest.py) sleeps SLEEPY_S per request on SLEEPY_INSTANCES instances and records
when each request ran, so how many of the gateway's batches overlapped in Triton is read, not guessed.
"""

import asyncio
import time
from pathlib import Path

import pytest

from service.settings import Settings
from tests.helpers import metric, read_metrics, running_gateway
from tests.service.backends.conftest import SLEEPY_INSTANCES, SLEEPY_S, SleepyLog, most_at_once, triton_settings
from tests.triton_server import LocalTriton
from trainer.data.sample_text import sentences

SLEEPY = "sleepy@1"


async def timed_batches(settings: Settings, sleepy_log: SleepyLog, texts: list[str]) -> tuple[float, int, int]:
    """Embed ``texts`` (one batch each) through ``settings``: (seconds taken, Triton requests, most at once)."""
    async with running_gateway(settings.model_copy(update={"max_batch_size": 1})) as (_, gateway):
        started = time.time()
        response = await gateway.post("/v1/embeddings", json={"input": texts, "model": SLEEPY})
        took = time.time() - started
        assert response.status_code == 200, response.text
    spans = sleepy_log.since(started)
    return took, len(spans), most_at_once(spans)


async def test_n_batches_in_flight_overlap_in_triton_and_give_about_n_times_the_throughput(
    settings: Settings, triton: LocalTriton, gateway_repository: Path, sleepy_log: SleepyLog
) -> None:
    texts = list(sentences()[400 : 400 + 2 * SLEEPY_INSTANCES])
    one = triton_settings(settings, triton, model_repository=gateway_repository, triton_batches_in_flight=1)
    took_one, requests_one, overlap_one = await timed_batches(one, sleepy_log, texts)
    several = triton_settings(
        settings, triton, model_repository=gateway_repository, triton_batches_in_flight=SLEEPY_INSTANCES
    )
    took_several, requests_several, overlap_several = await timed_batches(several, sleepy_log, texts)

    assert requests_one == requests_several == len(texts)  # one Triton request per batch, in both runs
    # What Triton saw: with one batch in flight the requests ran one after another; with N, N at a time.
    assert overlap_one == 1
    assert overlap_several == SLEEPY_INSTANCES
    assert took_one >= len(texts) * SLEEPY_S
    # ~N times the throughput (here 4x: 8 sleeps in a row vs 2 rounds of 4); half of that is a generous floor.
    assert took_one / took_several >= SLEEPY_INSTANCES / 2, (took_one, took_several)


async def test_batches_still_fill_while_others_are_in_flight(
    settings: Settings, triton: LocalTriton, gateway_repository: Path
) -> None:
    two = triton_settings(
        settings, triton, model_repository=gateway_repository, triton_batches_in_flight=2, max_batch_size=8
    )
    async with running_gateway(two) as (_, gateway):

        async def embed(text: str) -> int:
            response = await gateway.post("/v1/embeddings", json={"input": text, "model": SLEEPY})
            return response.status_code

        async def in_flight() -> float:
            return metric(await read_metrics(gateway), "embedserve_batches_in_flight", model="sleepy", version="1")

        async def until_in_flight(count: int) -> None:
            deadline = time.monotonic() + 30
            while await in_flight() < count:
                assert time.monotonic() < deadline, f"never {count} batches in flight"
                await asyncio.sleep(0.01)

        first = []
        for slot, text in enumerate(("first", "second"), start=1):  # both slots taken, each by a batch of one
            first.append(asyncio.ensure_future(embed(text)))
            await until_in_flight(slot)
        # Eight more arrive while both run (each sleeps SLEEPY_S): they wait in the queue and leave as one batch.
        later = [asyncio.ensure_future(embed(f"later {i}")) for i in range(8)]
        assert await asyncio.gather(*first, *later) == [200] * 10
        found = await read_metrics(gateway)
    assert metric(found, "embedserve_batch_size_count", model="sleepy", version="1") == 3
    assert metric(found, "embedserve_batch_size_sum", model="sleepy", version="1") == 10
    assert metric(found, "embedserve_batches_in_flight", model="sleepy", version="1") == 0


@pytest.mark.parametrize(("backend", "batches"), [("triton", 1), ("onnx", 10)])
async def test_triton_batches_have_their_own_token_budget(
    backend: str, batches: int, settings: Settings, triton: LocalTriton
) -> None:
    # The CPU budget is too small for two inputs; Triton's takes them all.
    budgets = {"max_batch_tokens": 8, "triton_max_batch_tokens": 100_000, "max_batch_size": 64, "max_wait_ms": 50.0}
    configured = (
        triton_settings(settings, triton, **budgets)
        if backend == "triton"
        else settings.model_copy(update={"cache_enabled": False, **budgets})
    )
    texts = list(sentences()[500:510])
    async with running_gateway(configured) as (_, gateway):
        response = await gateway.post("/v1/embeddings", json={"input": texts, "model": "tiny@1"})
        assert response.status_code == 200
        found = await read_metrics(gateway)
    assert metric(found, "embedserve_batch_size_count", model="tiny", version="1") == batches
    assert metric(found, "embedserve_batch_size_sum", model="tiny", version="1") == len(texts)
