"""Batching, caching and backpressure, observed through the app's real ASGI stack and its metrics."""

import asyncio
import base64
import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from loadtests.processes import gateway
from service.settings import Settings
from tests.helpers import metric, queued_at_least, read_metrics, running_gateway, until
from trainer.data.sample_text import paragraphs, sentences


def decoded(body: dict) -> list[bytes]:
    return [base64.b64decode(item["embedding"]) for item in body["data"]]


async def test_concurrent_requests_are_batched_together(settings: Settings) -> None:
    no_cache = settings.model_copy(update={"cache_enabled": False, "max_wait_ms": 5.0})
    async with running_gateway(no_cache) as (_, client):
        texts = list(sentences()[:32])
        responses = await asyncio.gather(
            *(client.post("/v1/embeddings", json={"input": t, "model": "minilm"}) for t in texts)
        )
        assert all(r.status_code == 200 for r in responses)
        found = await read_metrics(client)
        batches = metric(found, "embedserve_batch_size_count", model="minilm", version="1")
        inputs = metric(found, "embedserve_batch_size_sum", model="minilm", version="1")
        assert inputs == 32
        assert batches < 32 / 2, f"{batches} batches for 32 concurrent requests: they were not batched"
        assert metric(found, "embedserve_batch_size_bucket", model="minilm", version="1", le="1.0") < batches


async def test_batches_group_inputs_by_length_to_limit_padding(settings: Settings) -> None:
    no_cache = settings.model_copy(update={"cache_enabled": False, "max_batch_size": 8, "max_batch_tokens": 8192})
    async with running_gateway(no_cache) as (_, client):
        # Short sentences and long paragraphs interleaved, in one request so they queue together.
        mixed = [text for pair in zip(sentences()[100:116], paragraphs()[:16], strict=True) for text in pair]
        response = await client.post("/v1/embeddings", json={"input": mixed, "model": "minilm"})
        assert response.status_code == 200
        found = await read_metrics(client)
        batches = metric(found, "embedserve_batch_padding_ratio_count", model="minilm", version="1")
        mean_padding = metric(found, "embedserve_batch_padding_ratio_sum", model="minilm", version="1") / batches
        assert batches == 4
        assert mean_padding < 0.35, f"mean padding {mean_padding:.2f}: short and long inputs were mixed"


async def accepted_exactly(client: httpx.AsyncClient, count: int) -> bool:
    """Whether the batcher has taken in ``count`` inputs: still queued, or put in a batch (one step moves both)."""
    found = await read_metrics(client)
    queued = metric(found, "embedserve_queue_depth", model="minilm")
    return queued + metric(found, "embedserve_batch_size_sum", model="minilm") == count


async def dropped_at_least(client: httpx.AsyncClient, count: int) -> bool:
    found = await read_metrics(client)
    return metric(found, "embedserve_batcher_dropped_inputs_total", model="minilm", reason="abandoned") >= count


async def test_a_full_queue_answers_429_with_retry_after(settings: Settings) -> None:
    # One lane (every request interactive) with a queue of 16.
    tight = settings.model_copy(
        update={"cache_enabled": False, "max_queue_inputs": 16, "max_batch_size": 2, "bulk_min_inputs": 1000}
    )
    async with running_gateway(tight) as (_, client):
        # An empty queue takes a request of any size; 128 paragraphs 2 at a time keep it over its limit of 16
        # for 24 more batches after its depth is seen at 64.
        big = client.post("/v1/embeddings", json={"input": list(paragraphs()[:128]), "model": "minilm"})
        first = asyncio.ensure_future(big)
        await until(lambda: queued_at_least(client, 64))
        refused = await client.post("/v1/embeddings", json={"input": "one more", "model": "minilm"})
        assert refused.status_code == 429
        # The queued inputs over the measured drain rate: ~60 paragraphs at tens a second.
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert (await first).status_code == 200
        after = await client.post("/v1/embeddings", json={"input": "one more", "model": "minilm"})
        assert after.status_code == 200
        found = await read_metrics(client)
        assert metric(found, "embedserve_rejected_requests_total", model="minilm", reason="queue_full") == 1
        assert metric(found, "embedserve_requests_total", model="minilm", status="429") == 1


async def test_past_the_deadline_is_a_504(settings: Settings) -> None:
    impatient = settings.model_copy(update={"cache_enabled": False, "request_timeout_s": 0.001})
    async with running_gateway(impatient) as (_, client):
        response = await client.post("/v1/embeddings", json={"input": list(paragraphs()[:50]), "model": "minilm"})
        assert response.status_code == 504
        assert "longer than" in response.json()["error"]["message"]
        found = await read_metrics(client)
        assert metric(found, "embedserve_rejected_requests_total", reason="timeout") == 1


async def test_a_cancelled_request_is_dropped_before_inference(settings: Settings) -> None:
    one_at_a_time = settings.model_copy(update={"cache_enabled": False, "max_batch_size": 2})
    async with running_gateway(one_at_a_time) as (app, client):
        embedder = app.state.embedder
        version = embedder.resolve("minilm")
        # 40 batches of paragraphs; two short inputs queued behind them are never the closest in length to the
        # oldest paragraph, so they wait until the paragraphs are done.
        busy = asyncio.ensure_future(embedder.embed(list(paragraphs()[:80]), version))
        await until(lambda: accepted_exactly(client, 80))  # tokenized off the loop: the short ones must come after
        abandoned = asyncio.ensure_future(embedder.embed(["nobody waits for this", "nor this"], version))
        await until(lambda: accepted_exactly(client, 82))
        abandoned.cancel()  # what the route does when the client disconnects
        await busy
        await until(lambda: dropped_at_least(client, 2))
        found = await read_metrics(client)
        assert metric(found, "embedserve_batch_size_sum", model="minilm") == 80
        assert metric(found, "embedserve_batcher_dropped_inputs_total", model="minilm", reason="abandoned") == 2


async def test_a_client_that_disconnects_has_its_inputs_dropped_before_inference(
    model_repository: Path, tmp_path: Path
) -> None:
    """Over real HTTP, to a gateway process: the client closes its connection while its inputs wait."""
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(tmp_path / "milvus.db"),
        "EMBEDSERVE_CACHE_ENABLED": "false",
        "EMBEDSERVE_MAX_BATCH_SIZE": "2",
    }
    with gateway(env, tmp_path / "gateway.log") as url:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            # 40 batches of paragraphs ahead of the short inputs (as in the test above).
            busy = asyncio.ensure_future(
                client.post("/v1/embeddings", json={"input": list(paragraphs()[:80]), "model": "minilm"})
            )
            await until(lambda: accepted_exactly(client, 80))
            address = urlsplit(url)
            _, writer = await asyncio.open_connection(address.hostname, address.port)
            body = json.dumps({"input": ["nobody waits for this", "nor this"], "model": "minilm"}).encode()
            head = "POST /v1/embeddings HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
            writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            await until(lambda: accepted_exactly(client, 82))
            writer.close()  # the client leaves
            await writer.wait_closed()
            assert (await busy).status_code == 200
            await until(lambda: dropped_at_least(client, 2))
            found = await read_metrics(client)
            assert metric(found, "embedserve_batch_size_sum", model="minilm") == 80
            assert metric(found, "embedserve_requests_total", model="minilm", status="499") == 1
            # The gateway goes on serving, and the inputs are computed for whoever asks again.
            again = await client.post("/v1/embeddings", json={"input": ["nobody waits for this"], "model": "minilm"})
            assert again.status_code == 200


async def test_identical_inputs_are_computed_once_within_and_across_requests(settings: Settings) -> None:
    no_cache = settings.model_copy(update={"cache_enabled": False})
    async with running_gateway(no_cache) as (app, client):
        same = "the same sentence, asked for many times"
        tokens = len(app.state.store.get("minilm", 1).tokenizer.encode([same], truncate=True)[0])
        within = await client.post("/v1/embeddings", json={"input": [same] * 5, "model": "minilm"})
        assert within.status_code == 200 and within.json()["usage"]["prompt_tokens"] == 5 * tokens
        vectors = np.array([d["embedding"] for d in within.json()["data"]])
        assert np.all(vectors == vectors[0])
        across = await asyncio.gather(
            *(client.post("/v1/embeddings", json={"input": [same, "other"], "model": "minilm"}) for _ in range(10))
        )
        assert all(r.status_code == 200 for r in across)
        found = await read_metrics(client)
        assert metric(found, "embedserve_batch_size_sum", model="minilm") == 1 + 2


async def test_cached_vectors_are_byte_identical_and_versions_never_share_entries(settings: Settings) -> None:
    async with running_gateway(settings) as (_, client):
        texts = ["cache me", "and me too"]
        computed = await client.post(
            "/v1/embeddings", json={"input": texts, "model": "tiny@1", "encoding_format": "base64"}
        )
        cached = await client.post(
            "/v1/embeddings", json={"input": texts, "model": "tiny@1", "encoding_format": "base64"}
        )
        assert decoded(cached.json()) == decoded(computed.json())
        assert cached.json()["usage"] == computed.json()["usage"]
        other = await client.post(
            "/v1/embeddings", json={"input": texts, "model": "tiny@2", "encoding_format": "base64"}
        )
        assert decoded(other.json()) != decoded(computed.json())
        found = await read_metrics(client)
        assert metric(found, "embedserve_cache_lookups_total", model="tiny", version="1", result="hit") == 2
        assert metric(found, "embedserve_cache_lookups_total", model="tiny", version="2", result="hit") == 0
        assert metric(found, "embedserve_batch_size_sum", model="tiny", version="2") == 2


def test_cache_entries_have_the_versions_shape() -> None:
    from service.embeddings.cache import decode_entry, encode_entry

    vector = np.arange(4, dtype=np.float32)
    entry = decode_entry(encode_entry(vector, 7), 4)
    assert entry is not None and entry.tokens == 7 and entry.vector.tobytes() == vector.tobytes()
    assert decode_entry(encode_entry(vector, 7), 8) is None  # another dimension: never trusted


async def test_a_batch_never_exceeds_the_token_budget(settings: Settings) -> None:
    budget = settings.model_copy(update={"cache_enabled": False, "max_batch_tokens": 512})
    async with running_gateway(budget) as (_, client):
        response = await client.post("/v1/embeddings", json={"input": list(paragraphs()[:16]), "model": "minilm"})
        assert response.status_code == 200
        found = await read_metrics(client)
        batches = metric(found, "embedserve_batch_padded_tokens_count", model="minilm")
        within = metric(found, "embedserve_batch_padded_tokens_bucket", model="minilm", le="512.0")
        assert batches >= 16 * 100 / 512  # ~170-token paragraphs: a few per batch
        assert within == batches
