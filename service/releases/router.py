"""/v1/admin/releases — the release ledger and its budget, behind the admin key; ``python -m trainer release``
claims a place before it trains, reports its stages and its outcome, and asks what is due."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from redis.exceptions import RedisError

from service.edge.auth import require
from service.edge.json_body import json_body, request_schema
from service.errors import ApiError, InvalidRequest, ServiceUnavailable
from service.releases.ledger import ReleaseLedger, ReleaseRecord, usage
from service.releases.protocol import ClaimRelease, ReleaseClaim, ReleaseLedgerView, ReportRelease
from service.releases.signals import ReleaseSignals, ReleaseSignalsView
from service.rollouts.router import known_model

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/releases", tags=["releases"], dependencies=[Depends(require("admin"))])


def _ledger(request: Request) -> ReleaseLedger:
    ledger: ReleaseLedger = request.app.state.release_ledger
    return ledger


@asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """A ledger call; Redis unreachable is a 503 that says so (a release retries it), never a granted place."""
    try:
        yield
    except RedisError as error:
        raise ServiceUnavailable(
            f"the release ledger (Redis) cannot be reached ({type(error).__name__}); retry when Redis answers."
        ) from None


def _signals(request: Request) -> ReleaseSignals:
    signals: ReleaseSignals = request.app.state.release_signals
    return signals


@router.post("", response_model=ReleaseClaim, status_code=201, openapi_extra=request_schema(ClaimRelease))
async def claim_release(
    body: Annotated[ClaimRelease, Depends(json_body(ClaimRelease))], request: Request
) -> ReleaseClaim:
    """Take a place in the release budget (201), or be refused: 409 while the model has a release running,
    429 with Retry-After when the window's releases or training hours are spent. Refusals are counted in
    ``embedserve_release_triggers_total{decision="refused"}`` and logged."""
    known_model(request, body.model)
    signals = _signals(request)
    try:
        async with _reachable():
            claim = await _ledger(request).claim(body.release_id, body.model, body.trigger)
    except ApiError as refusal:
        if isinstance(refusal, ServiceUnavailable):
            raise
        signals.metrics.triggers.labels(body.model, body.trigger, "refused").inc()
        log.warning(
            "release trigger refused",
            extra={"model": body.model, "trigger": body.trigger, "release_id": body.release_id, "why": refusal.code},
        )
        raise
    if not claim.resumed:
        signals.metrics.triggers.labels(body.model, body.trigger, "started").inc()
    signals.remember(claim.record)
    log.info(
        "release claimed",
        extra={"model": body.model, "trigger": body.trigger, "release_id": body.release_id, "resumed": claim.resumed},
    )
    return ReleaseClaim(release=claim.record, resumed=claim.resumed, training_hours_left=claim.training_hours_left)


@router.patch("/{release_id}", response_model=ReleaseRecord, openapi_extra=request_schema(ReportRelease))
async def report_release(
    release_id: str, body: Annotated[ReportRelease, Depends(json_body(ReportRelease))], request: Request
) -> ReleaseRecord:
    """Record the release's stage, version, training hours and, once, its outcome (then it no longer runs)."""
    changes: dict[str, object] = body.model_dump(exclude_none=True)
    if body.outcome is not None:
        changes["finished_at"] = datetime.now(UTC)
    try:
        async with _reachable():
            before, after = await _ledger(request).update(release_id, **changes)
    except ValidationError as error:
        raise InvalidRequest(f"release report: {error.errors()[0]['msg']}") from None
    if before.outcome is None and after.outcome is not None:
        _signals(request).metrics.releases.labels(after.model, after.outcome).inc()
        log.info(
            "release ended",
            extra={"model": after.model, "release_id": release_id, "outcome": after.outcome, "version": after.version},
        )
    _signals(request).remember(after)
    return after


@router.get("", response_model=ReleaseLedgerView)
async def list_releases(request: Request) -> ReleaseLedgerView:
    """The budget's window, what it used, and every release the ledger holds."""
    ledger = _ledger(request)
    async with _reachable():
        records = await ledger.records()
    used = usage(records, ledger.budget, datetime.now(UTC))
    return ReleaseLedgerView(
        window_s=ledger.budget.window_s,
        max_per_window=ledger.budget.max_releases,
        max_training_hours=ledger.budget.max_training_hours,
        started_in_window=used.releases,
        training_hours_in_window=used.training_hours,
        releases=sorted(records, key=lambda r: r.started_at, reverse=True),
    )


@router.get("/signals/{model}", response_model=ReleaseSignalsView)
async def release_signals(model: str, request: Request) -> ReleaseSignalsView:
    """Whether a release of ``model`` is due (staleness, drift) and the measures behind it, from this replica."""
    known_model(request, model)
    return _signals(request).view(model)
