"""REST v1 for results: one request's result, and paged lists by device and time.

Routes are short: they check the query, call ``queries`` and return ``*Public`` models;
``ResultNotFound`` is mapped to 404 in ``app.py``. Embeddings are shown as lists of floats
(one list per text); a single result includes them unless asked not to, a list leaves
them out unless asked to, so pages stay small. Every route needs a viewer token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from cloud_controller import queries
from cloud_controller.auth import ViewerDep
from cloud_controller.deps import SessionDep, SettingsDep
from cloud_controller.entities import ResultPage, ResultPublic
from cloud_controller.paging import Page, PageSize, check_page_size, query_error

router = APIRouter(prefix="/api/v1/results", tags=["results"])


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise query_error(
            name, f"{name} must carry a time zone, e.g. 2030-01-01T00:00:00Z", str(value)
        )
    return value


@router.get("", response_model=ResultPage)
def list_results(
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="served_at >= since")] = None,
    until: Annotated[datetime | None, Query(description="served_at < until")] = None,
    page: Page = 1,
    page_size: PageSize = 50,
    include_embeddings: bool = False,
) -> ResultPage:
    check_page_size(page_size, settings)
    since, until = _aware("since", since), _aware("until", until)
    if since is not None and until is not None and since > until:
        raise query_error(
            "until",
            f"until ({until.isoformat()}) is before since ({since.isoformat()})",
            until.isoformat(),
        )
    flt = queries.ResultFilter(device_id=device_id, since=since, until=until)
    items, total = queries.list_results(
        session, flt, page=page, page_size=page_size, include_embeddings=include_embeddings
    )
    return ResultPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{request_id}", response_model=ResultPublic)
def get_result(
    request_id: Annotated[str, Path(min_length=1, max_length=128)],
    principal: ViewerDep,
    session: SessionDep,
    include_embeddings: bool = True,
) -> ResultPublic:
    return queries.get_result(session, request_id, include_embeddings=include_embeddings)
