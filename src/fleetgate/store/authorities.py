"""Certificate authorities: roots, issuing CAs and trusted outside CAs."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.pki.records import CaRole, CertificateAuthority
from fleetgate.store.database import Row, Tx

_COLUMNS = "id, role, name, certificate, key_secret, parent_id, active, created_at"


def _authority(row: Row) -> CertificateAuthority:
    return CertificateAuthority(
        id=row["id"],
        role=CaRole(row["role"]),
        name=row["name"],
        certificate=x509.load_der_x509_certificate(bytes(row["certificate"])),
        key_secret=row["key_secret"],
        parent_id=row["parent_id"],
        active=bool(row["active"]),
        created_at=from_epoch_us(row["created_at"]),
    )


class AuthorityRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def insert(self, ca: CertificateAuthority) -> None:
        await self._tx.execute(
            f"INSERT INTO certificate_authorities ({_COLUMNS}, not_after) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ca.id,
            ca.role.value,
            ca.name,
            ca.certificate.public_bytes(serialization.Encoding.DER),
            ca.key_secret,
            ca.parent_id,
            1 if ca.active else 0,
            to_epoch_us(ca.created_at),
            to_epoch_us(ca.not_after),
        )

    async def get(self, ca_id: str) -> CertificateAuthority | None:
        row = await self._tx.fetchrow(
            f"SELECT {_COLUMNS} FROM certificate_authorities WHERE id = ?", ca_id
        )
        return _authority(row) if row else None

    async def active(self, role: CaRole) -> CertificateAuthority | None:
        row = await self._tx.fetchrow(
            f"SELECT {_COLUMNS} FROM certificate_authorities WHERE role = ? AND active = 1",
            role.value,
        )
        return _authority(row) if row else None

    async def deactivate(self, role: CaRole) -> None:
        await self._tx.execute(
            "UPDATE certificate_authorities SET active = 0 WHERE role = ? AND active = 1",
            role.value,
        )

    async def all(self) -> list[CertificateAuthority]:
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM certificate_authorities ORDER BY created_at, id"
        )
        return [_authority(r) for r in rows]
