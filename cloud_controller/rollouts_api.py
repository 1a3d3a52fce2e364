"""REST v1 for rollouts: start, list, show (waves, devices, gate results), pause, resume,
abort. Routes are short: they call the ``RolloutEngine`` the app's lifespan built;
``RolloutError`` is mapped to 404/409/422 in ``app.py``. Reads need a viewer token;
starting, pausing, resuming and aborting an operator token, and are audited (the engine
audits the transitions it makes on its own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session

from cloud_controller import audit
from cloud_controller.auth import OperatorDep, Principal, ViewerDep
from cloud_controller.deps import RuntimeDep, SettingsDep
from cloud_controller.paging import Page, PageSize, RowId, check_page_size
from cloud_controller.rollout_engine import RolloutEngine
from cloud_controller.rollout_entities import (
    RolloutCreate,
    RolloutPage,
    RolloutPublic,
    RolloutState,
)

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


def get_rollouts(request: Request) -> RolloutEngine:
    return cast(RolloutEngine, request.app.state.rollouts)


RolloutsDep = Annotated[RolloutEngine, Depends(get_rollouts)]


@router.post("", response_model=RolloutPublic, status_code=201)
def start_rollout(
    body: RolloutCreate, principal: OperatorDep, rollouts: RolloutsDep, runtime: RuntimeDep
) -> RolloutPublic:
    """Plan the rollout (variant per device, waves) and store it; it starts at once."""
    with (
        Session(runtime.engine) as session,
        audit.audited(
            session, principal, "rollout.start", "rollout", "new", now=runtime.clock()
        ) as detail,
    ):
        rollout = rollouts.create(body)
        detail.update(rollout_id=rollout.id, model=body.model_dump(mode="json"))
    return rollout


@router.get("", response_model=RolloutPage)
def list_rollouts(
    principal: ViewerDep,
    rollouts: RolloutsDep,
    settings: SettingsDep,
    state: RolloutState | None = None,
    page: Page = 1,
    page_size: PageSize = 50,
) -> RolloutPage:
    """Rollouts, newest first."""
    check_page_size(page_size, settings)
    items, total = rollouts.list_rollouts(state=state, page=page, page_size=page_size)
    return RolloutPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: RowId, principal: ViewerDep, rollouts: RolloutsDep) -> RolloutPublic:
    return rollouts.get(rollout_id)


@router.post("/{rollout_id}/pause", response_model=RolloutPublic)
def pause_rollout(
    rollout_id: RowId, principal: OperatorDep, rollouts: RolloutsDep, runtime: RuntimeDep
) -> RolloutPublic:
    """No new wave starts and no gate is evaluated until it is resumed."""
    return _operate(runtime, principal, "pause", rollout_id, rollouts.pause)


@router.post("/{rollout_id}/resume", response_model=RolloutPublic)
def resume_rollout(
    rollout_id: RowId, principal: OperatorDep, rollouts: RolloutsDep, runtime: RuntimeDep
) -> RolloutPublic:
    """Go on; a wave that failed its gates is accepted, a stalled one observed again."""
    return _operate(runtime, principal, "resume", rollout_id, rollouts.resume)


@router.post("/{rollout_id}/abort", response_model=RolloutPublic)
def abort_rollout(
    rollout_id: RowId, principal: OperatorDep, rollouts: RolloutsDep, runtime: RuntimeDep
) -> RolloutPublic:
    """Roll every updated device back to its previous assignment, then stop."""
    return _operate(runtime, principal, "abort", rollout_id, rollouts.abort)


def _operate(
    runtime: RuntimeDep,
    principal: Principal,
    verb: str,
    rollout_id: RowId,
    change: Callable[[int], RolloutPublic],
) -> RolloutPublic:
    with (
        Session(runtime.engine) as session,
        audit.audited(
            session, principal, f"rollout.{verb}", "rollout", rollout_id, now=runtime.clock()
        ) as detail,
    ):
        rollout = change(rollout_id)
        detail.update(state=rollout.state)
    return rollout
