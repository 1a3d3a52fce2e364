"""REST v1 for rollouts: start, list, show (waves, devices, gate results), pause, resume,
abort. Routes are short: they call the ``RolloutEngine`` the app's lifespan built;
``RolloutError`` is mapped to 404/409/422 in ``app.py``."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, Query, Request

from cloud_controller.deps import SettingsDep
from cloud_controller.paging import check_page_size
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
def start_rollout(body: RolloutCreate, rollouts: RolloutsDep) -> RolloutPublic:
    """Plan the rollout (variant per device, waves) and store it; it starts at once."""
    return rollouts.create(body)


@router.get("", response_model=RolloutPage)
def list_rollouts(
    rollouts: RolloutsDep,
    settings: SettingsDep,
    state: RolloutState | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> RolloutPage:
    """Rollouts, newest first."""
    check_page_size(page_size, settings)
    items, total = rollouts.list(state=state, page=page, page_size=page_size)
    return RolloutPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: int, rollouts: RolloutsDep) -> RolloutPublic:
    return rollouts.get(rollout_id)


@router.post("/{rollout_id}/pause", response_model=RolloutPublic)
def pause_rollout(rollout_id: int, rollouts: RolloutsDep) -> RolloutPublic:
    """No new wave starts and no gate is evaluated until it is resumed."""
    return rollouts.pause(rollout_id)


@router.post("/{rollout_id}/resume", response_model=RolloutPublic)
def resume_rollout(rollout_id: int, rollouts: RolloutsDep) -> RolloutPublic:
    """Go on; a wave that failed its gates is accepted, a stalled one observed again."""
    return rollouts.resume(rollout_id)


@router.post("/{rollout_id}/abort", response_model=RolloutPublic)
def abort_rollout(rollout_id: int, rollouts: RolloutsDep) -> RolloutPublic:
    """Roll every updated device back to its previous assignment, then stop."""
    return rollouts.abort(rollout_id)
