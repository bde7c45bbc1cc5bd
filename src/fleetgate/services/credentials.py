"""The credential store: named credentials whose secret parts are sealed and write-only.

Kinds: ``x509`` (certificate, key, chain: issued here or imported), ``password`` (username +
password), ``psk`` (identity + key), ``hmac`` (key id + key), ``api_token`` (an upstream's token).
A credential may belong to a device; routes find a device's credential through a template such
as ``aws-#{imsi}``, with a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from fleetgate.auth.authz import require_group, require_write, require_writer
from fleetgate.clock import Clock
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.pki.keys import load_private_key_pem, private_key_pem
from fleetgate.pki.records import Credential, CredentialKind
from fleetgate.records import Device, NewAuditEntry, Page
from fleetgate.sealing import Secret
from fleetgate.services.authority import AuthorityService, load_certificates_pem, pem
from fleetgate.services.context import Caller, check_limit, decode_cursor, encode_cursor
from fleetgate.services.credential_records import (
    audit_credential,
    check_credential_id,
    credential_entry,
    credential_snapshot,
    refuse_system,
)
from fleetgate.services.vault import Vault
from fleetgate.store import Database, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.credentials import CredentialRepo, secret_name
from fleetgate.store.devices import DeviceRepo
from fleetgate.store.sealed import SealedSecretRepo
from fleetgate.templates import Template

MAX_SECRET_BYTES = 16 * 1024
MIN_PSK_BYTES = 16
MIN_HMAC_BYTES = 32
_REQUIRED_PUBLIC = {
    CredentialKind.PASSWORD: "username",
    CredentialKind.PSK: "identity",
    CredentialKind.HMAC: "key_id",
}


@dataclass(frozen=True)
class CredentialInput:
    id: str
    kind: CredentialKind
    description: str = ""
    device_id: str | None = None
    public: Mapping[str, Any] = field(default_factory=dict)
    secret: Secret | None = None
    certificate_pem: str | None = None
    chain_pem: str | None = None


def _check_public(kind: CredentialKind, public: Mapping[str, Any]) -> None:
    if len(public) > 16 or any(not isinstance(v, str) or len(v) > 256 for v in public.values()):
        raise InvalidRequest("public holds at most 16 strings of 256 characters", field="public")
    needed = _REQUIRED_PUBLIC.get(kind)
    if needed and not public.get(needed):
        raise InvalidRequest(f"a {kind.value} credential needs public.{needed}", field="public")


def _check_secret(kind: CredentialKind, secret: Secret) -> Secret:
    value = secret.reveal()
    if not value or len(value) > MAX_SECRET_BYTES:
        raise InvalidRequest(f"the secret is 1-{MAX_SECRET_BYTES} bytes", field="secret")
    if kind is CredentialKind.PSK:
        try:
            key = bytes.fromhex(value.decode())
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("a PSK is given in hex, like 1a2b3c…", field="secret") from None
        if len(key) < MIN_PSK_BYTES:
            raise InvalidRequest(f"a PSK has at least {MIN_PSK_BYTES} bytes", field="secret")
        return Secret(key)
    if kind is CredentialKind.HMAC and len(value) < MIN_HMAC_BYTES:
        raise InvalidRequest(f"an HMAC key has at least {MIN_HMAC_BYTES} bytes", field="secret")
    return secret


class CredentialService:
    def __init__(
        self, db: Database, vault: Vault, authority: AuthorityService, clock: Clock
    ) -> None:
        self._db = db
        self._vault = vault
        self._authority = authority
        self._clock = clock

    # -- reading ---------------------------------------------------------------------------------

    async def _device(self, tx: Tx, caller: Caller, device_id: str, *, write: bool) -> Device:
        device = await DeviceRepo(tx).get(device_id)
        if device is None:
            raise NotFound(f"device {device_id} does not exist", field="device_id")
        (require_write if write else require_group)(caller.principal, device.group)
        return device

    async def _authorize(
        self, tx: Tx, caller: Caller, credential: Credential, *, write: bool
    ) -> None:
        """Device credentials follow the device's group; shared ones need an unscoped token."""
        if credential.device_id is not None:
            device = await DeviceRepo(tx).get(credential.device_id)
            if device is not None:
                (require_write if write else require_group)(caller.principal, device.group)
                return
        if caller.principal.scoped:
            raise NotFound(f"credential {credential.id} does not exist")
        if write:
            require_writer(caller.principal)

    async def get(self, caller: Caller, credential_id: str) -> Credential:
        async with self._db.snapshot() as tx:
            credential = await CredentialRepo(tx).get(credential_id)
            if credential is None:
                raise NotFound(f"credential {credential_id} does not exist")
            await self._authorize(tx, caller, credential, write=False)
        return credential

    async def list(
        self,
        caller: Caller,
        *,
        limit: int,
        cursor: str | None,
        device_id: str | None = None,
        kind: CredentialKind | None = None,
    ) -> Page[Credential]:
        check_limit(limit)
        async with self._db.snapshot() as tx:
            if device_id is not None:
                await self._device(tx, caller, device_id, write=False)
            elif caller.principal.scoped:
                raise InvalidRequest(
                    "a token limited to groups lists credentials per device: add device_id",
                    field="device_id",
                )
            items = await CredentialRepo(tx).list(
                limit=limit + 1, after=decode_cursor(cursor), device_id=device_id, kind=kind
            )
        more = len(items) > limit
        items = items[:limit]
        return Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)

    async def resolve(
        self, device: Device, template: Template, default: str | None
    ) -> Credential | None:
        """The credential ``template`` names for ``device``, else ``default``, else None."""
        wanted = template.expand(device.id, device.group, device.attributes)
        async with self._db.snapshot() as tx:
            repo = CredentialRepo(tx)
            found = await repo.get(wanted)
            if found is not None and found.device_id not in (None, device.id):
                found = None  # another device's credential is never handed out
            if found is None and default:
                found = await repo.get(default)
                if found is not None and found.device_id not in (None, device.id):
                    found = None
        return found

    async def secret(self, credential: Credential) -> Secret | None:
        """The sealed part, for the gateway's own use (never for an API answer)."""
        return await self._vault.get(secret_name(credential.id)) if credential.has_secret else None

    # -- writing ---------------------------------------------------------------------------------

    async def create(self, caller: Caller, spec: CredentialInput) -> Credential:
        check_credential_id(spec.id)
        _check_public(spec.kind, spec.public)
        now = self._clock.now()
        certificate: bytes | None = None
        chain: str | None = None
        not_after = None
        secret = spec.secret
        if spec.kind is CredentialKind.X509:
            certificate, chain, not_after, secret = self._x509_material(spec)
        elif secret is None:
            raise InvalidRequest(f"a {spec.kind.value} credential needs a secret", field="secret")
        else:
            secret = _check_secret(spec.kind, secret)
        if len(spec.description) > 1000:
            raise InvalidRequest("description is at most 1000 characters", field="description")
        credential = Credential(
            id=spec.id,
            kind=spec.kind,
            description=spec.description,
            device_id=spec.device_id,
            public=dict(spec.public),
            certificate_serial=None,
            certificate=certificate,
            chain=chain,
            not_after=not_after,
            has_secret=secret is not None,
            exported_at=None,
            created_at=now,
            updated_at=now,
            revision=1,
        )
        async with self._db.transaction() as tx:
            if spec.device_id is not None:
                await self._device(tx, caller, spec.device_id, write=True)
            elif caller.principal.scoped:
                raise InvalidRequest(
                    "a token limited to groups creates credentials for a device: add device_id",
                    field="device_id",
                )
            else:
                require_writer(caller.principal)
            repo = CredentialRepo(tx)
            if await repo.get(spec.id) is not None:
                raise Conflict(f"credential {spec.id} already exists", field="id")
            await repo.insert(credential)
            if secret is not None:
                await self._vault.put_in(tx, secret_name(spec.id), secret)
            await self._audit(tx, caller, "credential.create", None, credential)
        return credential

    def _x509_material(self, spec: CredentialInput) -> tuple[bytes, str | None, Any, Secret]:
        if not spec.certificate_pem or spec.secret is None:
            raise InvalidRequest(
                "an x509 credential needs certificate (PEM) and secret (its private key, PEM)",
                field="certificate",
            )
        leaf_list = load_certificates_pem(spec.certificate_pem, "certificate")
        if len(leaf_list) != 1:
            raise InvalidRequest("give exactly one certificate", field="certificate")
        leaf = leaf_list[0]
        key = load_private_key_pem(spec.secret.reveal())
        if key.public_key() != leaf.public_key():
            raise InvalidRequest(
                "the private key does not belong to the certificate", field="secret"
            )
        chain = None
        if spec.chain_pem:
            chain = "".join(pem(c) for c in load_certificates_pem(spec.chain_pem, "chain"))
        if leaf.not_valid_after_utc <= self._clock.now():
            raise InvalidRequest("the certificate has expired", field="certificate")
        return (
            leaf.public_bytes(serialization.Encoding.DER),
            chain,
            leaf.not_valid_after_utc,
            Secret(private_key_pem(key)),
        )

    async def update(
        self,
        caller: Caller,
        credential_id: str,
        *,
        description: str | None = None,
        public: Mapping[str, Any] | None = None,
        secret: Secret | None = None,
    ) -> Credential:
        """Change public parts or replace the secret (rotating a password, PSK or key)."""
        async with self._db.transaction() as tx:
            repo = CredentialRepo(tx)
            current = await self._for_change(tx, caller, credential_id, "changed")
            if public is not None:
                _check_public(current.kind, public)
            if secret is not None:
                if current.kind is CredentialKind.X509:
                    raise InvalidRequest(
                        "an x509 credential's key changes with its certificate: issue or import "
                        "a new one",
                        field="secret",
                    )
                secret = _check_secret(current.kind, secret)
                await self._vault.put_in(tx, secret_name(current.id), secret)
            updated = replace(
                current,
                description=description if description is not None else current.description,
                public=dict(public) if public is not None else current.public,
                has_secret=current.has_secret or secret is not None,
                updated_at=self._clock.now(),
                revision=current.revision + 1,
            )
            if not await repo.replace(updated, expected_revision=current.revision):
                raise Conflict(f"credential {credential_id} changed meanwhile; try again")
            after = credential_snapshot(updated) | {"secret_replaced": secret is not None}
            await AuditRepo(tx).append(
                self._entry(
                    caller, "credential.update", credential_snapshot(current), after, updated
                ),
                self._clock.now(),
            )
        return updated

    async def delete(self, caller: Caller, credential_id: str) -> None:
        async with self._db.transaction() as tx:
            repo = CredentialRepo(tx)
            current = await self._for_change(tx, caller, credential_id, "deleted")
            await repo.delete(credential_id)
            await self._vault_delete(tx, credential_id)
            await self._audit(tx, caller, "credential.delete", current, None)

    async def _for_change(
        self, tx: Tx, caller: Caller, credential_id: str, what: str
    ) -> Credential:
        """The credential, if it exists, is not fleetgate's own, and the caller may change it."""
        current = await CredentialRepo(tx).get(credential_id)
        if current is None:
            raise NotFound(f"credential {credential_id} does not exist")
        refuse_system(credential_id, what)
        await self._authorize(tx, caller, current, write=True)
        return current

    async def _vault_delete(self, tx: Tx, credential_id: str) -> None:
        await SealedSecretRepo(tx).delete(secret_name(credential_id))

    async def export(
        self, caller: Caller, credential_id: str, *, fmt: str, password: Secret | None
    ) -> tuple[str, bytes]:
        """An x509 credential's key, once: (media type, body). PEM or password-protected PKCS#12."""
        async with self._db.transaction() as tx:
            repo = CredentialRepo(tx)
            current = await self._for_change(tx, caller, credential_id, "exported")
            if current.kind is not CredentialKind.X509 or not current.has_secret:
                raise InvalidRequest("only an x509 credential with a key can be exported")
            if current.exported_at is not None:
                raise Conflict(
                    f"credential {credential_id}'s key was exported at "
                    f"{current.exported_at.isoformat()}; a key leaves fleetgate once"
                )
            key_pem = await self._vault.get_in(tx, secret_name(credential_id))
            assert key_pem is not None
            assert current.certificate is not None
            certificate = x509.load_der_x509_certificate(current.certificate)
            chain = x509.load_pem_x509_certificates(current.chain.encode()) if current.chain else []
            if fmt == "pkcs12":
                if password is None or len(password) < 8:
                    raise InvalidRequest(
                        "PKCS#12 needs a password of 8 characters or more", field="password"
                    )
                body = pkcs12.serialize_key_and_certificates(
                    current.id.encode(),
                    load_private_key_pem(key_pem.reveal()),  # type: ignore[arg-type]
                    certificate,
                    chain or None,
                    serialization.BestAvailableEncryption(password.reveal()),
                )
                media = "application/pkcs12"
            elif fmt == "pem":
                body = (
                    key_pem.reveal()
                    + pem(certificate).encode()
                    + "".join(pem(c) for c in chain).encode()
                )
                media = "application/x-pem-file"
            else:
                raise InvalidRequest("format is pem or pkcs12", field="format")
            exported = replace(
                current, exported_at=self._clock.now(), revision=current.revision + 1
            )
            await repo.replace(exported, expected_revision=current.revision)
            await self._audit(
                tx, caller, "credential.export", current, exported, extra={"format": fmt}
            )
        return media, body

    async def _audit(
        self,
        tx: Tx,
        caller: Caller,
        action: str,
        before: Credential | None,
        after: Credential | None,
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        await audit_credential(tx, caller, action, before, after, self._clock.now(), extra=extra)

    @staticmethod
    def _entry(
        caller: Caller,
        action: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        subject: Credential,
    ) -> NewAuditEntry:
        return credential_entry(caller, action, before, after, subject)
