"""Wire models of the rollout admin API (/v1/rollouts)."""

from pydantic import BaseModel, ConfigDict, Field

from service.edge.protocol import RequestBody
from service.rollouts.state import AnalysisSettings, RolloutState


class _Action(RequestBody):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500, description="Why; recorded in the rollout's history.")
    revision: int | None = Field(
        None, description="Act only if the rollout is still at this revision (else 409: re-read and retry)."
    )


class StartRollout(_Action):
    canary_version: int = Field(description="A verified version of the model, other than its stable version.")
    steps: list[int] = Field(
        default_factory=lambda: [5, 10, 25, 50, 100],
        description="Canary weights in percent, climbing; the rollout starts at the first.",
    )
    shadow_percent: float = Field(0.0, ge=0, le=100, description="Percent of stable requests mirrored to the canary.")
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)


class RolloutAction(_Action):
    """Body of promote, rollback, pause and resume (all fields optional)."""


class SetWeight(_Action):
    weight: int = Field(ge=0, le=100, description="Percent of unpinned traffic to route to the canary.")


class RolloutList(BaseModel):
    object: str = "list"
    data: list[RolloutState]
