"""Where rollout states live (in-process, or Redis shared by every replica) and each replica's copy of them.

Saves are compare-and-set on ``revision``: a save based on a stale read raises ``Conflict``. Each replica's
``RolloutWatcher`` re-reads every state every ``rollout_refresh_s``; when Redis is lost it keeps its last
known states, and it only ever routes to versions verified in this replica's ``ModelStore``.
"""

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import Conflict, ServiceUnavailable
from service.models.store import ModelStore
from service.periodic import Periodic
from service.rollouts.state import PHASES, RolloutState, adopt, choose_version

log = logging.getLogger(__name__)

# Seconds handed-over measures wait for the lease holder before they expire.
WINDOW_TTL_S = 600
_CONFLICT = "rollout of {model} changed since it was read (now revision {revision}); re-read it and retry."


class RolloutStore:
    """The interface: read one or all states, and save one with compare-and-set."""

    async def load(self, model: str) -> RolloutState | None:
        raise NotImplementedError

    async def load_all(self) -> dict[str, RolloutState]:
        raise NotImplementedError

    async def save(self, state: RolloutState) -> RolloutState:
        """Store ``state`` as revision ``state.revision + 1`` if the stored revision is still ``state.revision``
        (0 = none stored); else raise ``Conflict``. Returns what was stored."""
        raise NotImplementedError

    async def hold_lease(self, model: str, holder: str, ttl_s: float) -> bool:
        """Whether ``holder`` holds (now, for ``ttl_s``) the right to drive ``model``'s rollout: the one replica
        that judges the canary and steps, promotes or fails it."""
        raise NotImplementedError

    async def hand_over(self, model: str, version: int, window: str) -> None:
        """Give the lease holder this replica's interval measures of ``model@version`` (JSON)."""
        raise NotImplementedError

    async def handed_over(self, model: str, version: int) -> list[str]:
        """The measures other replicas handed over since the last call (each taken once)."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


class MemoryRolloutStore(RolloutStore):
    """States of this process only (no Redis configured): one replica, nothing to share."""

    def __init__(self) -> None:
        self._states: dict[str, RolloutState] = {}

    async def load(self, model: str) -> RolloutState | None:
        return self._states.get(model)

    async def load_all(self) -> dict[str, RolloutState]:
        return dict(self._states)

    async def save(self, state: RolloutState) -> RolloutState:
        current = self._states.get(state.model)
        revision = current.revision if current else 0
        if revision != state.revision:
            raise Conflict(_CONFLICT.format(model=state.model, revision=revision), code="revision_conflict")
        saved = state.model_copy(update={"revision": revision + 1})
        self._states[state.model] = saved
        return saved

    async def hold_lease(self, model: str, holder: str, ttl_s: float) -> bool:
        return True  # one process: it drives every rollout

    async def hand_over(self, model: str, version: int, window: str) -> None:
        return None  # nobody else to hand over to

    async def handed_over(self, model: str, version: int) -> list[str]:
        return []


# KEYS: state key, index set. ARGV: expected revision, new JSON, model. Returns -1 when stored, else the revision.
_SAVE_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
local revision = 0
if stored then revision = cjson.decode(stored)['revision'] end
if revision ~= tonumber(ARGV[1]) then return revision end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return -1
"""


# KEYS: lease key. ARGV: holder, ttl in ms. Returns 1 when the holder has (or took) the lease, else 0.
_LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisRolloutStore(RolloutStore):
    """One JSON value per model at ``{prefix}rollout:{model}``; the set ``{prefix}rollouts`` names the models,
    so a refresh reads them without scanning the (cache-filled) keyspace."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._save = redis.register_script(_SAVE_SCRIPT)
        self._lease = redis.register_script(_LEASE_SCRIPT)

    def _key(self, model: str) -> str:
        return f"{self._prefix}rollout:{model}"

    async def load(self, model: str) -> RolloutState | None:
        value = await self._redis.get(self._key(model))
        return None if value is None else RolloutState.model_validate_json(value)

    async def load_all(self) -> dict[str, RolloutState]:
        models = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in await self._redis.smembers(self._index))
        if not models:
            return {}
        values = await self._redis.mget([self._key(model) for model in models])
        states = (RolloutState.model_validate_json(v) for v in values if v is not None)
        return {state.model: state for state in states}

    @property
    def _index(self) -> str:
        return f"{self._prefix}rollouts"

    async def save(self, state: RolloutState) -> RolloutState:
        saved = state.model_copy(update={"revision": state.revision + 1})
        keys = [self._key(state.model), self._index]
        result = await self._save(keys=keys, args=[state.revision, saved.model_dump_json(), state.model])
        if int(result) != -1:
            raise Conflict(_CONFLICT.format(model=state.model, revision=int(result)), code="revision_conflict")
        return saved

    async def hold_lease(self, model: str, holder: str, ttl_s: float) -> bool:
        key = f"{self._prefix}rollout-lease:{model}"
        return int(await self._lease(keys=[key], args=[holder, max(1, int(ttl_s * 1000))])) == 1

    def _windows_key(self, model: str, version: int) -> str:
        return f"{self._prefix}rollout-windows:{model}:{version}"

    async def hand_over(self, model: str, version: int, window: str) -> None:
        key = self._windows_key(model, version)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, window)
            pipe.expire(key, WINDOW_TTL_S)  # a lease holder that never comes leaves nothing behind
            await pipe.execute()

    async def handed_over(self, model: str, version: int) -> list[str]:
        key = self._windows_key(model, version)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            values, _ = await pipe.execute()
        return [value.decode() if isinstance(value, bytes) else str(value) for value in values]

    async def close(self) -> None:
        await self._redis.aclose()


class RolloutMetrics:
    """``embedserve_rollout_weight{model,version}`` and ``embedserve_rollout_phase{model,version,phase}`` (version:
    the canary's, or the stable one's when there is no canary), plus the analysis loop's series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.weight = Gauge(
            "embedserve_rollout_weight",
            "Percent of a model's unpinned traffic routed to each version of its rollout.",
            ["model", "version"],
            registry=registry,
        )
        self.phase = Gauge(
            "embedserve_rollout_phase",
            "1 for the phase a model's rollout (of the labelled version) is in, else 0.",
            ["model", "version", "phase"],
            registry=registry,
        )
        self.analysis = Counter(
            "embedserve_rollout_analysis",
            "Judgements of a canary by the analysis loop, by result (pass, fail, wait).",
            ["model", "version", "result"],
            registry=registry,
        )
        self.agreement = Gauge(
            "embedserve_neighbour_agreement",
            "Mean top-10 nearest-neighbour overlap between the canary (version) and stable on sampled texts.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow = Counter(
            "embedserve_shadow_requests",
            "Requests mirrored to a canary, by outcome (ok, error, skipped when too many are in flight).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self._phase_version: dict[str, str] = {}
        self._versions: dict[str, set[str]] = {}

    def describe(self, state: RolloutState) -> None:
        weights = {str(state.stable_version): 100 - state.weight if state.active else 100}
        if state.canary_version is not None:
            weights[str(state.canary_version)] = state.weight if state.active else 0
        # A version that left the rollout (the old stable after a promotion) drops to 0 rather than keep its last value.
        for version in self._versions.get(state.model, set()) - weights.keys():
            weights[version] = 0
        self._versions[state.model] = set(weights)
        for version, weight in weights.items():
            self.weight.labels(state.model, version).set(weight)
        version = str(state.canary_version if state.canary_version is not None else state.stable_version)
        previous = self._phase_version.get(state.model)
        if previous is not None and previous != version:  # the previous rollout's series end at 0
            for phase in PHASES:
                self.phase.labels(state.model, previous, phase).set(0)
        self._phase_version[state.model] = version
        for phase in PHASES:
            self.phase.labels(state.model, version, phase).set(1 if phase == state.phase else 0)


class RolloutWatcher:
    """This replica's copy of every rollout state, refreshed in the background, and the routing it implies."""

    def __init__(
        self,
        store: RolloutStore,
        models: ModelStore,
        refresh_s: float = 1.0,
        metrics: RolloutMetrics | None = None,
        configured_stable: dict[str, int] | None = None,
    ) -> None:
        self.store = store
        self._models = models
        self._metrics = metrics
        self._configured_stable = configured_stable or {}
        self._disagreement_logged: set[str] = set()
        self._states: dict[str, RolloutState] = {}
        self._unservable_logged: set[tuple[str, int]] = set()
        self._failing = False
        self._loop = Periodic("rollout-watcher", refresh_s, self.refresh)

    def get(self, model: str) -> RolloutState | None:
        return self._states.get(model)

    def all(self) -> list[RolloutState]:
        return [self._states[model] for model in sorted(self._states)]

    def stable_version(self, model: str) -> int | None:
        """The rollout's stable version of ``model`` when there is a rollout and this replica can serve it."""
        state = self._states.get(model)
        if state is None or self._models.get(model, state.stable_version) is None:
            return None
        return state.stable_version

    def route(self, model: str, identity: str | None) -> int | None:
        """The version an unpinned request for ``model`` from the caller ``identity`` gets; None = no rollout
        here, use the default. Never a version this replica hasn't verified: an unservable canary sends
        everything to stable (and is logged)."""
        state = self._states.get(model)
        if state is None:
            return None
        chosen = choose_version(state, identity)
        if chosen != state.stable_version and self._models.get(model, chosen) is None:
            if (model, chosen) not in self._unservable_logged:
                self._unservable_logged.add((model, chosen))
                log.error(
                    "canary not verified on this replica: routing everything to stable",
                    extra={"model": model, "version": chosen, "stable_version": state.stable_version},
                )
            chosen = state.stable_version
        return chosen if self._models.get(model, chosen) is not None else None

    def _accept(self, state: RolloutState) -> None:
        current = self._states.get(state.model)
        if current is None or state.revision >= current.revision:
            self._states[state.model] = state
            if self._metrics is not None:
                self._metrics.describe(state)

    async def refresh(self) -> None:
        """Read every state once; on a Redis error keep the last known ones."""
        try:
            states = await self.store.load_all()
        except (RedisError, OSError, TimeoutError) as error:
            if not self._failing:
                log.warning(
                    "rollout refresh failed: keeping the last known states", extra={"error": type(error).__name__}
                )
            self._failing = True
            return
        if self._failing:
            log.warning("rollout refresh works again")
        self._failing = False
        for state in states.values():
            self._accept(state)
        await self._adopt_stable_versions(states)

    async def _adopt_stable_versions(self, states: dict[str, RolloutState]) -> None:
        """Record the stable version of each model served here that has no state yet: the
        EMBEDSERVE_STABLE_VERSIONS one, else the highest verified here. The first replica to serve a model
        decides for all, so a rolling deploy that adds a version moves no unpinned caller pod by pod."""
        for model in self._models.models():
            state = states.get(model)
            configured = self._configured_stable.get(model)
            if state is not None:
                if configured is not None and configured != state.stable_version:
                    self._log_disagreement(model, configured, state.stable_version)
                continue
            versions = self._models.versions_of(model)
            if configured is not None:
                stable, why = configured, "EMBEDSERVE_STABLE_VERSIONS"
            elif versions:
                stable, why = versions[-1].version, "the highest version verified by the first replica to serve it"
            else:
                continue
            reason = f"{model}@{stable} is the stable version: {why}"
            try:
                saved = await self.store.save(adopt(model, stable, reason, actor="gateway"))
            except Conflict:
                continue  # another replica recorded one first: the next refresh brings it
            except (RedisError, OSError, TimeoutError):
                return  # keep today's default (settings, else highest) until the store answers again
            self._accept(saved)
            log.info("stable version recorded", extra={"model": model, "version": stable})

    def _log_disagreement(self, model: str, configured: int, recorded: int) -> None:
        if model not in self._disagreement_logged:
            self._disagreement_logged.add(model)
            log.warning(
                "EMBEDSERVE_STABLE_VERSIONS differs from the shared stable version, which wins; "
                "change it with a rollout (PUT /v1/rollouts/{model})",
                extra={"model": model, "configured_version": configured, "stable_version": recorded},
            )

    async def update(self, model: str, change: Callable[[RolloutState | None], RolloutState]) -> RolloutState:
        """Read ``model``'s state from the store, apply ``change``, save it compare-and-set; seen here at once."""
        try:
            saved = await self.store.save(change(await self.store.load(model)))
        except (RedisError, OSError, TimeoutError) as error:
            raise ServiceUnavailable(f"rollout state store is unavailable ({type(error).__name__}); retry.") from None
        self._accept(saved)
        return saved

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()
        await self.store.close()
