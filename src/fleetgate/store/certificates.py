"""Every certificate the CA issued, with its revocation state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.pki.crl import RevocationReason
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import IssuedCertificate
from fleetgate.store.database import Row, Tx

_COLUMNS = (
    "serial, issuer_id, profile, subject, sans, device_id, credential_id, key_algorithm, "
    "not_before, not_after, der, revoked_at, revocation_reason, renewed_by, created_at"
)
_INSERT_COLUMNS = _COLUMNS + ", renew_after"


def _certificate(row: Row) -> IssuedCertificate:
    return IssuedCertificate(
        serial=row["serial"],
        issuer_id=row["issuer_id"],
        profile=Profile(row["profile"]),
        subject=row["subject"],
        sans=tuple(json.loads(row["sans"])),
        device_id=row["device_id"],
        credential_id=row["credential_id"],
        key_algorithm=KeyAlgorithm(row["key_algorithm"]),
        not_before=from_epoch_us(row["not_before"]),
        not_after=from_epoch_us(row["not_after"]),
        der=bytes(row["der"]),
        revoked_at=from_epoch_us(row["revoked_at"]) if row["revoked_at"] is not None else None,
        revocation_reason=(
            RevocationReason(row["revocation_reason"]) if row["revocation_reason"] else None
        ),
        renewed_by=row["renewed_by"],
        created_at=from_epoch_us(row["created_at"]),
    )


@dataclass(frozen=True)
class CertificateQuery:
    device_id: str | None = None
    credential_id: str | None = None
    profile: Profile | None = None
    issuer_id: str | None = None
    revoked: bool | None = None
    expiring_before: datetime | None = None  # not_after earlier than this
    valid_at: datetime | None = None  # not expired at this moment
    renewed: bool | None = None
    # Leave out those fleetgate renews by itself whose renewal is not overdue at this moment:
    # (now, renew_at_fraction, grace in seconds); see RENEWING_ON_TIME.
    not_renewing_on_time: tuple[datetime, float, float] | None = None


# A certificate whose key fleetgate holds (it renews it) and whose renewal point, plus a grace,
# is still ahead: arguments renew_at_fraction, grace (µs), now (µs).
RENEWING_ON_TIME = (
    "(credential_id IS NOT NULL AND "
    "not_before + (not_after - not_before) * CAST(? AS DOUBLE PRECISION) + ? > ?)"
)


def _on_time_args(at: tuple[datetime, float, float]) -> list[Any]:
    now, fraction, grace_s = at
    return [fraction, int(grace_s * 1_000_000), to_epoch_us(now)]


class CertificateRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def insert(self, cert: IssuedCertificate, *, renew_after: datetime | None = None) -> None:
        """Record ``cert``; ``renew_after`` marks one whose key fleetgate holds for renewal."""
        await self._tx.execute(
            f"INSERT INTO certificates ({_INSERT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            cert.serial,
            cert.issuer_id,
            cert.profile.value,
            cert.subject,
            json.dumps(list(cert.sans)),
            cert.device_id,
            cert.credential_id,
            cert.key_algorithm.value,
            to_epoch_us(cert.not_before),
            to_epoch_us(cert.not_after),
            cert.der,
            to_epoch_us(cert.revoked_at) if cert.revoked_at else None,
            cert.revocation_reason.value if cert.revocation_reason else None,
            cert.renewed_by,
            to_epoch_us(cert.created_at),
            to_epoch_us(renew_after) if renew_after else None,
        )

    async def exists(self, serial: str) -> bool:
        row = await self._tx.fetchrow("SELECT 1 AS one FROM certificates WHERE serial = ?", serial)
        return row is not None

    async def get(self, serial: str) -> IssuedCertificate | None:
        row = await self._tx.fetchrow(
            f"SELECT {_COLUMNS} FROM certificates WHERE serial = ?", serial
        )
        return _certificate(row) if row else None

    async def revoke(self, serial: str, at: datetime, reason: RevocationReason) -> bool:
        changed = await self._tx.execute(
            "UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
            "WHERE serial = ? AND revoked_at IS NULL",
            to_epoch_us(at),
            reason.value,
            serial,
        )
        return changed == 1

    async def mark_renewed(self, serial: str, successor: str) -> bool:
        changed = await self._tx.execute(
            "UPDATE certificates SET renewed_by = ? WHERE serial = ? AND renewed_by IS NULL",
            successor,
            serial,
        )
        return changed == 1

    async def set_device(self, serial: str, device_id: str | None) -> None:
        await self._tx.execute(
            "UPDATE certificates SET device_id = ? WHERE serial = ?", device_id, serial
        )

    async def count_renewing_on_time(self, now: datetime, fraction: float, grace_s: float) -> int:
        """Live certificates (not revoked, not renewed, not expired) fleetgate renews by itself
        whose renewal is not overdue at ``now``."""
        row = await self._tx.fetchrow(
            "SELECT COUNT(*) AS n FROM certificates WHERE revoked_at IS NULL "
            f"AND renewed_by IS NULL AND not_after > ? AND {RENEWING_ON_TIME}",
            to_epoch_us(now),
            *_on_time_args((now, fraction, grace_s)),
        )
        return int(row["n"]) if row is not None else 0

    async def due_for_renewal(self, now: datetime, *, limit: int) -> list[IssuedCertificate]:
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM certificates WHERE credential_id IS NOT NULL "
            "AND renewed_by IS NULL AND revoked_at IS NULL AND renew_after <= ? "
            "ORDER BY renew_after LIMIT ?",
            to_epoch_us(now),
            limit,
        )
        return [_certificate(r) for r in rows]

    async def revoked_by(self, issuer_id: str, *, still_valid_at: datetime) -> list[Row]:
        """Revoked, unexpired certificates of one issuer: what its CRL must list."""
        return await self._tx.fetch(
            "SELECT serial, revoked_at, revocation_reason FROM certificates "
            "WHERE issuer_id = ? AND revoked_at IS NOT NULL AND not_after > ? ORDER BY serial",
            issuer_id,
            to_epoch_us(still_valid_at),
        )

    async def list(
        self, query: CertificateQuery, *, limit: int, after: str | None = None
    ) -> list[IssuedCertificate]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("device_id", query.device_id),
            ("credential_id", query.credential_id),
            ("profile", query.profile.value if query.profile else None),
            ("issuer_id", query.issuer_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.revoked is not None:
            where.append("revoked_at IS NOT NULL" if query.revoked else "revoked_at IS NULL")
        if query.renewed is not None:
            where.append("renewed_by IS NOT NULL" if query.renewed else "renewed_by IS NULL")
        if query.expiring_before is not None:
            where.append("not_after < ?")
            args.append(to_epoch_us(query.expiring_before))
        if query.valid_at is not None:
            where.append("not_after > ?")
            args.append(to_epoch_us(query.valid_at))
        if query.not_renewing_on_time is not None:
            where.append(f"NOT {RENEWING_ON_TIME}")
            args.extend(_on_time_args(query.not_renewing_on_time))
        if after is not None:
            where.append("serial > ?")
            args.append(after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM certificates {clause} ORDER BY serial LIMIT ?", *args, limit
        )
        return [_certificate(r) for r in rows]
