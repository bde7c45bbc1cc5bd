"""Authorization rules and bearer tokens."""

from __future__ import annotations

import pytest

from fleetgate.auth.authz import (
    SYSTEM,
    Principal,
    can_see_token,
    in_scope,
    require_admin,
    require_grantable,
    require_group,
    require_unscoped_admin,
    require_write,
)
from fleetgate.auth.bearer import TOKEN_PREFIX, digest, new_bearer, new_token_id
from fleetgate.errors import Forbidden
from fleetgate.records import Role
from fleetgate.sealing import Secret


def principal(role: Role, *groups: str) -> Principal:
    return Principal(token_id="tok_1", name="t", role=role, groups=groups)


ADMIN = principal(Role.ADMIN)
OPERATOR = principal(Role.OPERATOR)
VIEWER = principal(Role.VIEWER)
SCOPED_ADMIN = principal(Role.ADMIN, "plant-a", "plant-b")
SCOPED_OPERATOR = principal(Role.OPERATOR, "plant-a")


def test_principal_properties() -> None:
    assert ADMIN.actor == "token:tok_1"
    assert not ADMIN.scoped
    assert ADMIN.visible_groups() is None
    assert SCOPED_ADMIN.scoped
    assert SCOPED_ADMIN.visible_groups() == ("plant-a", "plant-b")
    assert SYSTEM.role is Role.ADMIN
    assert not SYSTEM.scoped


def test_scope() -> None:
    assert in_scope(ADMIN, "anything")
    assert in_scope(SCOPED_ADMIN, "plant-b")
    assert not in_scope(SCOPED_ADMIN, "plant-c")
    require_group(SCOPED_ADMIN, "plant-a")
    with pytest.raises(Forbidden, match="limited to groups plant-a, plant-b"):
        require_group(SCOPED_ADMIN, "plant-c")


@pytest.mark.parametrize("who", [ADMIN, OPERATOR, SCOPED_ADMIN, SCOPED_OPERATOR])
def test_writers_may_write_in_scope(who: Principal) -> None:
    require_write(who, "plant-a")


def test_viewer_cannot_write() -> None:
    with pytest.raises(Forbidden, match="a viewer token cannot make changes"):
        require_write(VIEWER, "plant-a")
    with pytest.raises(Forbidden):
        require_write(principal(Role.VIEWER, "plant-a"), "plant-a")


@pytest.mark.parametrize("who", [SCOPED_ADMIN, SCOPED_OPERATOR])
def test_scoped_writers_cannot_write_outside_scope(who: Principal) -> None:
    with pytest.raises(Forbidden, match="limited to groups"):
        require_write(who, "plant-z")


def test_only_admins_administer() -> None:
    require_admin(ADMIN)
    require_admin(SCOPED_ADMIN)
    with pytest.raises(Forbidden, match="role operator cannot do this; use an admin token"):
        require_admin(OPERATOR)
    with pytest.raises(Forbidden, match="use an admin token"):
        require_admin(VIEWER)


def test_unscoped_admin_required() -> None:
    require_unscoped_admin(ADMIN, "key rotation")
    with pytest.raises(Forbidden, match="key rotation needs an admin token that is not limited"):
        require_unscoped_admin(SCOPED_ADMIN, "key rotation")
    with pytest.raises(Forbidden, match="use an admin token"):
        require_unscoped_admin(OPERATOR, "key rotation")


@pytest.mark.parametrize("role", list(Role))
def test_unscoped_admin_may_grant_anything(role: Role) -> None:
    require_grantable(ADMIN, role, [])
    require_grantable(ADMIN, role, ["any-group"])


@pytest.mark.parametrize("groups", [["plant-a"], ["plant-a", "plant-b"], ["plant-b"]])
def test_scoped_admin_may_grant_within_scope(groups: list[str]) -> None:
    require_grantable(SCOPED_ADMIN, Role.ADMIN, groups)
    require_grantable(SCOPED_ADMIN, Role.VIEWER, groups)


def test_scoped_admin_cannot_grant_unscoped() -> None:
    with pytest.raises(Forbidden, match="can only create tokens limited to groups"):
        require_grantable(SCOPED_ADMIN, Role.VIEWER, [])


def test_scoped_admin_cannot_grant_wider() -> None:
    with pytest.raises(Forbidden, match="groups outside this token's scope: plant-c, plant-d"):
        require_grantable(SCOPED_ADMIN, Role.OPERATOR, ["plant-d", "plant-a", "plant-c"])


@pytest.mark.parametrize("who", [OPERATOR, VIEWER, SCOPED_OPERATOR])
def test_non_admins_cannot_grant(who: Principal) -> None:
    with pytest.raises(Forbidden):
        require_grantable(who, Role.VIEWER, ["plant-a"])


def test_can_see_token() -> None:
    assert can_see_token(ADMIN, [])
    assert can_see_token(ADMIN, ["x"])
    assert can_see_token(SCOPED_ADMIN, ["plant-a"])
    assert can_see_token(SCOPED_ADMIN, ["plant-a", "plant-b"])
    assert not can_see_token(SCOPED_ADMIN, [])
    assert not can_see_token(SCOPED_ADMIN, ["plant-a", "plant-c"])
    assert not can_see_token(SCOPED_ADMIN, ["plant-c"])


# --- bearer tokens ------------------------------------------------------------------------


def test_bearers_are_prefixed_and_distinct() -> None:
    bearers = [new_bearer() for _ in range(50)]
    texts = {b.reveal_text() for b in bearers}
    assert len(texts) == 50
    assert TOKEN_PREFIX == "fgt_"
    for text in texts:
        assert text.startswith(TOKEN_PREFIX)
        assert len(text) >= len(TOKEN_PREFIX) + 43  # 32 random bytes in url-safe base64
    assert all(isinstance(b, Secret) for b in bearers)


def test_token_ids_are_distinct() -> None:
    ids = {new_token_id() for _ in range(50)}
    assert len(ids) == 50
    for token_id in ids:
        assert token_id.startswith("tok_")
        int(token_id[4:], 16)


def test_digest_is_deterministic_and_distinct() -> None:
    bearer = new_bearer()
    again = Secret(bearer.reveal_text())
    assert digest(bearer) == digest(again)
    assert len(digest(bearer)) == 32
    assert digest(bearer) != digest(new_bearer())
    assert digest(Secret("fgt_a")) != digest(Secret("fgt_b"))
    assert bearer.reveal() not in digest(bearer)
