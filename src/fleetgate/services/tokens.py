"""API token use cases: minting, listing, revoking, and resolving a bearer to a principal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fleetgate.auth.authz import Principal, can_see_token, require_admin, require_grantable
from fleetgate.auth.bearer import MAX_TOKEN_CHARS, digest, new_bearer, new_token_id
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from fleetgate.records import ApiToken, NewAuditEntry, Page, Role, check_group_name
from fleetgate.sealing import Secret
from fleetgate.services.context import Caller, check_limit, decode_cursor, encode_cursor
from fleetgate.store import Database
from fleetgate.store.audit import AuditRepo
from fleetgate.store.database import lock_table
from fleetgate.store.groups import GroupRepo
from fleetgate.store.tokens import TokenRepo

MAX_TOKEN_NAME_CHARS = 100


def token_snapshot(token: ApiToken) -> dict[str, Any]:
    """The audit log's picture of a token: never the secret nor its digest."""
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role.value,
        "groups": list(token.groups),
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
    }


class TokenService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def authenticate(self, bearer: str) -> Principal:
        if not bearer or len(bearer) > MAX_TOKEN_CHARS:
            raise Unauthenticated("missing or malformed bearer token")
        async with self._db.snapshot() as tx:
            token = await TokenRepo(tx).get_by_hash(digest(Secret(bearer)))
        if token is None:
            raise Unauthenticated("unknown bearer token")
        if token.expires_at is not None and token.expires_at <= self._clock.now():
            raise Unauthenticated(f"token {token.id} expired at {token.expires_at.isoformat()}")
        return Principal(token_id=token.id, name=token.name, role=token.role, groups=token.groups)

    async def create(
        self,
        caller: Caller,
        *,
        name: str,
        role: Role,
        groups: Sequence[str],
        expires_at: datetime | None,
        bearer: Secret | None = None,
        only_if_none_exist: bool = False,
    ) -> tuple[ApiToken, Secret]:
        """Mint a token; the bearer string is returned here once and never stored."""
        if not name.strip() or len(name) > MAX_TOKEN_NAME_CHARS:
            raise InvalidRequest(f"name must be 1-{MAX_TOKEN_NAME_CHARS} characters", field="name")
        for group in groups:
            check_group_name(group, "groups")
        require_grantable(caller.principal, role, groups)
        now = self._clock.now()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at is in the past", field="expires_at")
        secret = bearer if bearer is not None else new_bearer()
        token = ApiToken(
            id=new_token_id(),
            name=name,
            role=role,
            groups=tuple(sorted(set(groups))),
            created_at=now,
            expires_at=expires_at,
            created_by=caller.principal.actor,
        )
        async with self._db.transaction() as tx:
            if only_if_none_exist:
                await lock_table(tx, "api_tokens")
                if await TokenRepo(tx).count() > 0:
                    raise Conflict("a token already exists")
            for group in token.groups:
                if await GroupRepo(tx).get(group) is None:
                    raise NotFound(f"group {group} does not exist", field="groups")
            await TokenRepo(tx).insert(token, digest(secret))
            await AuditRepo(tx).append(self._audit(caller, "token.create", token, None), now)
        return token, secret

    async def bootstrap_admin(self, caller: Caller, bearer: Secret | None) -> Secret | None:
        """On a store with no token at all, mint the first admin token (returned once)."""
        async with self._db.snapshot() as tx:
            if await TokenRepo(tx).count() > 0:
                return None
        try:
            _, secret = await self.create(
                caller,
                name="bootstrap admin",
                role=Role.ADMIN,
                groups=(),
                expires_at=None,
                bearer=bearer,
                only_if_none_exist=True,
            )
        except Conflict:
            return None  # another process bootstrapped first
        return secret

    async def get(self, caller: Caller, token_id: str) -> ApiToken:
        require_admin(caller.principal)
        async with self._db.snapshot() as tx:
            token = await TokenRepo(tx).get(token_id)
        if token is None or not can_see_token(caller.principal, token.groups):
            raise NotFound(f"token {token_id} does not exist")
        return token

    async def list(self, caller: Caller, *, limit: int, cursor: str | None) -> Page[ApiToken]:
        require_admin(caller.principal)
        check_limit(limit)
        after = decode_cursor(cursor)
        visible: list[ApiToken] = []
        # Scope filtering happens here, so keep reading until a page is full.
        while len(visible) <= limit:
            async with self._db.snapshot() as tx:
                batch = await TokenRepo(tx).list(limit=limit + 1, after=after)
            visible.extend(t for t in batch if can_see_token(caller.principal, t.groups))
            if len(batch) <= limit:
                break
            after = batch[-1].id
        more = len(visible) > limit
        visible = visible[:limit]
        return Page(items=visible, next_cursor=encode_cursor(visible[-1].id) if more else None)

    async def delete(self, caller: Caller, token_id: str) -> None:
        require_admin(caller.principal)
        async with self._db.transaction() as tx:
            repo = TokenRepo(tx)
            token = await repo.get(token_id)
            if token is None or not can_see_token(caller.principal, token.groups):
                raise NotFound(f"token {token_id} does not exist")
            if token.id == caller.principal.token_id and token.role is Role.ADMIN:
                remaining = await repo.count()
                if remaining <= 1:
                    raise Forbidden("this is the last token; create another admin token first")
            await repo.delete(token_id)
            await AuditRepo(tx).append(
                self._audit(caller, "token.delete", None, token), self._clock.now()
            )

    @staticmethod
    def _audit(
        caller: Caller, action: str, after: ApiToken | None, before: ApiToken | None = None
    ) -> NewAuditEntry:
        subject = after or before
        assert subject is not None
        return NewAuditEntry(
            actor=caller.principal.actor,
            action=action,
            target_type="token",
            target_id=subject.id,
            group=subject.groups[0] if len(subject.groups) == 1 else None,
            request_id=caller.request_id,
            source=caller.source,
            before=token_snapshot(before) if before else None,
            after=token_snapshot(after) if after else None,
        )
