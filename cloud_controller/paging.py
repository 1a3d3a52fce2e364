"""What the list routes share: 422s shaped like FastAPI's own, the page and its size."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from fastapi.exceptions import RequestValidationError

from cloud_controller.settings import CloudSettings

MAX_PAGE = 1_000_000
"""Highest page number a list accepts: keeps ``OFFSET`` within every database's range."""

Page = Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")]
PageSize = Annotated[int, Query(ge=1, description="items per page, at most max_page_size")]
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="row id")]
"""A database row id in a path: larger ones are a 422, not a database overflow."""


def query_error(name: str, message: str, value: object) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", name), "msg": message, "input": value}]
    )


def check_page_size(page_size: int, settings: CloudSettings) -> None:
    """Raise a 422 for a ``page_size`` above ``max_page_size``."""
    if page_size > settings.max_page_size:
        raise query_error(
            "page_size",
            f"page_size {page_size} exceeds the maximum of {settings.max_page_size}",
            page_size,
        )
