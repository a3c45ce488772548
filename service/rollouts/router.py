"""/v1/rollouts — the admin API of canary rollouts, behind the admin key (service/edge/auth.py)."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.backends.contract import Backend
from service.edge.auth import require
from service.edge.json_body import json_body, optional_json_body, request_schema
from service.embeddings.embedder import Embedder
from service.errors import Conflict, InvalidRequest, ModelNotFound, NotFound
from service.models.store import ModelStore
from service.rollouts.protocol import RolloutAction, RolloutList, SetWeight, StartRollout
from service.rollouts.state import RolloutState, begin_promotion, pause, resume, rollback, set_weight, start
from service.rollouts.store import RolloutWatcher

# An operator action's body (reason, revision) may be left out.
OPTIONAL_ACTION_SCHEMA = request_schema(RolloutAction, required=False)
OptionalAction = Annotated[RolloutAction | None, Depends(optional_json_body(RolloutAction))]

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"], dependencies=[Depends(require("admin"))])


def _rollouts(request: Request) -> RolloutWatcher:
    rollouts: RolloutWatcher = request.app.state.rollouts
    return rollouts


def known_model(request: Request, model: str) -> None:
    """404 (naming the models there are) unless the repository has ``model``; the release routes use it too."""
    store: ModelStore = request.app.state.store
    if model not in store.models():
        raise ModelNotFound(f"model '{model}' does not exist; available: {', '.join(store.models()) or 'none'}.")


def _at_revision(
    change: Callable[[RolloutState | None], RolloutState], revision: int | None
) -> Callable[[RolloutState | None], RolloutState]:
    """``change``, refused with 409 when the caller acted on a revision that is no longer current."""

    def checked(state: RolloutState | None) -> RolloutState:
        current = state.revision if state else 0
        if revision is not None and revision != current:
            raise Conflict(
                f"rollout is at revision {current}, not {revision}; re-read it and retry.", code="revision_conflict"
            )
        return change(state)

    return checked


@router.get("", response_model=RolloutList)
async def list_rollouts(request: Request) -> RolloutList:
    return RolloutList(data=list((await _rollouts(request).store.load_all()).values()))


@router.get("/{model}", response_model=RolloutState)
async def show_rollout(model: str, request: Request) -> RolloutState:
    state = await _rollouts(request).store.load(model)
    if state is None:
        raise NotFound(f"{model} has no rollout; start one with PUT /v1/rollouts/{model}.")
    return state


@router.put("/{model}", response_model=RolloutState, openapi_extra=request_schema(StartRollout))
async def start_rollout(
    model: str, body: Annotated[StartRollout, Depends(json_body(StartRollout))], request: Request
) -> RolloutState:
    """Start a canary at ``steps[0]`` percent; the canary must be verified on this replica and its backend serve it."""
    known_model(request, model)
    store: ModelStore = request.app.state.store
    canary = store.get(model, body.canary_version)
    if canary is None:
        refusal = store.refusal(model, body.canary_version)
        why = refusal.reason if refusal else "it is not in the model repository"
        raise InvalidRequest(f"{model}@{body.canary_version} cannot be served: {why}.", param="canary_version")
    # Pods are ready only when their canary serves: a canary the backend cannot serve would take them all out.
    backend: Backend = request.app.state.backend
    availability = await backend.availability(canary)
    if not availability.ready:
        raise InvalidRequest(
            f"{model}@{body.canary_version} cannot be a canary: {availability.reason}. Fix that first (see /readyz): "
            "with it as canary, no replica would be ready.",
            param="canary_version",
        )
    embedder: Embedder = request.app.state.embedder

    def begin(current: RolloutState | None) -> RolloutState:
        stable = current.stable_version if current else embedder.default_version(model).version
        return start(
            current, model, stable, body.canary_version, body.steps, body.shadow_percent, body.analysis, body.reason
        )

    return await _rollouts(request).update(model, _at_revision(begin, body.revision))


async def _operator_action(
    request: Request,
    model: str,
    body: RolloutAction | None,
    action: Callable[[RolloutState | None, str, str | None], RolloutState],
) -> RolloutState:
    """Apply one of promote/rollback/pause/resume, at the caller's revision when it gave one."""
    body = body or RolloutAction()
    reason = body.reason
    change = _at_revision(lambda state: action(state, model, reason), body.revision)
    return await _rollouts(request).update(model, change)


@router.post("/{model}/promote", response_model=RolloutState, openapi_extra=OPTIONAL_ACTION_SCHEMA)
async def promote_rollout(model: str, request: Request, body: OptionalAction) -> RolloutState:
    """Phase promoting: the model's collections are re-indexed to the canary, then it becomes stable (phase
    promoted); watch GET /v1/rollouts/{model}."""
    return await _operator_action(request, model, body, begin_promotion)


@router.post("/{model}/rollback", response_model=RolloutState, openapi_extra=OPTIONAL_ACTION_SCHEMA)
async def rollback_rollout(model: str, request: Request, body: OptionalAction) -> RolloutState:
    return await _operator_action(request, model, body, rollback)


@router.post("/{model}/pause", response_model=RolloutState, openapi_extra=OPTIONAL_ACTION_SCHEMA)
async def pause_rollout(model: str, request: Request, body: OptionalAction) -> RolloutState:
    return await _operator_action(request, model, body, pause)


@router.post("/{model}/resume", response_model=RolloutState, openapi_extra=OPTIONAL_ACTION_SCHEMA)
async def resume_rollout(model: str, request: Request, body: OptionalAction) -> RolloutState:
    return await _operator_action(request, model, body, resume)


@router.post("/{model}/weight", response_model=RolloutState, openapi_extra=request_schema(SetWeight))
async def set_rollout_weight(
    model: str, body: Annotated[SetWeight, Depends(json_body(SetWeight))], request: Request
) -> RolloutState:
    """The operator sets the canary's weight; with analysis disabled it stays there."""
    action = _at_revision(lambda state: set_weight(state, model, body.weight, body.reason), body.revision)
    return await _rollouts(request).update(model, action)
