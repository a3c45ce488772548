"""Canary rollouts between versions of one model: the state, the routing decision, and the operator's actions.

Pure and synchronous: nothing here does I/O. ``service.rollouts.store`` keeps the states (in-process or Redis)
and refreshes every replica's copy; the admin routes apply the actions below through it.
"""

import hashlib
import itertools
import random
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from service.errors import Conflict, InvalidRequest

Phase = Literal["progressing", "paused", "promoting", "promoted", "rolled_back", "failed"]
PHASES: tuple[Phase, ...] = ("progressing", "paused", "promoting", "promoted", "rolled_back", "failed")
# Phases in which the canary takes (a share of) traffic; the others have ended the rollout.
ACTIVE_PHASES: frozenset[Phase] = frozenset({"progressing", "paused", "promoting"})
BUCKETS = 10_000  # sticky buckets: a weight of 1 % is 100 of them
ADMIN_API = "admin-api"


class AnalysisThresholds(BaseModel):
    """Limits the canary must stay within, compared with stable; stored here, judged by the analysis loop."""

    max_error_rate: float = Field(0.01, ge=0, le=1, description="Highest share of canary requests that fail.")
    max_p95_latency_ratio: float = Field(1.5, gt=0, description="Highest canary P95 latency / stable P95 latency.")
    max_drift_mmd: float = Field(
        0.1,
        ge=0,
        description="Highest excess drift: the canary's kernel MMD (served vs its own reference) minus stable's "
        "(served vs its own reference), on the same traffic.",
    )
    min_neighbour_agreement: float = Field(
        0.7, ge=0, le=1, description="Lowest mean top-10 neighbour overlap between canary and stable."
    )
    min_requests: int = Field(100, ge=1, description="Canary requests needed in an interval to judge it at all.")


class AnalysisSettings(BaseModel):
    enabled: bool = Field(False, description="Step, promote and roll back automatically; off = operator only.")
    interval_s: float = Field(60.0, gt=0, description="Seconds between two judgements of the canary.")
    passes_to_step: int = Field(3, ge=1, description="Passed judgements in a row before the next step.")
    failures_to_rollback: int = Field(2, ge=1, description="Failed judgements in a row before the rollout fails.")
    max_wait_intervals: int = Field(
        10,
        ge=1,
        description="Judgements in a row that cannot judge (too little traffic or no sample, even with the "
        "waited intervals' measures added up) before the rollout fails closed.",
    )
    thresholds: AnalysisThresholds = Field(default_factory=AnalysisThresholds)


class Judgement(BaseModel):
    """One judgement of the analysis loop: what it measured over an interval and what it concluded."""

    at: datetime
    result: Literal["pass", "fail", "wait"]
    reason: str
    canary_requests: int = 0
    canary_error_rate: float | None = None
    stable_p95_s: float | None = None
    canary_p95_s: float | None = None
    drift_mmd: float | None = None
    stable_drift_mmd: float | None = None
    neighbour_agreement: float | None = None


class Decision(BaseModel):
    """One change of a rollout, by whom and why."""

    at: datetime
    actor: str
    action: str
    from_weight: int
    to_weight: int
    reason: str


class RolloutState(BaseModel):
    """The rollout of one model; ``revision`` grows by one with every saved change (compare-and-set)."""

    model: str
    stable_version: int
    canary_version: int | None = None
    weight: int = Field(0, ge=0, le=100, description="Percent of traffic routed to the canary.")
    steps: list[int] = Field(default_factory=list)
    phase: Phase = "progressing"
    shadow_percent: float = Field(0.0, ge=0, le=100, description="Percent of stable requests mirrored to the canary.")
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    history: list[Decision] = Field(default_factory=list)
    passes: int = Field(0, description="Judgements passed in a row at the current weight.")
    failures: int = Field(0, description="Judgements failed in a row.")
    waits: int = Field(0, description="Judgements in a row that could not judge the canary.")
    last_judgement: Judgement | None = None
    revision: int = 0

    @model_validator(mode="after")
    def _steps_climb(self) -> "RolloutState":
        check_steps(self.steps)
        return self

    @property
    def active(self) -> bool:
        return self.canary_version is not None and self.phase in ACTIVE_PHASES


def check_steps(steps: list[int]) -> None:
    """Weights climb strictly within 0..100; only the first may be 0 (the canary sees shadow traffic only)."""
    if any(not 0 <= step <= 100 for step in steps) or any(a >= b for a, b in itertools.pairwise(steps)):
        raise InvalidRequest(
            f"steps {steps} must climb strictly within 0..100, e.g. [5, 10, 25, 50, 100] "
            "(a first step of 0 mirrors traffic to the canary without serving from it).",
            param="steps",
        )


def bucket(model: str, identity: str) -> int:
    """The sticky bucket of a caller ``identity`` in [0, 10000): the first 8 bytes of sha256(model, identity)."""
    digest = hashlib.sha256(f"{model}\x00{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def choose_version(state: RolloutState, identity: str | None) -> int:
    """Stable or canary for one request of the caller ``identity`` (routing key, else user, else API key).
    A caller sees one version while the weight holds, and raising the weight only moves callers from stable to
    canary (its bucket stays put, the threshold rises): the canary's share is a share of callers, never of one
    caller's requests, so no caller gets vectors of two versions mixed. A request without an identity is
    served by stable."""
    if not state.active or state.canary_version is None or identity is None:
        return state.stable_version
    to_canary = bucket(state.model, identity) < state.weight * (BUCKETS // 100)
    return state.canary_version if to_canary else state.stable_version


def shadow(state: RolloutState, rng: random.Random) -> bool:
    """Whether to mirror this (stable-served) request to the canary; its answer is discarded."""
    return state.active and state.shadow_percent > 0 and rng.random() * 100 < state.shadow_percent


def _decided(
    state: RolloutState, action: str, to_weight: int, reason: str | None, actor: str, **changes: object
) -> RolloutState:
    decision = Decision(
        at=datetime.now(UTC),
        actor=actor,
        action=action,
        from_weight=state.weight,
        to_weight=to_weight,
        reason=reason or f"{action} by {actor}",
    )
    update = {
        "passes": 0,
        "failures": 0,
        "waits": 0,
        **changes,
        "weight": to_weight,
        "history": [*state.history, decision],
    }
    return state.model_copy(update=update)


def _require_active(state: RolloutState | None, model: str, action: str) -> RolloutState:
    if state is None or not state.active:
        phase = "no rollout" if state is None else f"its rollout is {state.phase}"
        raise Conflict(f"cannot {action} {model}: {phase}; start one with PUT /v1/rollouts/{model}.")
    return state


def start(
    current: RolloutState | None,
    model: str,
    stable_version: int,
    canary_version: int,
    steps: list[int],
    shadow_percent: float,
    analysis: AnalysisSettings,
    reason: str | None = None,
    actor: str = ADMIN_API,
) -> RolloutState:
    """A new rollout of ``canary_version`` at ``steps[0]`` percent; refused while another one is active."""
    if current is not None and current.active:
        raise Conflict(
            f"{model} is already rolling out version {current.canary_version} ({current.phase}); "
            "promote or roll it back first.",
        )
    if canary_version == stable_version:
        raise InvalidRequest(f"version {canary_version} is already {model}'s stable version.", param="canary_version")
    if not steps:
        raise InvalidRequest("steps is empty; give the canary weights to climb, e.g. [5, 25, 50, 100].", param="steps")
    check_steps(steps)
    if steps[0] == 0 and shadow_percent == 0:
        raise InvalidRequest(
            "a first step of 0 serves nothing from the canary; set shadow_percent to measure it on mirrored traffic.",
            param="shadow_percent",
        )
    base = RolloutState(
        model=model,
        stable_version=stable_version,
        weight=0,
        steps=steps,
        revision=current.revision if current else 0,
        history=current.history if current else [],
        last_judgement=None,
    )
    return _decided(
        base,
        "start",
        steps[0],
        reason or f"canary {model}@{canary_version} against stable {model}@{stable_version}",
        actor,
        canary_version=canary_version,
        phase="progressing",
        shadow_percent=shadow_percent,
        analysis=analysis,
    )


def adopt(model: str, stable_version: int, reason: str, actor: str) -> RolloutState:
    """The first state of a model that has none: ``stable_version`` serves every unpinned request (phase
    promoted, no canary), as after a promotion. The replicas agree on it through the store, so a version added
    to some of them later moves no caller: only a rollout changes the stable version."""
    state = RolloutState(model=model, stable_version=stable_version, phase="promoted")
    return _decided(state, "adopt", 0, reason, actor)


def begin_promotion(
    state: RolloutState | None, model: str, reason: str | None = None, actor: str = ADMIN_API
) -> RolloutState:
    """Phase promoting: the canary keeps its weight while the model's collections are re-indexed to it;
    ``promote`` ends it once they all are."""
    active = _require_active(state, model, "promote")
    if active.phase == "promoting":
        raise Conflict(f"{model} is already being promoted; watch GET /v1/rollouts/{model}.")
    return _decided(active, "promoting", active.weight, reason, actor, phase="promoting")


def promote(state: RolloutState | None, model: str, reason: str | None = None, actor: str = ADMIN_API) -> RolloutState:
    """The canary becomes the stable version (phase promoted): only once its collections have followed it."""
    active = _require_active(state, model, "promote")
    if active.phase != "promoting":
        raise Conflict(f"cannot finish promoting {model}: its rollout is {active.phase}, not promoting.")
    return _decided(
        active, "promote", 0, reason, actor, stable_version=active.canary_version, canary_version=None, phase="promoted"
    )


def rollback(state: RolloutState | None, model: str, reason: str | None = None, actor: str = ADMIN_API) -> RolloutState:
    """All traffic back to stable; the canary version stays recorded for the history."""
    active = _require_active(state, model, "roll back")
    if active.phase == "promoting":
        raise Conflict(f"cannot roll back {model} while its collections are being re-indexed to the canary; wait.")
    return _decided(active, "rollback", 0, reason, actor, phase="rolled_back")


def fail(state: RolloutState, reason: str, actor: str) -> RolloutState:
    """The analysis gave up on the canary: weight 0, phase failed, the failed threshold as the reason."""
    return _decided(state, "fail", 0, reason, actor, phase="failed")


def step(state: RolloutState, reason: str, actor: str) -> RolloutState:
    """The next weight of the schedule (the caller promotes when there is none)."""
    following = [weight for weight in state.steps if weight > state.weight]
    return _decided(state, "step", following[0], reason, actor)


def judged(state: RolloutState, judgement: "Judgement") -> RolloutState:
    """``state`` with one more judgement counted: passes, failures or waits in a row (a wait leaves the passes
    and failures as they were; any verdict ends a run of waits)."""
    passes, failures, waits = state.passes, state.failures, 0
    if judgement.result == "pass":
        passes, failures = passes + 1, 0
    elif judgement.result == "fail":
        passes, failures = 0, failures + 1
    else:
        waits = state.waits + 1
    update = {"passes": passes, "failures": failures, "waits": waits, "last_judgement": judgement}
    return state.model_copy(update=update)


def pause(state: RolloutState | None, model: str, reason: str | None = None, actor: str = ADMIN_API) -> RolloutState:
    """Hold the weight where it is (the canary keeps its traffic; the analysis loop stops stepping)."""
    active = _require_active(state, model, "pause")
    if active.phase != "progressing":
        raise Conflict(f"cannot pause {model}: its rollout is {active.phase}, not progressing.")
    return _decided(active, "pause", active.weight, reason, actor, phase="paused")


def resume(state: RolloutState | None, model: str, reason: str | None = None, actor: str = ADMIN_API) -> RolloutState:
    active = _require_active(state, model, "resume")
    if active.phase != "paused":
        raise Conflict(f"cannot resume {model}: its rollout is {active.phase}, not paused.")
    return _decided(active, "resume", active.weight, reason, actor, phase="progressing")


def set_weight(
    state: RolloutState | None, model: str, weight: int, reason: str | None = None, actor: str = ADMIN_API
) -> RolloutState:
    """The operator puts the canary's weight at ``weight`` percent (0..100)."""
    active = _require_active(state, model, "set the weight of")
    if active.phase == "promoting":
        raise Conflict(f"cannot set the weight of {model} while it is being promoted; wait.")
    if not 0 <= weight <= 100:
        raise InvalidRequest(f"weight {weight} is outside 0..100.", param="weight")
    return _decided(active, "weight", weight, reason, actor)
