"""Shared helpers for the PKI service contract tests (``tests/store/test_pki_*.py``).

Plain functions rather than fixtures, so each test module states the configuration it builds
its services with. Everything is ECDSA P-256 to stay fast; time is the suite's ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from fleetgate.clock import FakeClock
from fleetgate.config.schema import PkiConfig
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.pki.ocsp import issuer_hashes, parse_request
from fleetgate.pki.records import (
    CaRole,
    CertificateAuthority,
    Credential,
    CredentialKind,
    IssuedCertificate,
)
from fleetgate.records import Device
from fleetgate.sealing import Keyring, MasterKey, Secret
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER, Caller
from fleetgate.services.credentials import CredentialInput
from fleetgate.services.devices import NewDevice
from fleetgate.store import Database
from fleetgate.store.certificates import CertificateQuery, CertificateRepo

DAY = 86_400
PUBLIC_URL = "http://pki.fleetgate.test"


# -- services -----------------------------------------------------------------------------------


async def build_services(
    db: Database, clock: FakeClock, pki: PkiConfig | None = None, keyring: Keyring | None = None
) -> Services:
    """One node's services with a default group and a CA hierarchy in the store."""
    services = Services.build(
        db,
        keyring or Keyring([MasterKey.generate()]),
        clock,
        pki=pki or PkiConfig(),
        public_url=PUBLIC_URL,
    )
    await services.groups.ensure_default()
    await services.authority.ensure_hierarchy(SYSTEM_CALLER)
    return services


def another_node(services: Services, clock: FakeClock) -> Services:
    """A second node over the same store, keyring and configuration (fresh in-memory caches)."""
    return Services.build(
        services.db,
        services.vault.keyring,
        clock,
        pki=services.authority.config,
        public_url=PUBLIC_URL,
    )


async def issuing_ca(services: Services) -> CertificateAuthority:
    """The active issuing CA."""
    found = [
        ca
        for ca in await services.authority.authorities()
        if ca.role is CaRole.ISSUING and ca.active
    ]
    assert len(found) == 1, found
    return found[0]


async def root_ca(services: Services) -> CertificateAuthority:
    found = [ca for ca in await services.authority.authorities() if ca.role is CaRole.ROOT]
    assert len(found) == 1, found
    return found[0]


# -- devices and certificates -------------------------------------------------------------------


async def add_device(
    services: Services,
    device_id: str,
    *,
    group: str = "default",
    attributes: Mapping[str, str] | None = None,
    addresses: tuple[str, ...] = (),
    caller: Caller = SYSTEM_CALLER,
) -> Device:
    return await services.devices.create(
        caller, NewDevice(id=device_id, group=group, attributes=attributes, addresses=addresses)
    )


def held_credential_id(device_id: str) -> str:
    """The id of the x509 credential fleetgate keeps for a device whose key it generated."""
    return f"device-{device_id}"


async def issue_held(
    services: Services,
    device_id: str,
    lifetime: timedelta,
    *,
    caller: Caller = SYSTEM_CALLER,
) -> tuple[Credential, IssuedCertificate]:
    """A device certificate whose key fleetgate generates and keeps (so it renews it)."""
    await services.issuing.issue_for_device(
        caller, device_id, csr=None, generate=KeyAlgorithm.EC_P256, lifetime=lifetime
    )
    credential = await services.credentials.get(SYSTEM_CALLER, held_credential_id(device_id))
    assert credential.certificate_serial is not None
    certificate = await services.revocation.certificate(
        SYSTEM_CALLER, credential.certificate_serial
    )
    return credential, certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(common_name: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    signer = key or new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(signer, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


async def certificates_of(db: Database, device_id: str) -> list[IssuedCertificate]:
    async with db.snapshot() as tx:
        return await CertificateRepo(tx).list(CertificateQuery(device_id=device_id), limit=10_000)


async def issue_csr(
    services: Services,
    device_id: str,
    lifetime: timedelta,
    *,
    csr: bytes | None = None,
) -> IssuedCertificate:
    """A device certificate from the device's own CSR: fleetgate never sees the key."""
    before = {c.serial for c in await certificates_of(services.db, device_id)}
    await services.issuing.issue_for_device(
        SYSTEM_CALLER,
        device_id,
        csr=csr or make_csr(device_id),
        generate=None,
        lifetime=lifetime,
    )
    fresh = [c for c in await certificates_of(services.db, device_id) if c.serial not in before]
    assert len(fresh) == 1, fresh
    return fresh[0]


def x509_of(record: IssuedCertificate | bytes) -> x509.Certificate:
    der = record if isinstance(record, bytes) else record.der
    return x509.load_der_x509_certificate(der)


def public_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_public_der(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed_pem(
    common_name: str, not_before: datetime, not_after: datetime, *, ca: bool = False
) -> tuple[str, bytes, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """(certificate PEM, PKCS#8 key PEM, certificate, key), made outside fleetgate."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem, certificate, key


async def import_x509(
    services: Services,
    clock: FakeClock,
    credential_id: str,
    valid_for: timedelta,
    *,
    device_id: str | None = None,
) -> Credential:
    """An x509 credential brought in from elsewhere, ending ``valid_for`` from now."""
    now = clock.now()
    certificate_pem, key_pem, _, _ = self_signed_pem(
        f"imported {credential_id}", now - timedelta(minutes=1), now + valid_for
    )
    return await services.credentials.create(
        SYSTEM_CALLER,
        CredentialInput(
            id=credential_id,
            kind=CredentialKind.X509,
            device_id=device_id,
            certificate_pem=certificate_pem,
            secret=Secret(key_pem),
        ),
    )


def advance_to(clock: FakeClock, moment: datetime) -> None:
    """Move the fake clock forward to ``moment`` (whole seconds, as certificates keep time)."""
    delta = (moment - clock.now()).total_seconds()
    assert delta >= 0, f"{moment} is in the past ({clock.now()})"
    clock.advance(delta)


# -- OCSP ---------------------------------------------------------------------------------------


def ocsp_request(
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        certificate, issuer, algorithm or hashes.SHA1()
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def ocsp_request_by_hash(issuer: x509.Certificate, serial: int) -> bytes:
    """A request about ``serial`` under ``issuer``, for a certificate we do not have."""
    name_hash, key_hash = issuer_hashes(issuer, hashes.SHA1())
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash, key_hash, serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


async def answer(services: Services, request: bytes) -> tuple[ocsp.OCSPResponse, datetime]:
    """Ask the service as a relying party would: a DER request through the public parser."""
    body, fresh_until = await services.revocation.ocsp(parse_request(request))
    return ocsp.load_der_ocsp_response(body), fresh_until


async def ask_ocsp(
    services: Services,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> tuple[ocsp.OCSPResponse, datetime]:
    """Ask about ``certificate`` (issued by ``issuer``)."""
    return await answer(
        services, ocsp_request(certificate, issuer, nonce=nonce, algorithm=algorithm)
    )


def verify_ocsp_signature(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    """Raise unless ``signer``'s key signed ``response``."""
    public_key = signer.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    algorithm = response.signature_hash_algorithm
    assert algorithm is not None
    public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))


def random_nonce() -> bytes:
    return os.urandom(16)


# -- a webhook receiver -------------------------------------------------------------------------


@dataclass
class Webhook:
    """A real HTTP endpoint on 127.0.0.1 that records JSON bodies.

    ``statuses`` are the answers to give, in order; once used up, ``status``. ``on_request``,
    when set, runs once (then clears) while the first request waits for its answer.
    """

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    status: int = 200
    on_request: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    def subjects(self) -> list[tuple[str, float]]:
        return [(str(b["subject"]), float(b["threshold_days"])) for b in self.bodies]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            payload = json.loads(await reader.readexactly(length))
            assert isinstance(payload, dict)
            self.bodies.append(payload)
            hook, self.on_request = self.on_request, None
            if hook is not None:
                await hook(payload)
            status = self.statuses.pop(0) if self.statuses else self.status
            writer.write(
                f"HTTP/1.1 {status} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def running_webhook() -> AsyncIterator[Webhook]:
    webhook = Webhook()
    server = await asyncio.start_server(webhook.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    webhook.url = f"http://127.0.0.1:{port}/alerts"
    try:
        yield webhook
    finally:
        server.close()
        await server.wait_closed()
