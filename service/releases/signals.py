"""What makes a release due, as metrics and as an answer: the stable version's age and its drift streak.

Every replica refreshes, each ``interval_s``: ``embedserve_model_age_seconds{model,version,role}`` (since the
version's export), ``embedserve_release_running{model}`` and ``embedserve_release_budget_remaining{budget}``
from the shared ledger, and its own streak of drift recomputations in a row whose ``embedserve_drift_mmd`` of
the stable version was above the threshold. A running release of the model resets the streak: drift seen
while a retrain is already on its way starts nothing (the alert rules suppress drift alerts the same way).
"""

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from service.models.store import ModelStore
from service.periodic import Periodic
from service.releases.ledger import ReleaseLedger, ReleaseRecord, Trigger, running_release, usage
from service.rollouts.store import RolloutWatcher
from service.telemetry.drift import DriftMonitor

log = logging.getLogger(__name__)


class ReleaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.releases = Counter(
            "embedserve_release",
            "Releases that ended, by outcome (promoted, gate_refused, canary_failed, budget_exhausted, failed); "
            "counted by the replica the release reported its outcome to.",
            ["model", "outcome"],
            registry=registry,
        )
        self.triggers = Counter(
            "embedserve_release_triggers",
            "Release triggers, by what fired them and whether the budget let the release start "
            "(decision: started or refused).",
            ["model", "trigger", "decision"],
            registry=registry,
        )
        self.running = Gauge(
            "embedserve_release_running", "1 while a release of the model is running.", ["model"], registry=registry
        )
        self.budget_remaining = Gauge(
            "embedserve_release_budget_remaining",
            "What the release budget has left in its window: budget=releases (starts) or training_hours.",
            ["budget"],
            registry=registry,
        )
        self.drift_alerts = Counter(
            "embedserve_drift_alerts",
            "Times the stable version's drift MMD stayed above EMBEDSERVE_RELEASE_DRIFT_MMD for "
            "EMBEDSERVE_RELEASE_DRIFT_INTERVALS recomputations in a row (a drift trigger firing; none while a release "
            "of the model runs); each replica counts what it sees.",
            ["model"],
            registry=registry,
        )
        self.model_age = Gauge(
            "embedserve_model_age_seconds",
            "Seconds since the version was exported, for the stable and the canary version of each model.",
            ["model", "version", "role"],
            registry=registry,
        )


class ReleaseSignalsView(BaseModel):
    """Whether a release of the model is due, and the measures that say so (from the replica that answered)."""

    model: str
    stable_version: int | None
    stable_age_s: float | None = Field(description="Seconds since the stable version was exported.")
    max_age_s: float
    drift_mmd: float | None = Field(description="The stable version's last drift MMD on this replica.")
    drift_threshold: float
    drift_streak: int = Field(description="Drift recomputations in a row above the threshold, on this replica.")
    drift_intervals: int
    release_running: str | None = Field(description="The id of the model's running release, if any.")
    due: list[Trigger] = Field(description="Triggers that hold now: staleness, drift (none while a release runs).")


@dataclass
class _Streak:
    rounds_seen: int = 0
    above: int = 0


@dataclass
class ReleaseSignals:
    store: ModelStore
    rollouts: RolloutWatcher
    drift: DriftMonitor
    ledger: ReleaseLedger
    metrics: ReleaseMetrics
    max_age_s: float
    drift_threshold: float
    drift_intervals: int
    interval_s: float
    _streaks: dict[str, _Streak] = field(default_factory=dict)
    _records: list[ReleaseRecord] = field(default_factory=list)
    _aged: set[tuple[str, str, str]] = field(default_factory=set)
    _loop: Periodic | None = None

    def start(self) -> None:
        self._loop = Periodic("release-signals", self.interval_s, self.refresh)
        self._loop.start()

    async def close(self) -> None:
        if self._loop is not None:
            await self._loop.close()

    async def refresh(self) -> None:
        try:
            self._records = await self.ledger.records()
        except RedisError as error:  # keep the last known records; the gauges say what they said
            log.warning("release ledger unreadable", extra={"error": type(error).__name__})
        now = datetime.now(UTC)
        budget = self.ledger.budget
        used = usage(self._records, budget, now)
        self.metrics.budget_remaining.labels("releases").set(max(0, budget.max_releases - used.releases))
        self.metrics.budget_remaining.labels("training_hours").set(
            max(0.0, budget.max_training_hours - used.training_hours)
        )
        aged: set[tuple[str, str, str]] = set()
        for model in self.store.models():
            running = running_release(self._records, model, budget, now)
            self.metrics.running.labels(model).set(1 if running else 0)
            for role, version in (("stable", self.rollouts.stable_version(model)), ("canary", self._canary(model))):
                age = self._age(model, version, now)
                if age is not None:
                    labels = (model, str(version), role)
                    self.metrics.model_age.labels(*labels).set(age)
                    aged.add(labels)
            self._count_drift(model, running is not None)
        for labels in self._aged - aged:  # a version no longer stable or canary keeps no age series
            self.metrics.model_age.remove(*labels)
        self._aged = aged

    def _canary(self, model: str) -> int | None:
        state = self.rollouts.get(model)
        return state.canary_version if state is not None and state.active else None

    def _age(self, model: str, version: int | None, now: datetime) -> float | None:
        served = self.store.get(model, version) if version is not None else None
        return None if served is None else max(0.0, (now - served.manifest.created_at).total_seconds())

    def _count_drift(self, model: str, release_running: bool) -> None:
        streak = self._streaks.setdefault(model, _Streak())
        if release_running:
            streak.above = 0
            return
        if self.drift.rounds == streak.rounds_seen:
            return  # no recomputation since the last look
        streak.rounds_seen = self.drift.rounds
        mmd = self._drift_mmd(model)
        streak.above = streak.above + 1 if mmd is not None and mmd > self.drift_threshold else 0
        if streak.above == self.drift_intervals:
            self.metrics.drift_alerts.labels(model).inc()

    def _drift_mmd(self, model: str) -> float | None:
        stable = self.rollouts.stable_version(model)
        scores = self.drift.latest.get((model, stable)) if stable is not None else None
        return None if scores is None else scores.mmd

    def view(self, model: str) -> ReleaseSignalsView:
        now = datetime.now(UTC)
        stable = self.rollouts.stable_version(model)
        age = self._age(model, stable, now)
        running = running_release(self._records, model, self.ledger.budget, now)
        streak = self._streaks.get(model, _Streak()).above
        due: list[Trigger] = []
        if running is None and age is not None and age > self.max_age_s:
            due.append("staleness")
        if running is None and streak >= self.drift_intervals:
            due.append("drift")
        return ReleaseSignalsView(
            model=model,
            stable_version=stable,
            stable_age_s=age,
            max_age_s=self.max_age_s,
            drift_mmd=self._drift_mmd(model),
            drift_threshold=self.drift_threshold,
            drift_streak=streak,
            drift_intervals=self.drift_intervals,
            release_running=running.release_id if running else None,
            due=due,
        )

    def remember(self, record: ReleaseRecord) -> None:
        """A release claimed its place or reported: this replica knows before its next refresh."""
        self._records = [*(r for r in self._records if r.release_id != record.release_id), record]
        self.metrics.running.labels(record.model).set(1 if record.running else 0)
