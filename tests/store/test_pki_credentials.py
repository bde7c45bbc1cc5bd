"""The credential store (CredentialService) on both backends: kinds and their validation,
secrets sealed and write-only, template resolution, and scoping."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from fleetgate.clock import FakeClock
from fleetgate.errors import Conflict, Forbidden, InvalidRequest, NotFound
from fleetgate.pki.records import CredentialKind
from fleetgate.records import Role
from fleetgate.sealing import Secret
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.services.credentials import CredentialInput
from fleetgate.store import Database
from fleetgate.templates import Template

from .helpers import audit_entries, caller, rows
from .pki_fixtures import (
    add_device,
    build_services,
    import_x509,
    key_public_der,
    public_der,
    self_signed_pem,
    x509_of,
)

PASSWORD = "pw-Zq8!correct-horse-battery"
PSK_HEX = "00112233445566778899aabbccddeeff0f1e2d3c"
HMAC_KEY = "k" * 24 + "-hmac-secret-material-0123456789"
API_TOKEN = "tok_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@pytest.fixture
async def pki(db: Database, clock: FakeClock) -> Services:
    services = await build_services(db, clock)
    for group in ("fleet-a", "fleet-b"):
        await services.groups.create(SYSTEM_CALLER, group, "", {})
    return services


def spec(
    credential_id: str,
    kind: CredentialKind,
    secret: str | bytes | None,
    public: Mapping[str, Any] | None = None,
    device_id: str | None = None,
) -> CredentialInput:
    return CredentialInput(
        id=credential_id,
        kind=kind,
        device_id=device_id,
        public=dict(public or {}),
        secret=Secret(secret) if secret is not None else None,
    )


async def stored_values(db: Database) -> list[bytes]:
    """Every value of every column of the tables a secret could leak into, as bytes."""
    found: list[bytes] = []
    for table in ("sealed_secrets", "credentials", "audit_log"):
        for row in await rows(db, table):
            for value in row.values():
                if isinstance(value, (bytes, bytearray, memoryview)):
                    found.append(bytes(value))
                elif value is not None:
                    found.append(str(value).encode())
    return found


def assert_nowhere(values: list[bytes], *needles: bytes) -> None:
    for needle in needles:
        assert len(needle) >= 8
        leaks = [v[:80] for v in values if needle in v]
        assert leaks == [], f"{needle[:12]!r}… stored in clear"


@pytest.mark.parametrize(
    ("kind", "public", "secret", "field"),
    [
        (CredentialKind.PASSWORD, {}, PASSWORD, "public"),
        (CredentialKind.PASSWORD, {"username": ""}, PASSWORD, "public"),
        (CredentialKind.PASSWORD, {"username": "u"}, None, "secret"),
        (CredentialKind.PASSWORD, {"username": "u"}, "", "secret"),
        (CredentialKind.PSK, {}, PSK_HEX, "public"),
        (CredentialKind.PSK, {"identity": "dev-1"}, "not hex at all, no", "secret"),
        (CredentialKind.PSK, {"identity": "dev-1"}, "00" * 15, "secret"),
        (CredentialKind.HMAC, {}, HMAC_KEY, "public"),
        (CredentialKind.HMAC, {"key_id": "k1"}, "x" * 31, "secret"),
        (CredentialKind.API_TOKEN, {}, None, "secret"),
        (CredentialKind.PASSWORD, {"username": 7}, PASSWORD, "public"),
    ],
)
async def test_each_kind_validates_what_it_needs(
    pki: Services,
    db: Database,
    kind: CredentialKind,
    public: Mapping[str, Any],
    secret: str | None,
    field: str,
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await pki.credentials.create(SYSTEM_CALLER, spec("c-1", kind, secret, public))
    assert refused.value.field == field
    assert await rows(db, "credentials") == []
    assert [r for r in await rows(db, "sealed_secrets") if r["name"] == "credential:c-1"] == []


async def test_valid_credentials_of_each_kind_are_accepted(pki: Services) -> None:
    made = [
        await pki.credentials.create(
            SYSTEM_CALLER, spec("pw", CredentialKind.PASSWORD, PASSWORD, {"username": "u"})
        ),
        await pki.credentials.create(
            SYSTEM_CALLER, spec("psk", CredentialKind.PSK, "00" * 16, {"identity": "dev-1"})
        ),
        await pki.credentials.create(
            SYSTEM_CALLER, spec("hmac", CredentialKind.HMAC, "y" * 32, {"key_id": "k1"})
        ),
        await pki.credentials.create(SYSTEM_CALLER, spec("tok", CredentialKind.API_TOKEN, "t")),
    ]
    assert [c.has_secret for c in made] == [True] * 4
    assert [c.revision for c in made] == [1] * 4
    with pytest.raises(Conflict):
        await pki.credentials.create(
            SYSTEM_CALLER, spec("pw", CredentialKind.PASSWORD, PASSWORD, {"username": "u"})
        )
    with pytest.raises(InvalidRequest):
        await pki.credentials.create(SYSTEM_CALLER, spec("bad id!", CredentialKind.API_TOKEN, "t"))


async def test_x509_needs_a_certificate_and_its_own_key(pki: Services, clock: FakeClock) -> None:
    now = clock.now()
    certificate_pem, key_pem, certificate, _ = self_signed_pem(
        "broker client", now - timedelta(minutes=1), now + timedelta(days=90)
    )
    _, other_key_pem, _, _ = self_signed_pem("other", now, now + timedelta(days=1))
    expired_pem, expired_key, _, _ = self_signed_pem(
        "old", now - timedelta(days=10), now - timedelta(days=1)
    )

    async def refused(certificate: str | None, key: bytes | None) -> InvalidRequest:
        with pytest.raises(InvalidRequest) as caught:
            await pki.credentials.create(
                SYSTEM_CALLER,
                CredentialInput(
                    id="x",
                    kind=CredentialKind.X509,
                    certificate_pem=certificate,
                    secret=Secret(key) if key is not None else None,
                ),
            )
        return caught.value

    assert (await refused(None, key_pem)).field == "certificate"
    assert (await refused(certificate_pem, None)).field == "certificate"
    assert (await refused(certificate_pem, other_key_pem)).field == "secret"
    assert (await refused(certificate_pem, b"not a key")).field == "key"
    assert (await refused("not PEM", key_pem)).field == "certificate"
    assert (await refused(certificate_pem + certificate_pem, key_pem)).field == "certificate"
    assert (await refused(expired_pem, expired_key)).field == "certificate"

    made = await pki.credentials.create(
        SYSTEM_CALLER,
        CredentialInput(
            id="x",
            kind=CredentialKind.X509,
            certificate_pem=certificate_pem,
            secret=Secret(key_pem),
        ),
    )
    assert made.certificate is not None
    assert x509_of(made.certificate) == certificate
    assert made.not_after == certificate.not_valid_after_utc
    assert made.certificate_serial is None  # not issued here
    secret = await pki.credentials.secret(made)
    assert secret is not None
    assert key_public_der(secret.reveal()) == public_der(certificate)


async def test_secrets_are_never_stored_in_clear_and_read_back_through_secret(
    pki: Services, db: Database, clock: FakeClock
) -> None:
    await add_device(pki, "dev-1", group="fleet-a")
    made = {
        "pw": await pki.credentials.create(
            SYSTEM_CALLER,
            spec("pw", CredentialKind.PASSWORD, PASSWORD, {"username": "u"}, "dev-1"),
        ),
        "psk": await pki.credentials.create(
            SYSTEM_CALLER, spec("psk", CredentialKind.PSK, PSK_HEX, {"identity": "dev-1"})
        ),
        "hmac": await pki.credentials.create(
            SYSTEM_CALLER, spec("hmac", CredentialKind.HMAC, HMAC_KEY, {"key_id": "k1"})
        ),
        "tok": await pki.credentials.create(
            SYSTEM_CALLER, spec("tok", CredentialKind.API_TOKEN, API_TOKEN)
        ),
        "x509": await import_x509(pki, clock, "x509", timedelta(days=30)),
    }
    assert await pki.credentials.secret(made["pw"]) == Secret(PASSWORD)
    assert await pki.credentials.secret(made["psk"]) == Secret(bytes.fromhex(PSK_HEX))
    assert await pki.credentials.secret(made["hmac"]) == Secret(HMAC_KEY)
    assert await pki.credentials.secret(made["tok"]) == Secret(API_TOKEN)
    key = await pki.credentials.secret(made["x509"])
    assert key is not None
    private = serialization.load_pem_private_key(key.reveal(), password=None)
    raw_key = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_body = b"".join(key.reveal().splitlines()[1:-1])

    values = await stored_values(db)
    assert values  # the scan saw the rows
    assert_nowhere(
        values,
        PASSWORD.encode(),
        PSK_HEX.encode(),
        bytes.fromhex(PSK_HEX),
        HMAC_KEY.encode(),
        API_TOKEN.encode(),
        raw_key,
        pem_body[:40],
        pem_body[-40:],
    )
    sealed = {r["name"] for r in await rows(db, "sealed_secrets")}
    assert {f"credential:{name}" for name in made} <= sealed

    # Reading a credential through the API gives its public parts only.
    listed = await pki.credentials.list(SYSTEM_CALLER, limit=10, cursor=None)
    assert {c.id for c in listed.items} == set(made)
    assert all(PASSWORD not in repr(c) for c in listed.items)


async def test_update_replaces_the_secret(pki: Services, db: Database) -> None:
    first = await pki.credentials.create(
        SYSTEM_CALLER, spec("pw", CredentialKind.PASSWORD, PASSWORD, {"username": "u"})
    )
    rotated = "rotated-Pw-4f1e-2b8c-longer-one"
    updated = await pki.credentials.update(SYSTEM_CALLER, "pw", secret=Secret(rotated))
    assert updated.revision == first.revision + 1
    assert await pki.credentials.secret(updated) == Secret(rotated)
    assert_nowhere(await stored_values(db), rotated.encode(), PASSWORD.encode())
    (entry,) = await audit_entries(db, action="credential.update", target_id="pw")
    assert entry.after is not None
    assert entry.after["secret_replaced"] is True

    # Public parts change without touching the secret, and keep their validation.
    renamed = await pki.credentials.update(SYSTEM_CALLER, "pw", public={"username": "u2"})
    assert renamed.public == {"username": "u2"}
    assert await pki.credentials.secret(renamed) == Secret(rotated)
    with pytest.raises(InvalidRequest):
        await pki.credentials.update(SYSTEM_CALLER, "pw", public={})
    with pytest.raises(InvalidRequest):
        await pki.credentials.update(SYSTEM_CALLER, "pw", secret=Secret(""))
    await pki.credentials.create(
        SYSTEM_CALLER, spec("psk", CredentialKind.PSK, PSK_HEX, {"identity": "i"})
    )
    with pytest.raises(InvalidRequest):
        await pki.credentials.update(SYSTEM_CALLER, "psk", secret=Secret("abcd"))
    assert await pki.credentials.secret(await pki.credentials.get(SYSTEM_CALLER, "psk")) == Secret(
        bytes.fromhex(PSK_HEX)
    )
    with pytest.raises(NotFound):
        await pki.credentials.update(SYSTEM_CALLER, "nope", secret=Secret(rotated))


async def test_template_resolution_with_default_and_missing_attribute(pki: Services) -> None:
    with_imsi = await add_device(pki, "dev-imsi", attributes={"imsi": "001019999999999"})
    other_imsi = await add_device(pki, "dev-other", attributes={"imsi": "001018888888888"})
    without = await add_device(pki, "dev-bare")
    await pki.credentials.create(
        SYSTEM_CALLER,
        spec("aws-001019999999999", CredentialKind.API_TOKEN, "t1", device_id="dev-imsi"),
    )
    await pki.credentials.create(SYSTEM_CALLER, spec("aws-default", CredentialKind.API_TOKEN, "t0"))
    template = Template.parse("aws-#{imsi}")

    found = await pki.credentials.resolve(with_imsi, template, "aws-default")
    assert found is not None
    assert found.id == "aws-001019999999999"
    fallback = await pki.credentials.resolve(other_imsi, template, "aws-default")
    assert fallback is not None
    assert fallback.id == "aws-default"
    assert await pki.credentials.resolve(other_imsi, template, None) is None
    assert await pki.credentials.resolve(other_imsi, template, "no-such-default") is None
    with pytest.raises(InvalidRequest, match="imsi"):
        await pki.credentials.resolve(without, template, "aws-default")
    by_id = await pki.credentials.resolve(
        without, Template.parse("aws-#{device_id}"), "aws-default"
    )
    assert by_id is not None
    assert by_id.id == "aws-default"


async def test_scoped_callers_see_only_their_groups_device_credentials(pki: Services) -> None:
    await add_device(pki, "dev-a", group="fleet-a")
    await add_device(pki, "dev-b", group="fleet-b")
    await pki.credentials.create(
        SYSTEM_CALLER, spec("shared", CredentialKind.API_TOKEN, "shared-token")
    )
    await pki.credentials.create(
        SYSTEM_CALLER, spec("of-b", CredentialKind.API_TOKEN, "b-token", device_id="dev-b")
    )
    scoped = caller(Role.ADMIN, "fleet-a")
    operator = caller(Role.OPERATOR, "fleet-a")

    mine = await pki.credentials.create(
        operator, spec("of-a", CredentialKind.API_TOKEN, "a-token", device_id="dev-a")
    )
    assert (await pki.credentials.get(scoped, "of-a")).id == mine.id
    listed = await pki.credentials.list(scoped, limit=10, cursor=None, device_id="dev-a")
    assert [c.id for c in listed.items] == ["of-a"]

    with pytest.raises(NotFound):
        await pki.credentials.get(scoped, "shared")
    with pytest.raises(NotFound):
        await pki.credentials.update(operator, "shared", description="mine now")
    with pytest.raises(NotFound):
        await pki.credentials.delete(operator, "shared")
    with pytest.raises(InvalidRequest):
        await pki.credentials.list(scoped, limit=10, cursor=None)
    with pytest.raises(InvalidRequest):
        await pki.credentials.create(operator, spec("new-shared", CredentialKind.API_TOKEN, "t"))
    with pytest.raises(Forbidden):
        await pki.credentials.get(scoped, "of-b")
    with pytest.raises(Forbidden):
        await pki.credentials.list(scoped, limit=10, cursor=None, device_id="dev-b")
    with pytest.raises(Forbidden):
        await pki.credentials.create(
            operator, spec("into-b", CredentialKind.API_TOKEN, "t", device_id="dev-b")
        )
    with pytest.raises(Forbidden):
        await pki.credentials.update(caller(Role.VIEWER, "fleet-a"), "of-a", description="x")

    # The unscoped admin still sees everything.
    assert (await pki.credentials.get(SYSTEM_CALLER, "shared")).device_id is None
    everything = await pki.credentials.list(SYSTEM_CALLER, limit=10, cursor=None)
    assert {c.id for c in everything.items} == {"shared", "of-a", "of-b"}
