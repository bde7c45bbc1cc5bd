"""What every credential write shares: id rules and the audit log's picture of a credential."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from fleetgate.errors import Forbidden, InvalidRequest
from fleetgate.pki.records import Credential
from fleetgate.records import NewAuditEntry
from fleetgate.services.context import Caller
from fleetgate.store import Tx
from fleetgate.store.audit import AuditRepo

CREDENTIAL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


# Credentials fleetgate keeps for itself (the OCSP responder's key) carry this prefix; the API
# can neither create, change, export nor delete them.
SYSTEM_PREFIX = "fleetgate-"


def is_system(credential_id: str) -> bool:
    return credential_id.startswith(SYSTEM_PREFIX)


def check_credential_id(value: str) -> str:
    if not CREDENTIAL_ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"credential id {value[:140]!r} must be 1-128 letters, digits or . _ : @ + -",
            field="id",
        )
    if is_system(value):
        raise InvalidRequest(
            f"credential ids starting {SYSTEM_PREFIX} are fleetgate's own", field="id"
        )
    return value


def refuse_system(credential_id: str, what: str) -> None:
    if is_system(credential_id):
        raise Forbidden(
            f"credential {credential_id} is fleetgate's own (an OCSP responder key); it cannot "
            f"be {what} through the API"
        )


def device_credential_id(device_id: str) -> str:
    return f"device-{device_id}"


def credential_snapshot(c: Credential) -> dict[str, Any]:
    """The audit log's picture: public parts only."""
    return {
        "id": c.id,
        "kind": c.kind.value,
        "device_id": c.device_id,
        "public": dict(c.public),
        "certificate_serial": c.certificate_serial,
        "not_after": c.not_after.isoformat() if c.not_after else None,
        "has_secret": c.has_secret,
    }


async def audit_credential(
    tx: Tx,
    caller: Caller,
    action: str,
    before: Credential | None,
    after: Credential | None,
    at: datetime,
    *,
    extra: Mapping[str, Any] | None = None,
) -> None:
    subject = after or before
    assert subject is not None
    after_snapshot = credential_snapshot(after) | dict(extra or {}) if after else None
    await AuditRepo(tx).append(
        credential_entry(
            caller, action, credential_snapshot(before) if before else None, after_snapshot, subject
        ),
        at,
    )


def credential_entry(
    caller: Caller,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    subject: Credential,
) -> NewAuditEntry:
    return NewAuditEntry(
        actor=caller.principal.actor,
        action=action,
        target_type="credential",
        target_id=subject.id,
        request_id=caller.request_id,
        source=caller.source,
        before=before,
        after=after,
    )
