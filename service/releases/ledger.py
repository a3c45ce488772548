"""The ledger of releases every replica shares (in-process, or one Redis hash) and the budget it enforces.

A release (``python -m trainer release``) claims a place here before it trains: at most ``max_releases`` may
start within the sliding window, the releases started in it may train ``max_training_hours`` together, and a
model has one release running at a time. Claims are idempotent by release id, so a release resumed after a
crash keeps its place instead of taking a second one. The decision is one pure function over the records;
Redis applies it inside an optimistic transaction (WATCH) so that two replicas can never both grant the last
place.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import WatchError

from service.errors import ApiError, Conflict, NotFound

log = logging.getLogger(__name__)

Trigger = Literal["manual", "schedule", "drift", "staleness"]
TRIGGERS: tuple[Trigger, ...] = ("manual", "schedule", "drift", "staleness")
Outcome = Literal["promoted", "gate_refused", "canary_failed", "budget_exhausted", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("promoted", "gate_refused", "canary_failed", "budget_exhausted", "failed")


class ReleaseRecord(BaseModel):
    """One release as the ledger knows it; the trainer reports its stage and, at the end, its outcome."""

    release_id: str
    model: str
    trigger: Trigger
    started_at: datetime
    stage: str = Field("claimed", description="The stage the release reported last.")
    version: int | None = Field(None, description="The version it exported, once exported.")
    training_hours: float = Field(0.0, ge=0, description="Hours of training it used (counted against the budget).")
    outcome: Outcome | None = None
    finished_at: datetime | None = None
    detail: str | None = Field(None, description="What the release said about its outcome (failed checks, error).")

    @property
    def running(self) -> bool:
        return self.outcome is None


@dataclass(frozen=True)
class Budget:
    max_releases: int
    max_training_hours: float
    window_s: float
    max_duration_s: float  # a release without an outcome blocks its model at most this long after it started


class BudgetExhausted(ApiError):
    """429: the release budget of the window is spent; ``retry_after_s`` says when a place frees."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "release_budget_exhausted"

    def __init__(self, message: str, *, budget: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.budget = budget
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ReleaseRunning(Conflict):
    code = "release_running"


@dataclass(frozen=True)
class Usage:
    """What the releases started within the window used."""

    releases: int
    training_hours: float


def usage(records: list[ReleaseRecord], budget: Budget, now: datetime) -> Usage:
    since = now - timedelta(seconds=budget.window_s)
    in_window = [r for r in records if r.started_at >= since]
    return Usage(len(in_window), sum(r.training_hours for r in in_window))


def running_release(records: list[ReleaseRecord], model: str, budget: Budget, now: datetime) -> ReleaseRecord | None:
    """The release of ``model`` that has not reported an outcome and started less than max_duration_s ago."""
    since = now - timedelta(seconds=budget.max_duration_s)
    running = [r for r in records if r.model == model and r.running and r.started_at >= since]
    return max(running, key=lambda r: r.started_at) if running else None


def check_claim(records: list[ReleaseRecord], model: str, budget: Budget, now: datetime) -> None:
    """Raise why a new release of ``model`` may not start now; return when it may."""
    running = running_release(records, model, budget, now)
    if running is not None:
        raise ReleaseRunning(
            f"release {running.release_id} of {model} is running (stage {running.stage}, started "
            f"{running.started_at.isoformat()}); resume it with the same --state-dir, or wait for its outcome.",
        )
    used = usage(records, budget, now)
    since = now - timedelta(seconds=budget.window_s)
    if used.releases >= budget.max_releases:
        started = sorted(r.started_at for r in records if r.started_at >= since)
        frees_at = started[0] + timedelta(seconds=budget.window_s) if started else now
        raise BudgetExhausted(
            f"release budget spent: {used.releases} of {budget.max_releases} releases allowed per "
            f"{budget.window_s / 3600:g} h have started; the next place frees at {frees_at.isoformat()} "
            "(EMBEDSERVE_RELEASE_MAX_PER_WINDOW, EMBEDSERVE_RELEASE_WINDOW_S).",
            budget="releases",
            retry_after_s=max(1, int((frees_at - now).total_seconds())),
        )
    if used.training_hours >= budget.max_training_hours:
        raise BudgetExhausted(
            f"training budget spent: the releases of the last {budget.window_s / 3600:g} h trained "
            f"{used.training_hours:.2f} h of {budget.max_training_hours:g} h allowed "
            "(EMBEDSERVE_RELEASE_MAX_TRAINING_HOURS).",
            budget="training_hours",
            retry_after_s=int(budget.window_s),
        )


def expired(records: list[ReleaseRecord], budget: Budget, now: datetime) -> list[ReleaseRecord]:
    """Records the ledger no longer needs: outside the window and no longer able to block their model."""
    since = now - timedelta(seconds=max(budget.window_s, budget.max_duration_s))
    return [r for r in records if r.started_at < since]


@dataclass(frozen=True)
class Claim:
    record: ReleaseRecord
    resumed: bool  # the release id had claimed its place before (a resumed release)
    training_hours_left: float
    expired: frozenset[str] = frozenset()  # ids of records the ledger drops with this claim (see ``expired``)


class ReleaseLedger:
    """The interface: claim a place, update a record, read every record."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    async def claim(self, release_id: str, model: str, trigger: Trigger) -> Claim:
        """Record a new release, or return the one this id claimed before; raise ReleaseRunning or
        BudgetExhausted when it may not start."""
        raise NotImplementedError

    async def update(self, release_id: str, **changes: object) -> tuple[ReleaseRecord, ReleaseRecord]:
        """Apply ``changes`` to the release's record; (before, after). NotFound for an unknown id."""
        raise NotImplementedError

    async def records(self) -> list[ReleaseRecord]:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def _decide(self, records: list[ReleaseRecord], release_id: str, model: str, trigger: Trigger) -> Claim:
        now = datetime.now(UTC)
        gone = {r.release_id for r in expired(records, self.budget, now)}
        live = [r for r in records if r.release_id not in gone]
        for record in live:
            if record.release_id == release_id:
                if record.model != model:
                    raise Conflict(f"release id {release_id} belongs to a release of {record.model}, not {model}.")
                return Claim(record, True, self._hours_left(live, now), frozenset(gone))
        check_claim(live, model, self.budget, now)
        record = ReleaseRecord(release_id=release_id, model=model, trigger=trigger, started_at=now)
        return Claim(record, False, self._hours_left(live, now), frozenset(gone))

    def _hours_left(self, records: list[ReleaseRecord], now: datetime) -> float:
        return max(0.0, self.budget.max_training_hours - usage(records, self.budget, now).training_hours)


def changed(before: ReleaseRecord, changes: dict[str, object]) -> ReleaseRecord:
    """``before`` with ``changes``; an outcome, once reported, stays (a repeated report of it changes nothing)."""
    outcome = changes.get("outcome")
    if before.outcome is not None and outcome is not None:
        if outcome != before.outcome:
            raise Conflict(f"release {before.release_id} already ended as {before.outcome}; an outcome is final.")
        changes = {key: value for key, value in changes.items() if key not in ("outcome", "finished_at")}
    return ReleaseRecord.model_validate({**before.model_dump(), **changes})


def _unknown(release_id: str) -> NotFound:
    return NotFound(f"no release {release_id} in the ledger; claim one with POST /v1/admin/releases.")


class MemoryReleaseLedger(ReleaseLedger):
    """The ledger of this process (no Redis configured): one replica."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)
        self._records: dict[str, ReleaseRecord] = {}

    async def claim(self, release_id: str, model: str, trigger: Trigger) -> Claim:
        claim = self._decide(list(self._records.values()), release_id, model, trigger)
        for gone in claim.expired:
            self._records.pop(gone, None)
        self._records[release_id] = claim.record
        return claim

    async def update(self, release_id: str, **changes: object) -> tuple[ReleaseRecord, ReleaseRecord]:
        before = self._records.get(release_id)
        if before is None:
            raise _unknown(release_id)
        after = changed(before, changes)
        self._records[release_id] = after
        return before, after

    async def records(self) -> list[ReleaseRecord]:
        return list(self._records.values())


class RedisReleaseLedger(ReleaseLedger):
    """Every record a field of the hash ``{prefix}releases`` (JSON); claims are WATCH/MULTI transactions."""

    def __init__(self, redis: Redis, prefix: str, budget: Budget) -> None:
        super().__init__(budget)
        self._redis = redis
        self._key = f"{prefix}releases"

    async def claim(self, release_id: str, model: str, trigger: Trigger) -> Claim:
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._key)
                    records = _parse(await pipe.hvals(self._key))
                    claim = self._decide(records, release_id, model, trigger)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for gone in claim.expired:
                        pipe.hdel(self._key, gone)
                    pipe.hset(self._key, release_id, claim.record.model_dump_json())
                    await pipe.execute()
                    return claim
                except WatchError:
                    continue  # another replica changed the ledger between the read and the write: decide again

    async def update(self, release_id: str, **changes: object) -> tuple[ReleaseRecord, ReleaseRecord]:
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._key)
                    raw = await pipe.hget(self._key, release_id)
                    if raw is None:
                        raise _unknown(release_id)
                    before = ReleaseRecord.model_validate_json(raw)
                    after = changed(before, changes)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self._key, release_id, after.model_dump_json())
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue

    async def records(self) -> list[ReleaseRecord]:
        return _parse(await self._redis.hvals(self._key))

    async def close(self) -> None:
        await self._redis.aclose()


def _parse(values: list[bytes | str]) -> list[ReleaseRecord]:
    records = []
    for value in values:
        try:
            records.append(ReleaseRecord.model_validate_json(value))
        except ValueError:
            log.warning("unreadable release record skipped", extra={"bytes": len(value)})
    return records
