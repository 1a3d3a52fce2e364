"""How long results are kept: delete what is older than the retention, then the oldest
beyond the row limit.

Age counts from ``received_at`` (the controller's clock), never from the device's clock.
The bridge's worker runs ``purge_results`` every ``results_cleanup_interval_s``, so the
worker stays the only writer of results. Knows nothing of MQTT or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, delete, select

from cloud_controller.entities import Result


@dataclass(frozen=True)
class Purged:
    expired: int
    """Rows received before the cutoff."""
    over_limit: int
    """The oldest rows beyond ``max_rows``."""


def purge_results(session: Session, *, received_before: datetime, max_rows: int) -> Purged:
    """Delete expired results, then all but the newest ``max_rows``; commit."""
    expired = session.exec(delete(Result).where(col(Result.received_at) < received_before)).rowcount
    # Ids grow with insertion, so the newest ``max_rows`` are those from this id on.
    oldest_kept = session.exec(
        select(Result.id).order_by(col(Result.id).desc()).offset(max_rows - 1).limit(1)
    ).first()
    over_limit = 0
    if oldest_kept is not None:
        over_limit = session.exec(delete(Result).where(col(Result.id) < oldest_kept)).rowcount
    session.commit()
    return Purged(expired=expired, over_limit=over_limit)
