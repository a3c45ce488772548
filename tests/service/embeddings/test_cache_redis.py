"""The Redis layer of the cache: shared between gateways, and never a reason for a request to fail."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.settings import Settings
from tests.conftest import SHARED_REDIS_URL
from tests.helpers import metric, read_metrics, running_gateway
from tests.redis_server import PrivateRedis


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
    stored = redis.Redis.from_url(SHARED_REDIS_URL).keys(f"{shared_redis_prefix}*")
    assert len(stored) == 1 and b":tiny:1:" in stored[0]
    async with running_gateway(shared) as (_, second):
        from_redis = (await second.post("/v1/embeddings", json=body)).json()
        found = await read_metrics(second)
    assert from_redis["data"] == computed["data"]  # byte-identical base64
    assert metric(found, "embedserve_cache_lookups_total", layer="redis", result="hit") == 1
    assert metric(found, "embedserve_batch_size_count") == 0


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
