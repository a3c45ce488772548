"""How gateway replicas agree on collections: holds on a collection, the catalog's version of each collection, and
the lease of the one replica that drives a re-index.

- A **hold** is shared (writes of items, which run side by side) or exclusive (a catalog change: create, drop,
  re-index start, a re-index batch, the cut-over; and every write while a re-index runs). No catalog change of a
  collection happens while any hold on it is held, so what a holder read of the catalog stays true until it lets
  go. An exclusive hold waits for the shared ones to end and keeps new ones out meanwhile.
- Each catalog change gets a new **version** of its collection (``changed``); a replica compares its copy's version
  with the current one before using it, and re-reads the record from Milvus when they differ.
- A re-index **lease**: the replica holding it copies, the others leave that re-index alone.

With Redis (``EMBEDSERVE_REDIS_URL``) every replica sharing the key prefix shares these. Without it there is one
replica by definition (rollout state is per process too): holds are this process's locks, versions never
change, and this process drives every re-index.
"""

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import ServiceUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)

# The longest a request waits for a hold before it gets a 503 saying to retry.
HOLD_WAIT_S = 30.0
_POLL_S = (0.005, 0.01, 0.02, 0.05)


class Coordination:
    """One process on its own (no Redis): holds are in-process locks, one per collection."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def holding(self, name: str, exclusive: bool) -> AsyncIterator[int]:
        """Hold collection ``name`` (shared, or ``exclusive``); yields its catalog version as of the hold.
        Raises ``ServiceUnavailable`` when it cannot be had within ``HOLD_WAIT_S``."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # writes to one collection go one at a time in one process, as before replicas
            yield 0

    async def version(self, name: str) -> int | None:
        """``name``'s current catalog version (0: never changed); None when it cannot be known now."""
        return 0

    async def versions(self) -> dict[str, int] | None:
        """Every collection's catalog version that is not 0; None when they cannot be known now."""
        return {}

    async def changed(self, name: str) -> int:
        """Give ``name`` a new version (after changing its record, holding it exclusively); the new version."""
        return 0

    async def lead_reindex(self, name: str) -> bool:
        """Take or renew the lease to drive ``name``'s re-index; whether this replica holds it."""
        return True

    async def release_reindex(self, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


# KEYS: exclusive, writers, versions. ARGV: token, ttl ms, name. -1: an exclusive hold is held or awaited.
_SHARED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
"""
# Same keys and arguments. -2: another exclusive hold is held or awaited; -1: claimed, shared holds still run.
_EXCLUSIVE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -2 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
if redis.call('ZCARD', KEYS[2]) > 0 then return -1 end
return tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
"""
# KEYS: writers. ARGV: token, ttl ms. 1 when the shared hold was still there (and is renewed).
_RENEW_SHARED = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: a key whose value names its holder. ARGV: holder, ttl ms. 1 when it is (now, for ttl) the holder's.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: a key whose value names its holder. ARGV: holder.
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: clock, versions. ARGV: name, where a new clock starts. Versions come from one clock that starts at a random
# value, so a Redis that lost its data never hands out a version a replica already holds for older content.
_CHANGED = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[2]) end
local version = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], version)
return version
"""
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class RedisCoordination(Coordination):
    """Holds, versions and leases in Redis, under ``{prefix}collection-...`` keys. Holds and leases expire
    ``lease_s`` after their last renewal, so a replica that dies holding one holds up the others that long."""

    def __init__(self, redis: Redis, prefix: str, lease_s: float, retry_after_s: float) -> None:
        super().__init__()
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, int(lease_s * 1000))
        self._retry_after_s = retry_after_s
        self.replica = uuid.uuid4().hex  # this replica's name on the re-index leases it holds
        self._shared = redis.register_script(_SHARED)
        self._exclusive = redis.register_script(_EXCLUSIVE)
        self._renew_shared = redis.register_script(_RENEW_SHARED)
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._changed = redis.register_script(_CHANGED)
        self._versions_key = f"{prefix}collections"
        self._unreachable_until = 0.0

    def _keys(self, name: str) -> list[str]:
        return [f"{self._prefix}collection-exclusive:{name}", f"{self._prefix}collection-writers:{name}"]

    def _unavailable(self, error: BaseException) -> ServiceUnavailable:
        log.warning("redis unavailable for collections", extra={"error": type(error).__name__})
        return ServiceUnavailable(
            f"Redis, which the gateway replicas share collection changes through, is unavailable "
            f"({type(error).__name__}); retry (collection writes and changes wait for it, searches go on)."
        )

    @contextlib.asynccontextmanager
    async def holding(self, name: str, exclusive: bool) -> AsyncIterator[int]:
        token = uuid.uuid4().hex
        exclusive_key, writers_key = self._keys(name)
        script = self._exclusive if exclusive else self._shared
        keys = [exclusive_key, writers_key, self._versions_key]
        deadline = time.monotonic() + HOLD_WAIT_S
        attempt = 0
        try:
            while True:
                try:
                    result = int(await script(keys=keys, args=[token, self._ttl_ms, name]))
                except _REDIS_ERRORS as error:
                    raise self._unavailable(error) from None
                if result >= 0:
                    break
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"collection '{name}' stayed busy for {HOLD_WAIT_S:.0f} s (another replica is changing it: a "
                        "re-index cut-over, a drop); retry."
                    )
                await asyncio.sleep(_POLL_S[min(attempt, len(_POLL_S) - 1)])
                attempt += 1
        except BaseException:
            # An exclusive claim made while waiting must not keep shared holds out; a shared hold may have been
            # taken by a call whose answer was lost.
            await self._let_go(name, token, exclusive)
            raise
        renewal = asyncio.create_task(self._renew(name, token, exclusive))
        try:
            yield result
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await self._let_go(name, token, exclusive)

    async def _renew(self, name: str, token: str, exclusive: bool) -> None:
        exclusive_key, writers_key = self._keys(name)
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                if exclusive:
                    held = await self._take(keys=[exclusive_key], args=[token, self._ttl_ms])
                else:
                    held = await self._renew_shared(keys=[writers_key], args=[token, self._ttl_ms])
            except _REDIS_ERRORS as error:
                log.warning("collection hold not renewed", extra={"collection": name, "error": type(error).__name__})
                continue
            if not int(held):
                log.error("collection hold expired while held", extra={"collection": name, "exclusive": exclusive})
                return

    async def _let_go(self, name: str, token: str, exclusive: bool) -> None:
        exclusive_key, writers_key = self._keys(name)
        try:
            if exclusive:
                await self._give_back(keys=[exclusive_key], args=[token])
            else:
                await self._redis.zrem(writers_key, token)
        except _REDIS_ERRORS as error:  # it expires by itself
            log.warning("collection hold not released", extra={"collection": name, "error": type(error).__name__})

    async def version(self, name: str) -> int | None:
        if time.monotonic() < self._unreachable_until:
            return None
        try:
            value = await self._redis.hget(self._versions_key, name)
        except _REDIS_ERRORS as error:
            self._unreachable(error)
            return None
        return 0 if value is None else int(value)

    async def versions(self) -> dict[str, int] | None:
        if time.monotonic() < self._unreachable_until:
            return None
        try:
            values = await self._redis.hgetall(self._versions_key)
        except _REDIS_ERRORS as error:
            self._unreachable(error)
            return None
        return {_text(name): int(value) for name, value in values.items()}

    def _unreachable(self, error: BaseException) -> None:
        """Reads use this replica's copy of the catalog for ``retry_after_s`` instead of waiting on Redis."""
        self._unreachable_until = time.monotonic() + self._retry_after_s
        log.warning(
            "redis unavailable: collections served from this replica's copy of the catalog",
            extra={"error": type(error).__name__, "retry_s": self._retry_after_s},
        )

    async def changed(self, name: str) -> int:
        keys = [f"{self._prefix}collections-clock", self._versions_key]
        try:
            return int(await self._changed(keys=keys, args=[name, random.randrange(1 << 40)]))
        except _REDIS_ERRORS as error:
            raise self._unavailable(error) from None

    async def lead_reindex(self, name: str) -> bool:
        key = f"{self._prefix}collection-reindex:{name}"
        try:
            return int(await self._take(keys=[key], args=[self.replica, self._ttl_ms])) == 1
        except _REDIS_ERRORS as error:
            raise self._unavailable(error) from None

    async def release_reindex(self, name: str) -> None:
        try:
            await self._give_back(keys=[f"{self._prefix}collection-reindex:{name}"], args=[self.replica])
        except _REDIS_ERRORS as error:  # it expires by itself
            log.warning("re-index lease not released", extra={"collection": name, "error": type(error).__name__})

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def create_coordination(settings: Settings) -> Coordination:
    """Redis when configured (what replicas share); else this process on its own."""
    if not settings.redis_url:
        return Coordination()
    timeout_s = settings.redis_timeout_ms / 1000
    redis = Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return RedisCoordination(redis, settings.redis_prefix, settings.vector_lease_s, settings.redis_retry_after_s)
