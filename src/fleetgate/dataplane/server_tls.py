"""Device-facing TLS: a ``tls``/``mtls`` listener's server context, what it is built from, and
rebuilding it when that changes.

The context is hardened the same way for every listener: TLS 1.2 at least (1.3 preferred by
OpenSSL), Mozilla's "intermediate" TLS 1.2 suites, no compression, no renegotiation, the
server's whole chain sent. For ``mtls`` the trust is every CA in the store (fleetgate's roots
and issuing CAs, and the outside CAs trusted for devices) with fleetgate's CRLs, so a revoked
device gets a ``certificate_revoked`` alert at the handshake. When an outside CA is trusted the
CRL check is left to the store (OpenSSL would refuse every certificate of a CA without a
CRL): such a device is refused just after its handshake, and the log says why.

A rebuild keeps the running context when the new material is unusable, and says why: live
connections are never touched by it, new handshakes use the newest good context.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import ssl
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from fleetgate.clock import Clock
from fleetgate.config.schema import ListenerTlsConfig
from fleetgate.dataplane import native
from fleetgate.dataplane.psk import PskTable
from fleetgate.dataplane.tls_endpoint import stepping
from fleetgate.logs import get_logger
from fleetgate.pki.keys import KeyAlgorithm
from fleetgate.pki.ocsp import OcspQuery, issuer_hashes
from fleetgate.pki.profiles import Profile
from fleetgate.pki.records import CaRole
from fleetgate.sealing import Secret
from fleetgate.services.bundle import Services
from fleetgate.services.context import SYSTEM_CALLER
from fleetgate.store.credentials import CredentialRepo, secret_name

log = get_logger("fleetgate.dataplane")

# Mozilla's "intermediate" configuration (version 5.7): the TLS 1.2 suites, in its order. TLS 1.3
# suites are OpenSSL's defaults, which are the same three.
INTERMEDIATE_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


# Mozilla "intermediate" key exchange groups (OpenSSL also offers X448 and P-521 by default).
INTERMEDIATE_GROUPS = "X25519:P-256:P-384"

# TLS 1.2 PSK suites with forward secrecy first, AEAD only.
PSK_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-PSK-CHACHA20-POLY1305",
        "DHE-PSK-AES128-GCM-SHA256",
        "DHE-PSK-AES256-GCM-SHA384",
        "DHE-PSK-CHACHA20-POLY1305",
        "PSK-AES128-GCM-SHA256",
        "PSK-AES256-GCM-SHA384",
        "PSK-CHACHA20-POLY1305",
    )
)


class TlsSetupError(Exception):
    """The listener's TLS material cannot be used; ``str()`` says which and why."""


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _memfd(name: str, data: bytes) -> tuple[int, str]:
    """Key material for OpenSSL, which reads files, without touching the disk."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def _hardened(config: ListenerTlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.min_tls == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if native.AVAILABLE:
        native.set_groups(context, INTERMEDIATE_GROUPS)
    else:  # the ssl module sets one curve only: the one every client has
        context.set_ecdh_curve("prime256v1")
    return context


def build_psk_context(config: ListenerTlsConfig, keys: PskTable) -> ssl.SSLContext:
    """A certificate-less server context: each device proves itself with its own PSK."""
    context = _hardened(config)
    context.set_ciphers(PSK_TLS12_CIPHERS)

    def key(identity: str | None) -> bytes:
        found = keys.key(identity)
        endpoint = stepping()
        if endpoint is not None and found:
            endpoint.psk_identity = identity  # OpenSSL does not keep it for TLS 1.3
        return found

    context.set_psk_server_callback(key, config.psk_identity_hint)
    return context


def build_server_context(
    config: ListenerTlsConfig,
    chain_pem: bytes,
    key_pem: Secret,
    trust_pem: bytes = b"",
    *,
    check_crl: bool = False,
) -> ssl.SSLContext:
    """The hardened server context; ``trust_pem`` (CA certificates and CRLs) for mtls."""
    context = _hardened(config)
    context.set_ciphers(INTERMEDIATE_TLS12_CIPHERS)
    opened = [_memfd("fleetgate-chain", chain_pem), _memfd("fleetgate-key", key_pem.reveal())]
    try:
        context.load_cert_chain(opened[0][1], opened[1][1])
        if config.mode == "mtls":
            opened.append(_memfd("fleetgate-trust", trust_pem))
            context.load_verify_locations(cafile=opened[2][1])  # certificates and CRLs
            context.verify_mode = ssl.CERT_REQUIRED
            if check_crl:
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    finally:
        for fd, _ in opened:
            os.close(fd)
    return context


def _ocsp_query(chain: bytes) -> OcspQuery | None:
    """The OCSP question about the chain's first certificate, asked of its issuer (the
    second): None when the chain has no issuer in it."""
    certificates = x509.load_pem_x509_certificates(chain)
    if len(certificates) < 2:
        return None
    leaf, issuer = certificates[0], certificates[1]
    # SHA-1 in the CertID, as RFC 5019 clients (OpenSSL among them) build theirs: an
    # identifier, not a signature.
    algorithm = hashes.SHA1()  # noqa: S303
    name_hash, key_hash = issuer_hashes(issuer, algorithm)
    return OcspQuery(leaf.serial_number, name_hash, key_hash, algorithm, None)


def _check_files(cert_file: str, chain: bytes, key_file: str, key: bytes) -> None:
    """Say which file is wrong, and how, before OpenSSL says only "PEM lib"."""
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise ValueError(f"cert_file {cert_file} holds no PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"key_file {key_file} holds no unencrypted PEM private key") from None
    if certificates[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError(
            f"key_file {key_file} is not the key of the first certificate in {cert_file} "
            "(replace both; the next check reads them again)"
        )


def _digest(*parts: bytes) -> bytes:
    """One digest of several byte strings, each length-prefixed (no two lists share one)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


class ServerTls:
    """One listener's server side: its material, and the context new handshakes use."""

    def __init__(
        self,
        listener: str,
        config: ListenerTlsConfig,
        services: Services,
        keys: PskTable,
        clock: Clock,
    ) -> None:
        self.listener = listener
        self.config = config
        self._keys = keys
        self._clock = clock
        self._chain = b""  # the served chain (PEM), for the OCSP staple
        self.staple_refresh_at: datetime | None = None  # when the staple wants renewing
        self.credential_id = config.certificate or f"listener-{listener}"
        self._services = services
        self._context: ssl.SSLContext | None = None
        self._lock = asyncio.Lock()
        self._files_seen: tuple[tuple[int, int], ...] = ()  # (mtime_ns, size) of cert and key
        self._material = b""  # digest of what the running context was built from

    @property
    def context(self) -> ssl.SSLContext:
        assert self._context is not None, "load() first"
        return self._context

    @property
    def uses_store(self) -> bool:
        return self.config.mode != "psk" and self.config.cert_file is None

    async def load(self) -> bool:
        """Build the context from the current material (issuing the server certificate on
        first use); keep the running one and raise :class:`TlsSetupError` if that fails.
        Whether a new context was built: not when nothing it is built from changed (every
        device credential's change asks, and each context stays alive as long as a connection
        accepted under it does: up to 2 MiB with a large CRL)."""
        async with self._lock:
            if self.config.mode == "psk":
                self._context = build_psk_context(self.config, self._keys)
                return True
            try:
                chain, key = await self._server_material()
                trust, check_crl = (
                    await self._trust() if self.config.mode == "mtls" else (b"", False)
                )
                material = _digest(
                    repr(self.config).encode(), chain, key.reveal(), trust, b"%d" % check_crl
                )
                if self._context is not None and material == self._material:
                    return False
                context = await asyncio.to_thread(
                    build_server_context, self.config, chain, key, trust, check_crl=check_crl
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TlsSetupError(f"listener {self.listener}: {exc}") from None
            self._chain = chain
            await self._staple(context)
            self._context = context
            self._material = material
            return True

    def staple_due(self, now: datetime) -> bool:
        return self.staple_refresh_at is not None and self.staple_refresh_at <= now

    async def refresh_staple(self) -> None:
        """A fresh OCSP answer for the served certificate (fleetgate's CA answers it)."""
        async with self._lock:
            if self._context is not None and self.config.mode != "psk":
                await self._staple(self._context)

    async def _staple(self, context: ssl.SSLContext) -> None:
        """Staple fleetgate's OCSP answer about the served certificate, for clients that ask
        (``status_request``). Only when fleetgate's CA issued it: another CA's certificate
        is sent without a staple. The answer is sent until its nextUpdate at most, and
        renewed at half its validity (``staple_refresh_at``) and after a revocation."""
        self.staple_refresh_at = None
        if not native.AVAILABLE:
            return
        query = _ocsp_query(self._chain)
        answer = None
        if query is not None:
            der, next_update = await self._services.revocation.ocsp(query)
            answer = ocsp.load_der_ocsp_response(der)
        if answer is None or answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            native.staple(context, None)
            return
        now = self._clock.now()
        native.staple(
            context,
            native.Staple(der, next_update.timestamp(), lambda: self._clock.now().timestamp()),
        )
        self.staple_refresh_at = now + (next_update - now) / 2
        log.info(
            "listener.ocsp_stapled",
            listener=self.listener,
            status=answer.certificate_status.name.lower(),
            next_update=next_update.isoformat(),
        )

    def files_changed(self) -> bool:
        """Whether cert_file or key_file changed since they were last read (good or bad)."""
        return self.config.cert_file is not None and self._file_signature() != self._files_seen

    def _file_signature(self) -> tuple[tuple[int, int], ...]:
        found = []
        for name in (self.config.cert_file, self.config.key_file):
            try:
                stat = os.stat(name) if name else None
            except OSError:
                stat = None
            found.append((stat.st_mtime_ns, stat.st_size) if stat else (0, -1))
        return tuple(found)

    async def reload(self, why: str) -> bool:
        """:meth:`load`, logged; False (old context kept) if the new material is unusable."""
        try:
            rebuilt = await self.load()
        except TlsSetupError as exc:
            log.error(
                "listener.tls_reload_failed", listener=self.listener, why=why, detail=str(exc)
            )
            return False
        log.info("listener.tls_reloaded", listener=self.listener, why=why, rebuilt=rebuilt)
        return True

    # -- material -------------------------------------------------------------------------------

    async def _server_material(self) -> tuple[bytes, Secret]:
        if self.config.cert_file is not None and self.config.key_file is not None:
            self._files_seen = self._file_signature()  # a bad file is reported once
            chain = await asyncio.to_thread(Path(self.config.cert_file).read_bytes)
            key = await asyncio.to_thread(Path(self.config.key_file).read_bytes)
            _check_files(self.config.cert_file, chain, self.config.key_file, key)
            return chain, Secret(key)
        found = await self._stored()
        if found is None:
            await self._issue()
            found = await self._stored()
        if found is None:
            raise ValueError(f"credential {self.credential_id} holds no certificate and key")
        return found

    async def _stored(self) -> tuple[bytes, Secret] | None:
        services = self._services
        async with services.db.snapshot() as tx:
            credential = await CredentialRepo(tx).get(self.credential_id)
            if credential is None:
                return None
            if credential.certificate is None or not credential.has_secret:
                raise ValueError(f"credential {self.credential_id} is not a certificate with a key")
            secret = await services.vault.get_in(tx, secret_name(credential.id))
        if secret is None:
            raise ValueError(f"credential {self.credential_id}: its key is missing")
        leaf = _pem(x509.load_der_x509_certificate(credential.certificate))
        return leaf + (credential.chain or "").encode(), secret

    async def _issue(self) -> None:
        """The listener's server certificate from fleetgate's CA; renewed by fleetgate."""
        names = self.config.server_names
        addresses = []
        dns = []
        for name in names:
            try:
                addresses.append(str(ipaddress.ip_address(name)))
            except ValueError:
                dns.append(name)
        await self._services.issuing.issue_for_gateway(
            SYSTEM_CALLER,
            self.credential_id,
            profile=Profile.GATEWAY_SERVER,
            common_name=names[0][:64],
            dns_names=tuple(dns),
            ip_addresses=tuple(addresses),
            algorithm=KeyAlgorithm.EC_P256,
            lifetime=None,
        )
        log.info(
            "listener.certificate_issued", listener=self.listener, credential=self.credential_id
        )

    async def _trust(self) -> tuple[bytes, bool]:
        """Every CA in the store and fleetgate's CRLs (PEM); whether CRLs cover every CA."""
        authorities = await self._services.authority.authorities()
        trusted = b"".join(_pem(ca.certificate) for ca in authorities)
        crls = await self._services.revocation.all_crls()
        revocations = b"".join(
            x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM) for crl in crls
        )
        covered = {crl.issuer_id for crl in crls}
        # OpenSSL wants the CRL of every leaf's issuer: device certificates come from issuing
        # CAs (fleetgate's, each with a CRL while it is valid) or from trusted outside CAs.
        complete = all(
            ca.id in covered for ca in authorities if ca.role is CaRole.ISSUING
        ) and not any(ca.role is CaRole.TRUSTED for ca in authorities)
        return trusted + revocations, complete
