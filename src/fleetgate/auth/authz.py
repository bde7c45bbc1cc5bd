"""Authorization rules as pure functions over a principal; no I/O, no await."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetgate.errors import Forbidden
from fleetgate.records import Role


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    role: Role
    groups: tuple[str, ...]  # empty: every group

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}"

    @property
    def scoped(self) -> bool:
        return bool(self.groups)

    def visible_groups(self) -> tuple[str, ...] | None:
        """The groups this principal may see, or None for all of them."""
        return self.groups if self.groups else None


SYSTEM = Principal(token_id="system", name="system", role=Role.ADMIN, groups=())  # noqa: S106


def in_scope(principal: Principal, group: str) -> bool:
    return not principal.groups or group in principal.groups


def require_group(principal: Principal, group: str) -> None:
    if not in_scope(principal, group):
        raise Forbidden(f"this token is limited to groups {', '.join(principal.groups)}")


def require_writer(principal: Principal) -> None:
    """Operators and admins make changes; viewers only read."""
    if principal.role is Role.VIEWER:
        raise Forbidden("a viewer token cannot make changes; use an operator or admin token")


def require_write(principal: Principal, group: str) -> None:
    """Devices: operators and admins write, within their groups."""
    require_writer(principal)
    require_group(principal, group)


def require_admin(principal: Principal) -> None:
    if principal.role is not Role.ADMIN:
        raise Forbidden(
            f"a token with role {principal.role.value} cannot do this; use an admin token"
        )


def require_unscoped_admin(principal: Principal, what: str) -> None:
    require_admin(principal)
    if principal.scoped:
        raise Forbidden(f"{what} needs an admin token that is not limited to groups")


def require_grantable(principal: Principal, role: Role, groups: Sequence[str]) -> None:
    """A token may only mint tokens no stronger and no wider than itself."""
    require_admin(principal)
    if principal.scoped:
        if not groups:
            raise Forbidden("a token limited to groups can only create tokens limited to groups")
        outside = sorted(set(groups) - set(principal.groups))
        if outside:
            raise Forbidden(f"groups outside this token's scope: {', '.join(outside)}")
    del role  # every role is at most admin


def can_see_token(principal: Principal, token_groups: Sequence[str]) -> bool:
    if not principal.scoped:
        return True
    return bool(token_groups) and set(token_groups) <= set(principal.groups)
