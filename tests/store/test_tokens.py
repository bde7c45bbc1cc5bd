"""API tokens through TokenService: minting, authenticating, scoping, and never storing bearers."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from fleetgate.auth.authz import Principal
from fleetgate.clock import FakeClock
from fleetgate.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from fleetgate.records import Role
from fleetgate.sealing import Secret
from fleetgate.services.context import SYSTEM_CALLER, Caller
from fleetgate.services.groups import GroupService
from fleetgate.services.tokens import TokenService
from fleetgate.store import Database

from .helpers import caller, count, rows, table_names


def _contains(value: Any, needle: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | bytearray | memoryview):
        return needle.encode() in bytes(value)
    return needle in str(value)


async def test_create_returns_the_bearer_once_and_it_authenticates(
    tokens: TokenService, groups: GroupService
) -> None:
    token, bearer = await tokens.create(
        SYSTEM_CALLER, name="ci", role=Role.OPERATOR, groups=("default",), expires_at=None
    )
    assert bearer.reveal_text().startswith("fgt_")
    assert token.created_by == "token:system"
    assert token.groups == ("default",)

    principal = await tokens.authenticate(bearer.reveal_text())
    assert principal == Principal(
        token_id=token.id, name="ci", role=Role.OPERATOR, groups=("default",)
    )
    assert await tokens.get(SYSTEM_CALLER, token.id) == token


async def test_wrong_or_malformed_bearer_is_unauthenticated(tokens: TokenService) -> None:
    _, bearer = await tokens.create(
        SYSTEM_CALLER, name="ci", role=Role.ADMIN, groups=(), expires_at=None
    )
    for wrong in (bearer.reveal_text() + "x", bearer.reveal_text()[:-1], "fgt_nope", "", "x" * 600):
        with pytest.raises(Unauthenticated):
            await tokens.authenticate(wrong)


async def test_expired_token_is_unauthenticated(tokens: TokenService, clock: FakeClock) -> None:
    expires_at = clock.now() + timedelta(hours=1)
    token, bearer = await tokens.create(
        SYSTEM_CALLER, name="short", role=Role.VIEWER, groups=(), expires_at=expires_at
    )
    assert token.expires_at == expires_at
    assert (await tokens.get(SYSTEM_CALLER, token.id)).expires_at == expires_at

    clock.advance(3599)
    assert (await tokens.authenticate(bearer.reveal_text())).token_id == token.id
    clock.advance(2)
    with pytest.raises(Unauthenticated, match="expired"):
        await tokens.authenticate(bearer.reveal_text())


async def test_expiry_in_the_past_is_invalid(tokens: TokenService, clock: FakeClock) -> None:
    with pytest.raises(InvalidRequest):
        await tokens.create(
            SYSTEM_CALLER, name="x", role=Role.VIEWER, groups=(), expires_at=clock.now()
        )


async def test_the_bearer_is_never_stored(
    tokens: TokenService, groups: GroupService, db: Database, clock: FakeClock
) -> None:
    bearers: list[Secret] = []
    for role in Role:
        _, bearer = await tokens.create(
            caller(Role.ADMIN),
            name=f"t-{role.value}",
            role=role,
            groups=("default",) if role is Role.VIEWER else (),
            expires_at=clock.now() + timedelta(days=1),
        )
        bearers.append(bearer)
    supplied = Secret("fgt_supplied-by-the-operator-0123456789")
    await tokens.create(
        SYSTEM_CALLER, name="s", role=Role.ADMIN, groups=(), expires_at=None, bearer=supplied
    )
    bearers.append(supplied)
    await tokens.delete(
        SYSTEM_CALLER, (await tokens.list(SYSTEM_CALLER, limit=1, cursor=None)).items[0].id
    )

    assert await count(db, "api_tokens") == 3  # 4 minted, 1 deleted
    assert await count(db, "audit_log") == 5
    for table in await table_names(db):
        for row in await rows(db, table):
            for column, value in row.items():
                for bearer in bearers:
                    text = bearer.reveal_text()
                    assert not _contains(value, text), f"{table}.{column} holds a bearer"
                    # Nor a recognisable piece of one.
                    assert not _contains(value, text[4:24]), f"{table}.{column} holds a bearer"
    for row in await rows(db, "api_tokens"):
        assert isinstance(row["secret_hash"], bytes)
        assert len(row["secret_hash"]) == 32


async def test_scoped_admin_cannot_mint_unscoped_or_wider_tokens(
    tokens: TokenService, groups: GroupService, db: Database
) -> None:
    for name in ("a", "b"):
        await groups.create(SYSTEM_CALLER, name, "", {})
    admin_a = caller(Role.ADMIN, "a")
    with pytest.raises(Forbidden):
        await tokens.create(admin_a, name="wide", role=Role.VIEWER, groups=(), expires_at=None)
    with pytest.raises(Forbidden, match="outside this token's scope: b"):
        await tokens.create(
            admin_a, name="wider", role=Role.VIEWER, groups=("a", "b"), expires_at=None
        )
    with pytest.raises(Forbidden):
        await tokens.create(admin_a, name="other", role=Role.ADMIN, groups=("b",), expires_at=None)
    assert await count(db, "api_tokens") == 0

    token, bearer = await tokens.create(
        admin_a, name="ok", role=Role.OPERATOR, groups=("a",), expires_at=None
    )
    assert (await tokens.authenticate(bearer.reveal_text())).groups == ("a",)
    assert token.created_by == admin_a.principal.actor

    for role in (Role.OPERATOR, Role.VIEWER):
        with pytest.raises(Forbidden):
            await tokens.create(
                caller(role), name="x", role=Role.VIEWER, groups=("a",), expires_at=None
            )


async def test_token_for_an_unknown_group_is_not_found(tokens: TokenService, db: Database) -> None:
    with pytest.raises(NotFound):
        await tokens.create(
            SYSTEM_CALLER, name="x", role=Role.VIEWER, groups=("nowhere",), expires_at=None
        )
    assert await count(db, "api_tokens") == 0
    assert await count(db, "audit_log") == 0


async def test_scoped_admin_sees_only_tokens_within_its_scope(
    tokens: TokenService, groups: GroupService
) -> None:
    for name in ("a", "b"):
        await groups.create(SYSTEM_CALLER, name, "", {})
    unscoped, _ = await tokens.create(
        SYSTEM_CALLER, name="root", role=Role.ADMIN, groups=(), expires_at=None
    )
    in_a, _ = await tokens.create(
        SYSTEM_CALLER, name="in-a", role=Role.VIEWER, groups=("a",), expires_at=None
    )
    in_b, _ = await tokens.create(
        SYSTEM_CALLER, name="in-b", role=Role.VIEWER, groups=("b",), expires_at=None
    )
    admin_a = caller(Role.ADMIN, "a")
    assert [t.id for t in (await tokens.list(admin_a, limit=100, cursor=None)).items] == [in_a.id]
    assert await tokens.get(admin_a, in_a.id) == in_a
    for hidden in (unscoped, in_b):
        with pytest.raises(NotFound):
            await tokens.get(admin_a, hidden.id)
        with pytest.raises(NotFound):
            await tokens.delete(admin_a, hidden.id)
    everything = await tokens.list(SYSTEM_CALLER, limit=100, cursor=None)
    assert sorted(t.id for t in everything.items) == sorted([unscoped.id, in_a.id, in_b.id])


async def test_deleted_token_no_longer_authenticates(tokens: TokenService) -> None:
    token, bearer = await tokens.create(
        SYSTEM_CALLER, name="x", role=Role.VIEWER, groups=(), expires_at=None
    )
    await tokens.delete(SYSTEM_CALLER, token.id)
    with pytest.raises(Unauthenticated):
        await tokens.authenticate(bearer.reveal_text())
    with pytest.raises(NotFound):
        await tokens.get(SYSTEM_CALLER, token.id)


async def test_the_last_admin_token_cannot_delete_itself(tokens: TokenService) -> None:
    token, bearer = await tokens.create(
        SYSTEM_CALLER, name="only", role=Role.ADMIN, groups=(), expires_at=None
    )
    me = await tokens.authenticate(bearer.reveal_text())
    with pytest.raises(Forbidden, match="last token"):
        await tokens.delete(Caller(principal=me), token.id)
    assert await tokens.get(SYSTEM_CALLER, token.id) == token


async def test_token_list_pages_through_every_token(tokens: TokenService) -> None:
    created = set()
    for n in range(7):
        token, _ = await tokens.create(
            SYSTEM_CALLER, name=f"t{n}", role=Role.VIEWER, groups=(), expires_at=None
        )
        created.add(token.id)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = await tokens.list(SYSTEM_CALLER, limit=3, cursor=cursor)
        seen.extend(t.id for t in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(created)


async def test_bootstrap_admin_mints_only_on_an_empty_store(
    tokens: TokenService, db: Database
) -> None:
    first = await tokens.bootstrap_admin(SYSTEM_CALLER, None)
    assert first is not None
    principal = await tokens.authenticate(first.reveal_text())
    assert (principal.role, principal.groups) == (Role.ADMIN, ())

    assert await tokens.bootstrap_admin(SYSTEM_CALLER, None) is None
    assert await tokens.bootstrap_admin(SYSTEM_CALLER, Secret("fgt_given-0123456789abcdef")) is None
    assert await count(db, "api_tokens") == 1


async def test_bootstrap_admin_with_a_given_bearer(tokens: TokenService) -> None:
    given = Secret("fgt_given-0123456789abcdef")
    assert await tokens.bootstrap_admin(SYSTEM_CALLER, given) == given
    assert (await tokens.authenticate(given.reveal_text())).role is Role.ADMIN


async def test_bootstrap_admin_does_nothing_when_any_token_exists(tokens: TokenService) -> None:
    await tokens.create(SYSTEM_CALLER, name="v", role=Role.VIEWER, groups=(), expires_at=None)
    assert await tokens.bootstrap_admin(SYSTEM_CALLER, None) is None


async def test_concurrent_bootstraps_mint_exactly_one_admin(
    tokens: TokenService, db: Database
) -> None:
    """Several nodes starting together on one empty store must mint one bootstrap admin.

    BUG (src/fleetgate/services/tokens.py, TokenService.bootstrap_admin): the "no token yet"
    check runs in a read snapshot and the insert in a later, separate transaction, so every
    node that checks before the first insert commits mints its own admin token.
    """
    results = await asyncio.gather(
        *(tokens.bootstrap_admin(SYSTEM_CALLER, None) for _ in range(3)), return_exceptions=True
    )
    minted = [r for r in results if isinstance(r, Secret)]
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert len(minted) == 1, f"{len(minted)} bootstrap admin tokens were minted"
    assert await count(db, "api_tokens") == 1
