"""Work shed early and lanes that keep interactive requests moving while bulk work runs; a request past its
deadline keeps the batches it already paid for."""

import asyncio
import itertools
import time
from collections.abc import Awaitable

import httpx
import numpy as np
import pytest
from opentelemetry import context as otel_context

from service.embeddings.queue import InputQueue, LaneLimits, Origin, Pending, QueueLimits
from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch
from service.settings import Settings
from tests.helpers import metric, queued_at_least, read_metrics, running_gateway, until
from trainer.data.sample_text import paragraphs, sentences


async def test_interactive_requests_overtake_a_bulk_backlog(settings: Settings) -> None:
    lanes = settings.model_copy(update={"cache_enabled": False, "bulk_min_inputs": 16})
    async with running_gateway(lanes) as (_, client):
        backlog = list(paragraphs()) * 2  # 268 inputs of ~120 tokens: one per bulk batch on CPU, ~10 s of work
        bulk = asyncio.ensure_future(
            client.post(
                "/v1/embeddings", json={"input": [f"{t} #{i}" for i, t in enumerate(backlog)], "model": "minilm"}
            )
        )
        await until(lambda: queued_at_least(client, 200))
        for text in sentences()[:5]:  # one after another, each behind the whole backlog in a single queue
            answer = await client.post("/v1/embeddings", json={"input": text, "model": "minilm"})
            assert answer.status_code == 200
        assert not bulk.done(), "the bulk request finished first: the interactive ones waited behind it"
        assert (await bulk).status_code == 200


async def test_a_full_bulk_lane_refuses_bulk_before_any_work_while_interactive_is_served(settings: Settings) -> None:
    lanes = settings.model_copy(update={"cache_enabled": False, "bulk_min_inputs": 16, "max_bulk_queue_inputs": 64})
    async with running_gateway(lanes) as (_, client):
        first = asyncio.ensure_future(
            client.post("/v1/embeddings", json={"input": list(paragraphs()[:128]), "model": "minilm"})
        )
        await until(lambda: queued_at_least(client, 100))
        before = await read_metrics(client)
        refused = await client.post("/v1/embeddings", json={"input": list(sentences()[:32]), "model": "minilm"})
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 30
        after = await read_metrics(client)
        # Refused before its inputs were hashed and looked up in the cache, or tokenised.
        assert metric(after, "embedserve_cache_lookups_total") == metric(before, "embedserve_cache_lookups_total")
        served = await client.post("/v1/embeddings", json={"input": "an interactive request", "model": "minilm"})
        assert served.status_code == 200
        assert (await first).status_code == 200


async def test_a_retry_after_a_deadline_pays_only_for_the_rest(settings: Settings) -> None:
    # 400 distinct paragraphs (~110 tokens): several seconds of CPU work, far past the deadline below.
    texts = [f"{text} ({round_})" for round_ in range(3) for text in paragraphs()][:400]
    own = settings.model_copy()  # changed below: the embedder reads the deadline per request
    async with running_gateway(own) as (_, client):
        own.request_timeout_s = 1.0
        timed_out = await client.post("/v1/embeddings", json={"input": texts, "model": "minilm"})
        assert timed_out.status_code == 504
        paid = metric(await read_metrics(client), "embedserve_batch_size_sum", model="minilm")
        assert 0 < paid < len(texts)
        own.request_timeout_s = 120.0
        retried = await client.post("/v1/embeddings", json={"input": texts, "model": "minilm"})
        assert retried.status_code == 200
        found = await read_metrics(client)
        hits = metric(found, "embedserve_cache_lookups_total", model="minilm", layer="memory", result="hit")
        assert hits >= paid - 32  # what the first request computed (a batch cut short by the deadline aside)
        assert metric(found, "embedserve_batch_size_sum", model="minilm") <= len(texts) + 32


def test_bulk_owed_turns_stay_bounded_after_a_long_interactive_stretch() -> None:
    """An hour in which bulk had little to do while interactive kept running must not owe bulk a long run of
    turns afterwards: the share is kept over recent batches."""
    limits = QueueLimits(LaneLimits(32, 512, 512), LaneLimits(32, 256, 8192), bulk_share=0.25, max_wait_ms=0.0)
    queue = InputQueue(limits)
    for _ in range(3600):  # interactive batches while bulk waited (its batches too few to count)
        queue.drained("interactive", 4, 0.01, 1, contended=True)
    loop = asyncio.new_event_loop()
    try:
        waiting = [Pending([101, 7, 102], loop.create_future(), Origin(otel_context.get_current())) for _ in range(8)]
        queue.push(waiting[:4], "interactive")
        queue.push(waiting[4:], "bulk")
        turns = []
        for _ in range(20):
            lane = queue.next_lane()
            assert lane is not None
            turns.append(lane)
            queue.drained(lane, 1, 0.01 if lane == "interactive" else 0.04, 1, contended=True)
        assert turns.count("bulk") <= 10 and "interactive" in turns[:5]  # bulk gets its share, not a backlog of it
    finally:
        loop.close()


async def test_in_process_a_bulk_batch_runs_alone_while_interactive_batches_run_side_by_side(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    lanes = settings.model_copy(update={"cache_enabled": False, "bulk_min_inputs": 16, "inference_threads": 2})
    async with running_gateway(lanes) as (app, client):
        backend = app.state.backend
        assert backend.batches_in_flight == 2
        runs: list[tuple[float, float, bool]] = []  # start, end, bulk (rows of paragraphs, not of a few words)
        embed = backend.embed

        async def recorded(version: ModelVersion, batch: TokenBatch) -> np.ndarray:
            started = time.monotonic()
            await asyncio.sleep(0.05)  # long enough for a next batch to start beside this one, where it may
            vectors = await embed(version, batch)
            runs.append((started, time.monotonic(), batch.input_ids.shape[1] > 40))
            return vectors

        monkeypatch.setattr(backend, "embed", recorded)

        def one(text: str) -> Awaitable[httpx.Response]:
            return client.post("/v1/embeddings", json={"input": text, "model": "tiny"})

        first = asyncio.ensure_future(one(sentences()[0]))
        await asyncio.sleep(0.02)  # its batch is running: the next requests form the next batch
        interactive = [*await asyncio.gather(*(one(text) for text in sentences()[1:8])), await first]
        assert all(answer.status_code == 200 for answer in interactive)
        assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(runs, 2)), "never side by side"
        runs.clear()
        bulk = asyncio.ensure_future(
            client.post("/v1/embeddings", json={"input": list(paragraphs()[:48]), "model": "tiny"})
        )
        await until(lambda: queued_at_least(client, 8, model="tiny"))
        interactive = await asyncio.gather(*(one(f"a short query, number {i}") for i in range(8)))
        assert (await bulk).status_code == 200 and all(answer.status_code == 200 for answer in interactive)
    bulk_runs = [run for run in runs if run[2]]
    assert bulk_runs and len(bulk_runs) < len(runs)
    for run in bulk_runs:  # alone: every thread for it, and no interactive batch behind two bulk ones
        assert not any(other is not run and other[0] < run[1] and run[0] < other[1] for other in runs)
