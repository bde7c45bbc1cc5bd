"""Remote access sessions and their events."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.remote.records import EventKind, Session, SessionEvent
from fleetgate.store.database import Row, Tx

_COLUMNS = (
    "id, device_id, group_name, device_address, device_port, public_port, cidrs, tls, "
    "created_at, expires_at, ended_at, end_reason, created_by, client_serial, client_chain"
)
_EVENT_COLUMNS = "id, session_id, at, kind, source, destination, detail"


def _session(r: Row) -> Session:
    return Session(
        id=r["id"],
        device_id=r["device_id"],
        group=r["group_name"],
        device_address=r["device_address"],
        device_port=int(r["device_port"]),
        public_port=int(r["public_port"]),
        cidrs=tuple(json.loads(r["cidrs"])),
        tls=bool(r["tls"]),
        created_at=from_epoch_us(r["created_at"]),
        expires_at=from_epoch_us(r["expires_at"]),
        ended_at=from_epoch_us(r["ended_at"]) if r["ended_at"] is not None else None,
        end_reason=r["end_reason"],
        created_by=r["created_by"],
        client_serial=r["client_serial"],
        client_chain=r["client_chain"],
    )


def _event(r: Row) -> SessionEvent:
    return SessionEvent(
        id=int(r["id"]),
        session_id=r["session_id"],
        at=from_epoch_us(r["at"]),
        kind=EventKind(r["kind"]),
        source=r["source"],
        destination=r["destination"],
        detail=json.loads(r["detail"]),
    )


class SessionRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def insert(self, session: Session) -> None:
        await self._tx.execute(
            f"INSERT INTO sessions ({_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            session.id,
            session.device_id,
            session.group,
            session.device_address,
            session.device_port,
            session.public_port,
            json.dumps(list(session.cidrs)),
            int(session.tls),
            to_epoch_us(session.created_at),
            to_epoch_us(session.expires_at),
            None,
            None,
            session.created_by,
            session.client_serial,
            session.client_chain,
        )

    async def get(self, session_id: str) -> Session | None:
        row = await self._tx.fetchrow(f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", session_id)
        return _session(row) if row else None

    async def open_ports(self) -> set[int]:
        rows = await self._tx.fetch("SELECT public_port FROM sessions WHERE ended_at IS NULL")
        return {int(r["public_port"]) for r in rows}

    async def search(
        self,
        *,
        limit: int,
        after: str | None = None,
        device_id: str | None = None,
        groups: tuple[str, ...] = (),
        open_only: bool = False,
    ) -> list[Session]:
        where: list[str] = []
        args: list[Any] = []
        if after is not None:
            where.append("id > ?")
            args.append(after)
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if groups:
            where.append(f"group_name IN ({', '.join('?' * len(groups))})")
            args.extend(groups)
        if open_only:
            where.append("ended_at IS NULL")
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM sessions {clause} ORDER BY id LIMIT ?", *args, limit
        )
        return [_session(r) for r in rows]

    async def due(self, now: datetime) -> list[Session]:
        """Open sessions whose time has run out."""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM sessions WHERE ended_at IS NULL AND expires_at <= ?",
            to_epoch_us(now),
        )
        return [_session(r) for r in rows]

    async def end(self, session_id: str, at: datetime, reason: str) -> bool:
        """Mark an open session ended; False if it already was."""
        changed = await self._tx.execute(
            "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
            to_epoch_us(at),
            reason,
            session_id,
        )
        return changed == 1

    # -- events -----------------------------------------------------------------------------------

    async def add_event(
        self,
        session_id: str,
        at: datetime,
        kind: EventKind,
        *,
        source: str | None = None,
        destination: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await self._tx.execute(
            "INSERT INTO session_events (session_id, at, kind, source, destination, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            session_id,
            to_epoch_us(at),
            kind.value,
            source,
            destination,
            json.dumps(detail or {}, sort_keys=True),
        )

    async def events(
        self, session_id: str, *, limit: int, after: int | None = None
    ) -> list[SessionEvent]:
        rows = await self._tx.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM session_events WHERE session_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            session_id,
            after or 0,
            limit,
        )
        return [_event(r) for r in rows]

    async def prune_events(self, before: datetime) -> int:
        return await self._tx.execute(
            "DELETE FROM session_events WHERE at < ?", to_epoch_us(before)
        )
