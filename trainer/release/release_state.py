"""What a release knows about itself, kept on disk between its stages, and the report made from it."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

EXIT_PROMOTED, EXIT_FAILED, EXIT_REFUSED = 0, 1, 3
Outcome = Literal["promoted", "gate_refused", "canary_failed", "budget_exhausted", "failed", "refused", "not_due"]
# Outcomes the gateway's ledger records (a refused or not-due release never had a place in it).
LEDGER_OUTCOMES = ("promoted", "gate_refused", "canary_failed", "budget_exhausted", "failed")


class StageRecord(BaseModel):
    status: Literal["done", "failed"]
    started_at: datetime
    seconds: float
    detail: dict[str, Any] = Field(default_factory=dict)


class ReleaseState(BaseModel):
    release_id: str
    model: str
    trigger: str
    config_sha256: str
    started_at: datetime
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    outcome: Outcome | None = None
    failed_checks: list[str] = Field(default_factory=list)
    error: str | None = None
    training_seconds: float = 0.0
    ledger_reported: bool = False

    def detail(self, stage: str) -> dict[str, Any]:
        return self.stages[stage].detail


class ReleaseStopped(Exception):
    """The release ends here with ``outcome`` (not a crash: running again starts a new release)."""

    def __init__(
        self, outcome: Outcome, message: str, checks: list[str] | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.checks = checks or []
        self.detail = detail or {}


def report(state: ReleaseState) -> dict[str, Any]:
    """The release's report: its outcome, the failed checks, and every stage's status, timing and details."""
    return {
        "release_id": state.release_id,
        "model": state.model,
        "trigger": state.trigger,
        "outcome": state.outcome,
        "failed_checks": state.failed_checks,
        "error": state.error,
        "started_at": state.started_at.isoformat(),
        "training_hours": round(state.training_seconds / 3600, 6),
        "ledger_reported": state.ledger_reported,
        "stages": {name: record.model_dump(mode="json") for name, record in state.stages.items()},
    }


def exit_code(state: ReleaseState) -> int:
    if state.outcome in ("promoted", "not_due"):
        return EXIT_PROMOTED
    return EXIT_REFUSED if state.outcome == "refused" else EXIT_FAILED
