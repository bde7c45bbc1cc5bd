"""API tokens, kept only as SHA-256 digests of the bearer string."""

from __future__ import annotations

import json
from typing import Any

from fleetgate.clock import from_epoch_us, to_epoch_us
from fleetgate.records import ApiToken, Role
from fleetgate.store.database import Row, Tx

_COLUMNS = "id, name, role, groups, created_at, expires_at, created_by"


def _token(row: Row) -> ApiToken:
    return ApiToken(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        groups=tuple(json.loads(row["groups"])),
        created_at=from_epoch_us(row["created_at"]),
        expires_at=from_epoch_us(row["expires_at"]) if row["expires_at"] is not None else None,
        created_by=row["created_by"],
    )


class TokenRepo:
    def __init__(self, tx: Tx) -> None:
        self._tx = tx

    async def insert(self, token: ApiToken, secret_hash: bytes) -> None:
        await self._tx.execute(
            f"INSERT INTO api_tokens ({_COLUMNS}, secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            token.id,
            token.name,
            token.role.value,
            json.dumps(list(token.groups)),
            to_epoch_us(token.created_at),
            to_epoch_us(token.expires_at) if token.expires_at else None,
            token.created_by,
            secret_hash,
        )

    async def get(self, token_id: str) -> ApiToken | None:
        row = await self._tx.fetchrow(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = ?", token_id)
        return _token(row) if row else None

    async def get_by_hash(self, secret_hash: bytes) -> ApiToken | None:
        row = await self._tx.fetchrow(
            f"SELECT {_COLUMNS} FROM api_tokens WHERE secret_hash = ?", secret_hash
        )
        return _token(row) if row else None

    async def delete(self, token_id: str) -> bool:
        return await self._tx.execute("DELETE FROM api_tokens WHERE id = ?", token_id) == 1

    async def count(self) -> int:
        row = await self._tx.fetchrow("SELECT COUNT(*) AS n FROM api_tokens")
        return int(row["n"]) if row else 0

    async def list(self, *, limit: int, after: str | None = None) -> list[ApiToken]:
        args: list[Any] = []
        clause = ""
        if after is not None:
            clause = "WHERE id > ?"
            args.append(after)
        rows = await self._tx.fetch(
            f"SELECT {_COLUMNS} FROM api_tokens {clause} ORDER BY id LIMIT ?", *args, limit
        )
        return [_token(r) for r in rows]
