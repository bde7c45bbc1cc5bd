"""The certificate authority as a service: its hierarchy, and issuing certificates from it.

CA private keys are sealed in the store like every other secret (``ca:<id>:key``), so every
node of a cluster can issue. Issuer objects are cached per CA id: a CA's certificate and key
never change under the same id.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleetgate.clock import Clock
from fleetgate.config.schema import PkiConfig
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.logs import get_logger
from fleetgate.pki.authority import (
    ORGANIZATION,
    CertificateRequest,
    Issuer,
    RevocationUrls,
    Subject,
    Validity,
    issue,
    self_signed,
)
from fleetgate.pki.keys import (
    KeyAlgorithm,
    PrivateKey,
    PublicKey,
    algorithm_of,
    generate_key,
    load_private_key_pem,
    private_key_pem,
)
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import CaRole, CertificateAuthority, IssuedCertificate, serial_hex
from fleetgate.records import NewAuditEntry
from fleetgate.sealing import Secret
from fleetgate.services.context import Caller
from fleetgate.services.vault import Vault
from fleetgate.store import Database, Tx
from fleetgate.store.audit import AuditRepo
from fleetgate.store.authorities import AuthorityRepo
from fleetgate.store.certificates import CertificateRepo

log = get_logger("fleetgate.pki")
MAX_PEM_BYTES = 64 * 1024


def ca_key_secret(ca_id: str) -> str:
    return f"ca:{ca_id}:key"


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def load_certificates_pem(data: str, field: str) -> list[x509.Certificate]:
    if len(data) > MAX_PEM_BYTES:
        raise InvalidRequest(f"at most {MAX_PEM_BYTES} bytes of PEM", field=field)
    try:
        found = x509.load_pem_x509_certificates(data.encode())
        for certificate in found:
            # The library parses lazily: read everything now, so a certificate that cannot be
            # fully read is refused here rather than failing later, deep inside issuing.
            _ = certificate.extensions, certificate.subject, certificate.issuer
            algorithm_of(certificate.public_key())
            certificate.subject.rfc4514_string()
    except InvalidRequest as exc:
        raise InvalidRequest(exc.detail, field=field) from None
    except Exception as exc:  # noqa: BLE001 - hostile PEM raises many kinds
        raise InvalidRequest(
            f"not usable PEM certificates: {type(exc).__name__}: {exc}"[:300], field=field
        ) from None
    return found


def sans_of(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    out += [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
    out += [f"URI:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"email:{n}" for n in san.get_values_for_type(x509.RFC822Name)]
    return tuple(out)


def common_name(certificate: x509.Certificate) -> str:
    found = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class Issuance:
    """What to certify; the service adds serial, validity, issuer and revocation URLs."""

    profile: Profile
    subject: Subject
    public_key: PublicKey
    lifetime: timedelta
    device_id: str | None = None
    credential_id: str | None = None


class AuthorityService:
    def __init__(
        self, db: Database, vault: Vault, clock: Clock, config: PkiConfig, public_url: str
    ) -> None:
        self._db = db
        self._vault = vault
        self._clock = clock
        self.config = config
        self.public_url = public_url.rstrip("/")
        self._issuers: dict[str, Issuer] = {}

    # -- hierarchy ------------------------------------------------------------------------------

    def urls_for(self, issuer_id: str) -> RevocationUrls:
        base = self.public_url
        return RevocationUrls(
            crl=f"{base}/pki/crl/{issuer_id}.der",
            ocsp=f"{base}/pki/ocsp",
            ca_issuers=f"{base}/pki/ca/{issuer_id}.der",
        )

    async def issuer(self, tx: Tx, ca: CertificateAuthority) -> Issuer:
        cached = self._issuers.get(ca.id)
        if cached is not None:
            return cached
        if ca.key_secret is None:
            raise Conflict(f"fleetgate does not hold the key of CA {ca.id} ({ca.name})")
        key_pem = await self._vault.get_in(tx, ca.key_secret)
        if key_pem is None:
            raise Conflict(f"the sealed key of CA {ca.id} is missing from the store")
        issuer = Issuer(ca.id, ca.certificate, load_private_key_pem(key_pem.reveal()))
        self._issuers[ca.id] = issuer
        return issuer

    async def active_issuer(self, tx: Tx) -> tuple[CertificateAuthority, Issuer]:
        ca = await AuthorityRepo(tx).active(CaRole.ISSUING)
        if ca is None:
            raise NotFound("there is no issuing CA yet; run `fleetgate ca init` or start serve")
        return ca, await self.issuer(tx, ca)

    async def authorities(self) -> list[CertificateAuthority]:
        async with self._db.snapshot() as tx:
            return await AuthorityRepo(tx).all()

    async def ensure_hierarchy(self, caller: Caller, algorithm: KeyAlgorithm | None = None) -> bool:
        """Create root and issuing CA unless an issuing CA exists; True if it created them."""
        async with self._db.snapshot() as tx:
            if await AuthorityRepo(tx).active(CaRole.ISSUING) is not None:
                return False
        chosen = algorithm or KeyAlgorithm(self.config.key_algorithm)
        root_key, issuing_key = await asyncio.gather(
            asyncio.to_thread(generate_key, chosen), asyncio.to_thread(generate_key, chosen)
        )
        now = self._clock.now()
        root_id, issuing_id = f"root-{secrets.token_hex(4)}", f"issuing-{secrets.token_hex(4)}"
        root_cert = self_signed(
            CertificateRequest(
                profile=Profile.ROOT_CA,
                subject=Subject(f"fleetgate Root CA {root_id}", organization=ORGANIZATION),
                public_key=root_key.public_key(),
                serial=x509.random_serial_number(),
                validity=Validity.starting(now, timedelta(days=self.config.root_lifetime_days)),
            ),
            root_key,
        )
        root = CertificateAuthority(
            root_id, CaRole.ROOT, "root", root_cert, ca_key_secret(root_id), None, True, now
        )
        async with self._db.transaction() as tx:
            if await AuthorityRepo(tx).active(CaRole.ISSUING) is not None:
                return False  # another node won the race
            await AuthorityRepo(tx).insert(root)
            await self._vault.put_in(tx, ca_key_secret(root_id), Secret(private_key_pem(root_key)))
            await self._audit_ca(tx, caller, "ca.create", root)
            await self._add_issuing(tx, caller, issuing_id, issuing_key, root, root_key)
        log.info("pki.ca_created", root=root_id, issuing=issuing_id, algorithm=chosen.value)
        return True

    async def _add_issuing(
        self,
        tx: Tx,
        caller: Caller,
        issuing_id: str,
        issuing_key: PrivateKey,
        root: CertificateAuthority,
        root_key: PrivateKey,
    ) -> CertificateAuthority:
        now = self._clock.now()
        issuing_cert = issue(
            CertificateRequest(
                profile=Profile.ISSUING_CA,
                subject=Subject(f"fleetgate Issuing CA {issuing_id}", organization=ORGANIZATION),
                public_key=issuing_key.public_key(),
                serial=x509.random_serial_number(),
                validity=Validity.starting(
                    now,
                    timedelta(days=self.config.issuing_lifetime_days),
                    cap=root.not_after,
                ),
                urls=replace(self.urls_for(root.id), ocsp=None),
            ),
            Issuer(root.id, root.certificate, root_key),
        )
        issuing = CertificateAuthority(
            issuing_id,
            CaRole.ISSUING,
            "issuing",
            issuing_cert,
            ca_key_secret(issuing_id),
            root.id,
            True,
            now,
        )
        repo = AuthorityRepo(tx)
        await repo.deactivate(CaRole.ISSUING)
        await repo.insert(issuing)
        await self._vault.put_in(
            tx, ca_key_secret(issuing_id), Secret(private_key_pem(issuing_key))
        )
        await self._audit_ca(tx, caller, "ca.create", issuing)
        return issuing

    async def rotate_issuing(self, caller: Caller) -> CertificateAuthority:
        """A new issuing CA under the same root; the old one keeps serving CRL and OCSP."""
        async with self._db.snapshot() as tx:
            root = await AuthorityRepo(tx).active(CaRole.ROOT)
            old = await AuthorityRepo(tx).active(CaRole.ISSUING)
        if root is None or root.key_secret is None:
            raise Conflict("fleetgate does not hold a root key to sign a new issuing CA with")
        algorithm = (
            algorithm_of(old.certificate.public_key())
            if old
            else KeyAlgorithm(self.config.key_algorithm)
        )
        key = await asyncio.to_thread(generate_key, algorithm)
        async with self._db.transaction() as tx:
            root_issuer = await self.issuer(tx, root)
            issuing = await self._add_issuing(
                tx, caller, f"issuing-{secrets.token_hex(4)}", key, root, root_issuer.key
            )
        log.info("pki.issuing_rotated", issuing=issuing.id, previous=old.id if old else None)
        return issuing

    async def import_issuer(
        self, caller: Caller, certificate_pem: str, key_pem: str, chain_pem: str | None
    ) -> CertificateAuthority:
        """Issue from an existing CA: its certificate, key, and the chain up to its root."""
        certificates = load_certificates_pem(certificate_pem, "certificate")
        if len(certificates) != 1:
            raise InvalidRequest("give exactly one CA certificate", field="certificate")
        certificate = certificates[0]
        key = load_private_key_pem(key_pem.encode())
        if key.public_key() != certificate.public_key():
            raise InvalidRequest("the key does not belong to the certificate", field="key")
        _require_ca(certificate, "certificate", signing=True)
        chain = load_certificates_pem(chain_pem, "chain") if chain_pem else []
        links = [certificate, *chain]
        for position, (child, parent) in enumerate(itertools.pairwise(links)):
            try:
                child.verify_directly_issued_by(parent)
            except Exception:  # noqa: BLE001 - ValueError, TypeError or InvalidSignature
                raise InvalidRequest(
                    f"chain[{position}] ({common_name(parent)}) did not sign "
                    f"{common_name(child)}; give the chain nearest issuer first, up to the root",
                    field="chain",
                ) from None
        now = self._clock.now()
        if certificate.not_valid_after_utc <= now:
            raise InvalidRequest("the CA certificate has expired", field="certificate")
        ca_id = f"issuing-{secrets.token_hex(4)}"
        async with self._db.transaction() as tx:
            repo = AuthorityRepo(tx)
            parent_id: str | None = None
            for position, parent in enumerate(reversed(chain)):
                _require_ca(parent, f"chain[{len(chain) - 1 - position}]", signing=False)
                role = CaRole.ROOT if parent.issuer == parent.subject else CaRole.TRUSTED
                parent_ca = CertificateAuthority(
                    f"{role.value}-{secrets.token_hex(4)}",
                    role,
                    common_name(parent),
                    parent,
                    None,
                    parent_id,
                    False,
                    now,
                )
                await repo.insert(parent_ca)
                parent_id = parent_ca.id
            await repo.deactivate(CaRole.ISSUING)
            imported = CertificateAuthority(
                ca_id,
                CaRole.ISSUING,
                common_name(certificate),
                certificate,
                ca_key_secret(ca_id),
                parent_id,
                True,
                now,
            )
            await repo.insert(imported)
            await self._vault.put_in(tx, ca_key_secret(ca_id), Secret(private_key_pem(key)))
            await self._audit_ca(tx, caller, "ca.import", imported)
        return imported

    async def trust(self, caller: Caller, certificate_pem: str, name: str) -> CertificateAuthority:
        """Trust an outside CA (a manufacturer's, say) for device authentication only."""
        certificates = load_certificates_pem(certificate_pem, "certificate")
        if len(certificates) != 1:
            raise InvalidRequest("give exactly one CA certificate", field="certificate")
        certificate = certificates[0]
        _require_ca(certificate, "certificate", signing=False)
        ca = CertificateAuthority(
            f"trusted-{secrets.token_hex(4)}",
            CaRole.TRUSTED,
            name or common_name(certificate),
            certificate,
            None,
            None,
            False,
            self._clock.now(),
        )
        async with self._db.transaction() as tx:
            await AuthorityRepo(tx).insert(ca)
            await self._audit_ca(tx, caller, "ca.trust", ca)
        return ca

    async def chain(self) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        """(issuing CAs still valid, newest first; roots) for /pki/ca.pem and friends."""
        now = self._clock.now()
        everyone = await self.authorities()
        issuing = [
            ca.certificate
            for ca in reversed(everyone)
            if ca.role is CaRole.ISSUING and ca.not_after > now
        ]
        roots = [ca.certificate for ca in everyone if ca.role is CaRole.ROOT and ca.not_after > now]
        return issuing, roots

    # -- issuing --------------------------------------------------------------------------------

    async def issue_in(
        self, tx: Tx, issuance: Issuance, *, ca: CertificateAuthority | None = None
    ) -> tuple[IssuedCertificate, str]:
        """Sign and record a certificate inside ``tx``; (record, chain PEM without the root).

        The active issuing CA signs unless ``ca`` is given (an OCSP responder must be signed by
        the CA it answers for)."""
        if ca is None:
            ca, issuer = await self.active_issuer(tx)
        else:
            issuer = await self.issuer(tx, ca)
        repo = CertificateRepo(tx)
        serial = x509.random_serial_number()  # 159 random bits
        while await repo.exists(serial_hex(serial)):
            serial = x509.random_serial_number()
        now = self._clock.now()
        certificate = issue(
            CertificateRequest(
                profile=issuance.profile,
                subject=issuance.subject,
                public_key=issuance.public_key,
                serial=serial,
                validity=Validity.starting(now, issuance.lifetime, cap=ca.not_after),
                urls=self.urls_for(ca.id),
            ),
            issuer,
        )
        record = IssuedCertificate(
            serial=serial_hex(serial),
            issuer_id=ca.id,
            profile=issuance.profile,
            subject=issuance.subject.common_name,
            sans=sans_of(certificate),
            device_id=issuance.device_id,
            credential_id=issuance.credential_id,
            key_algorithm=algorithm_of(issuance.public_key),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            der=certificate.public_bytes(serialization.Encoding.DER),
            revoked_at=None,
            revocation_reason=None,
            renewed_by=None,
            created_at=now,
        )
        await repo.insert(record, renew_after=self.renew_after(record))
        return record, pem(ca.certificate)

    def renew_after(self, record: IssuedCertificate) -> datetime | None:
        """When a certificate whose key fleetgate holds is due for renewal (None: not ours)."""
        if record.credential_id is None:
            return None
        lifetime = record.not_after - record.not_before
        return record.not_before + lifetime * self.config.renew_at_fraction

    async def _audit_ca(
        self, tx: Tx, caller: Caller, action: str, ca: CertificateAuthority
    ) -> None:
        await AuditRepo(tx).append(
            NewAuditEntry(
                actor=caller.principal.actor,
                action=action,
                target_type="ca",
                target_id=ca.id,
                request_id=caller.request_id,
                source=caller.source,
                after={
                    "role": ca.role.value,
                    "name": ca.name,
                    "subject": ca.certificate.subject.rfc4514_string(),
                    "not_after": ca.not_after.isoformat(),
                    "key_held": ca.key_secret is not None,
                },
            ),
            self._clock.now(),
        )


def _require_ca(certificate: x509.Certificate, field: str, *, signing: bool) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidRequest("not a CA certificate (basicConstraints CA:TRUE missing)", field=field)
    if signing:
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return
        if not usage.key_cert_sign:
            raise InvalidRequest("the CA certificate may not sign certificates", field=field)
