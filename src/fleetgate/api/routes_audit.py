"""/v1/audit"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from fleetgate.api.deps import CallerDep, ServicesDep
from fleetgate.api.query import reject_unknown
from fleetgate.api.schemas import AuditOut, AuditPage
from fleetgate.services.context import DEFAULT_PAGE, MAX_PAGE
from fleetgate.store.audit import AuditFilter

router = APIRouter(tags=["audit"])


def _utc(moment: datetime | None) -> datetime | None:
    """A time without an offset is taken as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.get("/v1/audit", response_model=AuditPage)
async def list_audit(
    request: Request,
    caller: CallerDep,
    svc: ServicesDep,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: str | None = None,
) -> AuditPage:
    """Newest first. Entries never change and are never removed through the API."""
    reject_unknown(request, ("action", "target_type", "target_id", "actor", "since", "until"))
    page = await svc.audit.list(
        caller,
        AuditFilter(
            action=action,
            target_type=target_type,
            target_id=target_id,
            actor=actor,
            since=_utc(since),
            until=_utc(until),
        ),
        limit=limit,
        cursor=cursor,
    )
    return AuditPage(items=[AuditOut.of(e) for e in page.items], next_cursor=page.next_cursor)
