"""Reading the audit log."""

from __future__ import annotations

from dataclasses import replace

from fleetgate.errors import InvalidRequest
from fleetgate.records import AuditEntry, Page
from fleetgate.services.context import Caller, check_limit, decode_cursor, encode_cursor
from fleetgate.store import Database
from fleetgate.store.audit import AuditFilter, AuditRepo


class AuditService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(
        self, caller: Caller, query: AuditFilter, *, limit: int, cursor: str | None
    ) -> Page[AuditEntry]:
        check_limit(limit)
        principal = caller.principal
        before_text = decode_cursor(cursor)
        if before_text is not None and not before_text.isdigit():
            raise InvalidRequest("cursor is not one this API returned", field="cursor")
        # A token limited to groups sees only entries about those groups.
        scoped = replace(query, within_groups=principal.visible_groups())
        async with self._db.snapshot() as tx:
            items = await AuditRepo(tx).list(
                scoped,
                limit=limit + 1,
                before_id=int(before_text) if before_text is not None else None,
            )
        more = len(items) > limit
        items = items[:limit]
        return Page(items=items, next_cursor=encode_cursor(str(items[-1].id)) if more else None)
