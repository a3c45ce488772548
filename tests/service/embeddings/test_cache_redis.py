"""The Redis layer of the cache: shared between gateways, and never a reason for a request to fail."""

import asyncio
import base64
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.asyncio import Redis

from service.embeddings.cache import CachedEmbedding, CircuitBreaker, EmbeddingCache, encode_entry, text_digest
from service.models.store import ModelStore
from service.models.tokenization import TextTokenizer
from service.settings import Settings
from service.telemetry.metrics import Metrics
from tests.conftest import SHARED_REDIS_URL, export_tiny
from tests.helpers import metric, private_settings, read_metrics, running_gateway
from tests.redis_server import PrivateRedis
from trainer.data.sample_text import sentences
from trainer.release.export import embed_with_onnx


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def wait_for(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_two_gateways_share_entries_through_redis(settings: Settings, shared_redis_prefix: str) -> None:
    shared = settings.model_copy(update={"redis_url": SHARED_REDIS_URL, "redis_prefix": shared_redis_prefix})
    body = {"input": ["shared between replicas"], "model": "tiny@1", "encoding_format": "base64"}
    async with running_gateway(shared) as (_, first):
        computed = (await first.post("/v1/embeddings", json=body)).json()
    stored = redis.Redis.from_url(SHARED_REDIS_URL).keys(f"{shared_redis_prefix}emb:*")
    assert len(stored) == 1 and b":tiny:1:" in stored[0]
    async with running_gateway(shared) as (_, second):
        from_redis = (await second.post("/v1/embeddings", json=body)).json()
        found = await read_metrics(second)
    assert from_redis["data"] == computed["data"]  # byte-identical base64
    assert metric(found, "embedserve_cache_lookups_total", layer="redis", result="hit") == 1
    assert metric(found, "embedserve_batch_size_count") == 0


async def test_a_version_exported_again_under_its_number_never_gets_the_old_ones_vectors(
    repository_copy: Path, shared_redis_prefix: str
) -> None:
    """Delete tiny@2, export other weights as tiny@2: the shared cache holds the old ones' vectors under the
    same model and number, and none of them is served (keys carry the version's content id)."""
    shared = private_settings(repository_copy).model_copy(
        update={"redis_url": SHARED_REDIS_URL, "redis_prefix": shared_redis_prefix}
    )
    texts = list(sentences()[:8])

    async def served(texts: list[str]) -> list[bytes]:
        async with running_gateway(shared) as (_, client):
            answers = [
                await client.post(
                    "/v1/embeddings", json={"input": text, "model": "tiny@2", "encoding_format": "base64"}
                )
                for text in texts
            ]
        return [base64.b64decode(answer.json()["data"][0]["embedding"]) for answer in answers]

    old = await served(texts)
    assert redis.Redis.from_url(SHARED_REDIS_URL).keys(f"{shared_redis_prefix}emb:tiny:2:*")
    shutil.rmtree(repository_copy / "tiny" / "2")
    assert export_tiny(repository_copy, seed=99).name == "2"
    new = await served(texts)
    version_dir = repository_copy / "tiny" / "2"
    tokenizer = TextTokenizer(version_dir / "tokenizer.json", 64)
    for text, old_bytes, new_bytes in zip(texts, old, new, strict=True):
        direct = embed_with_onnx(version_dir / "model.onnx", tokenizer, [text])[0].astype("<f4")
        assert new_bytes == direct.tobytes()  # the new weights' vector, bit for bit
        assert abs(float(np.frombuffer(old_bytes, "<f4") @ direct)) < 0.9  # and not the old weights' one


async def test_stopping_redis_keeps_requests_succeeding_and_restarting_brings_hits_back(
    settings: Settings, private_redis: PrivateRedis
) -> None:
    redis_only = settings.model_copy(
        update={
            "redis_url": private_redis.url,
            "cache_memory_bytes": 0,  # every hit must come from Redis
            "redis_retry_after_s": 0.5,
        }
    )
    async with running_gateway(redis_only) as (_, client):

        async def embed(text: str) -> int:
            return (await client.post("/v1/embeddings", json={"input": text, "model": "tiny@1"})).status_code

        async def redis_hits() -> float:
            return metric(await read_metrics(client), "embedserve_cache_lookups_total", layer="redis", result="hit")

        async def written() -> bool:
            return bool(redis.Redis.from_url(private_redis.url).keys("*"))

        assert await embed("before") == 200
        await wait_for(written)
        assert await embed("before") == 200
        assert await redis_hits() == 1

        private_redis.stop()
        statuses = [await embed(f"while redis is down {i}") for i in range(10)]
        assert statuses == [200] * 10
        found = await read_metrics(client)
        assert metric(found, "embedserve_redis_errors_total") >= 3
        assert metric(found, "embedserve_redis_circuit_open") == 1

        private_redis.start()
        await asyncio.sleep(0.6)  # past redis_retry_after_s: the next call probes Redis

        async def hit_again() -> bool:
            await embed("after")
            return await redis_hits() >= 2

        await wait_for(hit_again)
        assert metric(await read_metrics(client), "embedserve_redis_circuit_open") == 0


async def test_a_probe_cancelled_in_flight_does_not_leave_redis_skipped_for_good(
    model_repository: Path, private_redis: PrivateRedis
) -> None:
    """The half-open probe's request goes away while Redis is busy: its outcome is unknown, so the next
    request probes again instead of Redis being skipped until the process restarts."""
    version = ModelStore.scan(model_repository).get("tiny", 1)
    assert version is not None
    metrics = Metrics()
    cache = EmbeddingCache(
        metrics,
        l1_max_bytes=0,  # every hit comes from Redis
        redis=Redis.from_url(private_redis.url, socket_timeout=10),
        breaker=CircuitBreaker(failure_threshold=1, retry_after_s=0.2, metrics=metrics),
    )
    stored = CachedEmbedding(vector=np.ones(version.dimension, dtype=np.float32), tokens=3)
    digest = text_digest("stored")
    try:
        private_redis.stop()
        assert await cache.get_many(version, [digest]) == {}
        assert cache.breaker.is_open
        private_redis.start()
        redis.Redis.from_url(private_redis.url).set(
            f"embedserve:emb:tiny:1:{version.content_id}:{digest}", encode_entry(stored.vector, stored.tokens)
        )
        await asyncio.sleep(0.3)  # past retry_after_s: the next lookup is the probe
        assert private_redis.process is not None
        private_redis.process.send_signal(signal.SIGSTOP)  # Redis stops answering (its socket still accepts)
        try:
            probe = asyncio.create_task(cache.get_many(version, [digest]))
            await asyncio.sleep(0.3)
            assert not probe.done()
            probe.cancel()  # the client went away while its MGET waited on Redis
            with pytest.raises(asyncio.CancelledError):
                await probe
        finally:
            private_redis.process.send_signal(signal.SIGCONT)

        async def redis_answers() -> bool:
            return digest in await cache.get_many(version, [digest])

        await wait_for(redis_answers)
        assert not cache.breaker.is_open
    finally:
        await cache.close()
