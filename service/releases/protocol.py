"""Wire models of the release ledger's admin API (/v1/admin/releases)."""

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.edge.protocol import RequestBody
from service.releases.ledger import Outcome, ReleaseRecord, Trigger

RELEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ClaimRelease(RequestBody):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model the release will export a version of.")
    trigger: Trigger = Field(description="What started it: manual, schedule, drift or staleness.")
    release_id: str = Field(
        description="The release's id (the trainer makes one and keeps it in its state); claiming it again "
        "resumes the same place instead of taking a new one."
    )

    @field_validator("release_id")
    @classmethod
    def _plain(cls, value: str) -> str:
        if not RELEASE_ID.match(value):
            raise ValueError("release_id: up to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value


class ReleaseClaim(BaseModel):
    release: ReleaseRecord
    resumed: bool = Field(description="The id had claimed its place before: a resumed release.")
    training_hours_left: float = Field(description="Training hours the budget has left in its window.")


class ReportRelease(RequestBody):
    model_config = ConfigDict(extra="forbid")

    stage: str | None = Field(None, max_length=64, description="The stage the release is in, or finished last.")
    version: int | None = Field(None, ge=1, description="The version it exported.")
    training_hours: float | None = Field(None, ge=0, description="Hours of training it used so far (in total).")
    outcome: Outcome | None = Field(None, description="How it ended; once set, the release no longer runs.")
    detail: str | None = Field(None, max_length=2000, description="Failed checks, or the error, in a line.")


class ReleaseLedgerView(BaseModel):
    window_s: float
    max_per_window: int
    max_training_hours: float
    started_in_window: int
    training_hours_in_window: float
    releases: list[ReleaseRecord] = Field(description="Every release the ledger still holds, newest first.")
