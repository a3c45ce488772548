"""What the gateway answers, as the client reads it: collections, items, hits, models, rollouts, releases.

The client may not import the gateway's own wire models (``service.*.protocol``: they pull in the web framework and
the settings), so it declares the fields it reads here. Every model ignores fields it does not know, so a newer
gateway that adds one does not break an older client; ``tests/client/test_protocol.py`` checks that each field named
here is one the gateway's model has.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.vectors.fusion import ResolvedHybrid

SearchMode = Literal["dense", "keyword", "hybrid"]
Phase = Literal["progressing", "paused", "promoting", "promoted", "rolled_back", "failed"]
# Phases after which the rollout has ended: no canary takes traffic.
ENDED_PHASES: frozenset[Phase] = frozenset({"promoted", "rolled_back", "failed"})


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ── collections ─────────────────────────────────────────────────────────────


class ReindexProgress(_Answer):
    """A re-index of a collection to another version of its model, running or failed."""

    version: int = Field(description="The version being built.")
    state: Literal["running", "failed"]
    copied: int = Field(description="Items re-embedded into the new version so far.")
    total: int = Field(description="Items in the collection when the re-index started.")
    progress: float = Field(description="copied / total, between 0 and 1.")
    started_at: float
    error: str | None = None


class Collection(_Answer):
    name: str
    model: str
    version: int = Field(description="The model version whose vectors the collection serves.")
    dimension: int
    fields: dict[str, str] = Field(description="Declared metadata fields and their types.")
    items: int | None = Field(description="Items stored (None when the gateway could not count them).")
    keyword_analyzer: str
    hybrid: ResolvedHybrid = Field(description="The hybrid-search defaults that apply.")
    state: Literal["ready", "reindexing", "reindex_failed"]
    reindex: ReindexProgress | None = None
    created_at: float

    @property
    def model_version(self) -> str:
        """``name@version`` of the model whose vectors the collection serves."""
        return f"{self.model}@{self.version}"


class Item(_Answer):
    """An item of a collection: what is upserted, and what ``get_item`` answers."""

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Hit(_Answer):
    id: str
    score: float = Field(description="Higher is more similar (cosine, BM25 or the fused score, by mode).")
    text: str | None = None
    metadata: dict[str, Any] | None = None


class SearchResult(_Answer):
    hits: list[Hit] = Field(description="Best first.")
    model: str = Field(description="The model version that answered, as name@version.")


# ── models ──────────────────────────────────────────────────────────────────


class ModelVersion(_Answer):
    """One version of a model in the gateway's repository: served (ready), refused, or not loaded."""

    version: int
    state: Literal["ready", "refused", "not_loaded"]
    is_default: bool = Field(description="Served when a request names the model without a version.")
    reason: str | None = Field(None, description="Why the version is not served.")
    sha256: str | None = None
    created_at: datetime | None = None
    source: str | None = None
    base_model: str | None = None
    parent_version: int | None = None
    dimension: int | None = None
    max_seq_length: int | None = None
    precision: str | None = None
    evaluation: dict[str, float] | None = None


class Model(_Answer):
    """A model of GET /v1/models, with every version the gateway found for it."""

    id: str
    versions: list[ModelVersion]

    @property
    def default_version(self) -> int | None:
        """The version served when a request names no version (None when none can be served)."""
        return next((v.version for v in self.versions if v.is_default), None)

    @property
    def refused(self) -> list[ModelVersion]:
        """The versions the gateway refuses to serve (files that do not match their manifest, ...), with why."""
        return [v for v in self.versions if v.state == "refused"]

    def version(self, number: int) -> ModelVersion | None:
        return next((v for v in self.versions if v.version == number), None)


class ReloadFailure(_Answer):
    version: str = Field(description="name@version")
    reason: str


class ReloadReport(_Answer):
    """What one POST /v1/admin/models/reload changed on the replica that answered."""

    loaded: list[str] = Field(default_factory=list, description="name@version, now served")
    unloaded: list[str] = Field(default_factory=list, description="name@version, folder gone or changed")
    refused: list[ReloadFailure] = Field(default_factory=list, description="new folders that failed verification")
    failed: list[ReloadFailure] = Field(default_factory=list, description="verified, but the backend failed to load")


# ── rollouts ────────────────────────────────────────────────────────────────


class Decision(_Answer):
    """One change of a rollout, by whom and why (the analysis names the failed check in ``reason``)."""

    at: datetime
    actor: str
    action: str
    from_weight: int
    to_weight: int
    reason: str


class Judgement(_Answer):
    """One judgement of the analysis loop: what it measured over an interval and what it concluded."""

    at: datetime
    result: Literal["pass", "fail", "wait"]
    reason: str = Field(description="On a failure, the check that failed and by how much.")
    canary_requests: int = 0
    canary_error_rate: float | None = None
    stable_p95_s: float | None = None
    canary_p95_s: float | None = None
    drift_mmd: float | None = None
    stable_drift_mmd: float | None = None
    neighbour_agreement: float | None = None


class RolloutAnalysis(_Answer):
    enabled: bool = Field(description="The analysis loop steps, promotes and rolls back; off = the operator does.")
    interval_s: float
    passes_to_step: int
    failures_to_rollback: int
    max_wait_intervals: int
    thresholds: dict[str, float] = Field(default_factory=dict)


class Rollout(_Answer):
    """The rollout of one model: ``stable_version`` serves, ``canary_version`` takes ``weight`` percent of callers
    while the phase is progressing, paused or promoting."""

    model: str
    stable_version: int
    canary_version: int | None = None
    weight: int = Field(description="Percent of callers routed to the canary.")
    steps: list[int] = Field(default_factory=list)
    phase: Phase
    shadow_percent: float = 0.0
    analysis: RolloutAnalysis
    history: list[Decision] = Field(default_factory=list, description="Every change, oldest first.")
    passes: int = 0
    failures: int = 0
    waits: int = 0
    last_judgement: Judgement | None = None
    revision: int = Field(description="Grows by one with every change; pass it back to act only on this state.")

    @property
    def ended(self) -> bool:
        """Promoted, rolled back or failed: no canary takes traffic."""
        return self.phase in ENDED_PHASES or self.canary_version is None


# ── releases (python -m trainer release, /v1/admin/releases) ───────────────


class Release(_Answer):
    """One release as the gateway's ledger knows it."""

    release_id: str
    model: str
    trigger: str = Field(description="manual, schedule, drift or staleness")
    started_at: datetime
    stage: str = Field(description="The stage the release reported last.")
    version: int | None = None
    training_hours: float = 0.0
    outcome: str | None = Field(None, description="None while it runs; then promoted, gate_refused, ...")
    finished_at: datetime | None = None
    detail: str | None = None


class ReleaseClaim(_Answer):
    release: Release
    resumed: bool = Field(description="The id had claimed its place before: a resumed release.")
    training_hours_left: float


class ReleaseLedger(_Answer):
    window_s: float
    max_per_window: int
    max_training_hours: float
    started_in_window: int
    training_hours_in_window: float
    releases: list[Release] = Field(description="Newest first.")


class ReleaseSignals(_Answer):
    """Whether a release of the model is due (from the replica that answered) and the measures behind it."""

    model: str
    stable_version: int | None
    stable_age_s: float | None
    max_age_s: float
    drift_mmd: float | None
    drift_threshold: float
    drift_streak: int
    drift_intervals: int
    release_running: str | None
    due: list[str] = Field(description="staleness, drift; empty when none holds or a release runs.")
