"""Expiry alerts: one row per (subject, threshold), claimed before sending so nodes never
send the same alert twice."""

from __future__ import annotations

from datetime import datetime

from fleetgate.clock import to_epoch_us
from fleetgate.store.database import Tx


class AlertRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def claim(self, subject: str, threshold_s: int, at: datetime) -> bool:
        changed = await self._tx.execute(
            "INSERT INTO expiry_alerts (subject, threshold_s, claimed_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (subject, threshold_s) DO NOTHING",
            subject,
            threshold_s,
            to_epoch_us(at),
            to_epoch_us(at),
        )
        return changed == 1

    async def record_attempt(
        self,
        subject: str,
        threshold_s: int,
        *,
        sent_at: datetime | None,
        error: str | None,
        next_attempt_at: datetime,
    ) -> None:
        await self._tx.execute(
            "UPDATE expiry_alerts SET attempts = attempts + 1, sent_at = ?, last_error = ?, "
            "next_attempt_at = ? WHERE subject = ? AND threshold_s = ?",
            to_epoch_us(sent_at) if sent_at else None,
            error,
            to_epoch_us(next_attempt_at),
            subject,
            threshold_s,
        )

    async def lease(
        self, subject: str, threshold_s: int, now: datetime, *, until: datetime
    ) -> bool:
        """Take an unsent, due alert for sending; False if another node took it first."""
        changed = await self._tx.execute(
            "UPDATE expiry_alerts SET next_attempt_at = ? WHERE subject = ? AND threshold_s = ? "
            "AND sent_at IS NULL AND next_attempt_at <= ?",
            to_epoch_us(until),
            subject,
            threshold_s,
            to_epoch_us(now),
        )
        return changed == 1

    async def due(self, now: datetime, *, max_attempts: int) -> list[tuple[str, int, int]]:
        """Alerts to (re)send now: (subject, threshold_s, attempts so far)."""
        rows = await self._tx.fetch(
            "SELECT subject, threshold_s, attempts FROM expiry_alerts "
            "WHERE sent_at IS NULL AND attempts < ? AND next_attempt_at <= ? "
            "ORDER BY claimed_at",
            max_attempts,
            to_epoch_us(now),
        )
        return [(r["subject"], int(r["threshold_s"]), int(r["attempts"])) for r in rows]
