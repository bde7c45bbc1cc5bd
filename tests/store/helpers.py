"""Small helpers for the store contract tests: callers, raw reads, and failure injection."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fleetgate.auth.authz import Principal
from fleetgate.records import AuditEntry, Role
from fleetgate.services.context import Caller
from fleetgate.store import Database
from fleetgate.store.audit import AuditFilter, AuditRepo

# The tables of the registry schema (version 1); later versions add more, never fewer.
TABLES = (
    "groups",
    "devices",
    "device_attributes",
    "device_addresses",
    "api_tokens",
    "audit_log",
    "sealed_secrets",
    "schema_migrations",
)
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


async def table_names(db: Database) -> list[str]:
    """Every table the store holds, read from the backend's catalog."""
    async with db.snapshot() as tx:
        if tx.dialect == "sqlite":
            found = await tx.fetch(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        else:
            found = await tx.fetch(
                "SELECT table_name AS name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
            )
    return [str(r["name"]) for r in found]


def caller(role: Role, *groups: str, token_id: str | None = None) -> Caller:
    """A caller holding a token of ``role`` limited to ``groups`` (none: every group)."""
    ident = token_id or f"{role.value}-{'-'.join(groups) or 'all'}"
    return Caller(
        principal=Principal(token_id=ident, name=ident, role=role, groups=tuple(groups)),
        request_id=f"req-{ident}",
        source="203.0.113.7",
    )


async def rows(db: Database, table: str, order_by: str = "1") -> list[dict[str, Any]]:
    """Every row of ``table``, read directly (no repository in between)."""
    assert _NAME.fullmatch(table), table
    async with db.snapshot() as tx:
        return [dict(r) for r in await tx.fetch(f"SELECT * FROM {table} ORDER BY {order_by}")]


async def count(db: Database, table: str) -> int:
    assert _NAME.fullmatch(table), table
    async with db.snapshot() as tx:
        row = await tx.fetchrow(f"SELECT COUNT(*) AS n FROM {table}")
    assert row is not None
    return int(row["n"])


async def audit_entries(db: Database, **where: Any) -> list[AuditEntry]:
    """Audit entries, newest first, read straight from the repository (no scoping)."""
    async with db.snapshot() as tx:
        return await AuditRepo(tx).list(AuditFilter(**where), limit=10_000)


async def fail_audit_appends(db: Database, action: str) -> None:
    """Make the store refuse audit entries for ``action``, as a failing write would.

    A service that writes its change and the audit entry in one transaction must then leave no
    trace of the change either.
    """
    async with db.transaction() as tx:
        if tx.dialect == "sqlite":
            await tx.execute(
                f"CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_log "
                f"WHEN NEW.action = '{action}' "
                "BEGIN SELECT RAISE(ABORT, 'test: audit append refused'); END"
            )
        else:
            await tx.execute(
                "CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.action = '{action}' THEN "
                "RAISE EXCEPTION 'test: audit append refused'; END IF; RETURN NEW; END $$; "
                "CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_log "
                "FOR EACH ROW EXECUTE FUNCTION test_refuse_audit()"
            )


async def warm_up(db: Database, connections: int = 5) -> None:
    """Have a pooled backend open ``connections`` connections, so a race starts at once.

    Otherwise the first task runs on the pool's only connection while the others are still
    connecting, and a "concurrent" test quietly runs its tasks one after another.
    """

    async def hold() -> None:
        async with db.snapshot() as tx:
            await tx.fetch("SELECT 1 AS one")

    await asyncio.gather(*(hold() for _ in range(connections)))
