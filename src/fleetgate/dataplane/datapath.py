"""What every protocol handler shares: who the device is, where its route goes, and a verified
connection there presenting the device's own credential.

Order of resolution for a route: the device's ``routes[listener]``, its group's
``settings.routes[listener]``, the listener's ``destination``, the listener's plain ``forward_to``.
"""

from __future__ import annotations

import hmac
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from fleetgate.clock import Clock
from fleetgate.config.schema import DestinationConfig, ListenerConfig
from fleetgate.dataplane.endpoint import Endpoint
from fleetgate.dataplane.policy import Refusal
from fleetgate.dataplane.psk import PskTable
from fleetgate.dataplane.registry import CredentialUnusable, Material, RegistryView
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from fleetgate.dataplane.upstream import ClientCertificate, Upstream, UpstreamError
from fleetgate.metrics import Metrics
from fleetgate.pki.records import CredentialKind
from fleetgate.records import Device, DeviceStatus
from fleetgate.store.changes import Change


class Refused(Exception):
    """A connection is refused before relaying; ``reason`` is the log and metric slug."""

    def __init__(self, reason: str, detail: str = "", *, upstream: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.upstream = upstream  # the destination failed (vs. the device being refused)


def refusal_after_handshake(endpoint: Endpoint) -> Refused | None:
    """The destination's refusal that came after the TLS handshake finished (a client
    certificate it does not accept, under TLS 1.3), if that is how ``endpoint`` ended."""
    if isinstance(endpoint, TlsEndpoint) and endpoint.failure is not None:
        return Refused(endpoint.failure.cause, endpoint.failure.detail, upstream=True)
    return None


def certificate_name(certificate: x509.Certificate, name_from: str) -> str | None:
    """The device name a client certificate carries: its CN, its first DNS name, the last
    segment of its first URI (``urn:fleet:device:meter-1`` and ``spiffe://fleet/meter-1`` name
    ``meter-1``), or the local part of its first e-mail address."""
    if name_from == "cn":
        found = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(found[0].value) if found else None
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    if name_from == "san_dns":
        names = sans.get_values_for_type(x509.DNSName)
        return names[0] if names else None
    if name_from == "san_uri":
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        return re.split(r"[/:]", uris[0].rstrip("/"))[-1] if uris else None
    emails = sans.get_values_for_type(x509.RFC822Name)
    return emails[0].partition("@")[0] if emails else None


@dataclass(frozen=True)
class Route:
    name: str  # the destination's name, or "forward_to"
    destination: DestinationConfig


@dataclass(frozen=True)
class Login:
    username: str
    password: bytes


class DataPath:
    def __init__(
        self,
        registry: RegistryView,
        upstream: Upstream,
        destinations: Mapping[str, DestinationConfig],
        clock: Clock,
        metrics: Metrics,
        keys: PskTable,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.destinations = dict(destinations)
        self.clock = clock
        self.metrics = metrics
        self.keys = keys  # device PSKs by identity (psk listeners)

    def reconfigure(self, destinations: Mapping[str, DestinationConfig]) -> None:
        self.destinations = dict(destinations)
        self.upstream.keep_only(self.destinations)

    def on_change(self, change: Change) -> None:
        self.registry.on_change(change)

    # -- identity -------------------------------------------------------------------------------

    @staticmethod
    def admit(device: Device | None) -> Device:
        if device is None:
            raise Refused(Refusal.UNKNOWN_DEVICE.value)
        if device.status is not DeviceStatus.ENABLED:
            raise Refused(Refusal.DEVICE_DISABLED.value, device.id)
        return device

    async def by_source(self, source: str) -> Device:
        return self.admit(await self.registry.device_by_address(source))

    async def admit_certificate(self, der: bytes) -> str:
        """A verified client certificate's serial; refused if fleetgate issued it and has
        revoked it (the handshake's CRL check is off when an outside CA is trusted)."""
        serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
        issued = await self.registry.certificate(serial)
        if issued is not None and issued.der == der and issued.revoked:
            raise Refused("certificate_revoked", f"serial {serial}")
        return serial

    async def by_certificate(self, der: bytes, name_from: str) -> tuple[Device, str]:
        """The device a verified client certificate names, and the certificate's serial.

        A certificate fleetgate issued must be the named device's (its revocation was checked
        by :meth:`admit_certificate`); one from a trusted outside CA is taken at its name (its
        CA vouches for it).
        """
        certificate = x509.load_der_x509_certificate(der)
        name = certificate_name(certificate, name_from)
        if not name:
            raise Refused("certificate_unnamed", f"the client certificate has no {name_from}")
        serial = format(certificate.serial_number, "x")
        issued = await self.registry.certificate(serial)
        issued_to = issued.device_id if issued is not None and issued.der == der else None
        if issued_to is not None and issued_to != name:
            raise Refused(
                "certificate_not_for_device",
                f"serial {serial} was issued to {issued_to}, names {name}",
            )
        device = await self.registry.device_by_field("device_id", name)
        return self.admit(device), serial

    async def by_psk(self, identity: str | None) -> tuple[Device, str]:
        """The device whose PSK the handshake used, and that credential's id."""
        entry = self.keys.get(identity)
        if entry is None:  # removed between the handshake and now
            raise Refused("unknown_psk_identity", f"identity {identity!r}")
        device = await self.registry.device_by_field("device_id", entry.device_id)
        return self.admit(device), entry.credential_id

    async def by_login(
        self, listener: ListenerConfig, username: str | None, password: bytes | None
    ) -> Device:
        """A device logging in with the password credential ``listener.password_credential``
        names for it; a wrong password and an unknown name are refused alike."""
        if not username or password is None:
            raise Refused("bad_credentials", "no username or password")
        device = await self.registry.device_by_field(listener.username_field, username)
        if device is None:
            raise Refused(Refusal.UNKNOWN_DEVICE.value, f"no device with {listener.username_field}")
        assert listener.password_credential is not None
        try:
            material = await self.registry.credential(device, listener.password_credential, None)
        except CredentialUnusable as exc:
            raise Refused("bad_credentials", str(exc)) from None
        if material is None or material.credential.kind is not CredentialKind.PASSWORD:
            raise Refused("bad_credentials", f"device {device.id} has no login credential")
        expected = material.secret.reveal() if material.secret is not None else b""
        if not expected or not hmac.compare_digest(expected, password):
            raise Refused("bad_credentials", f"wrong password for device {device.id}")
        return self.admit(device)

    # -- routing --------------------------------------------------------------------------------

    async def route(self, listener_name: str, listener: ListenerConfig, device: Device) -> Route:
        wanted = device.routes.get(listener_name) if device.routes else None
        if wanted is None:
            group = await self.registry.group(device.group)
            routes = group.settings.get("routes") if group is not None else None
            if isinstance(routes, Mapping):
                value = routes.get(listener_name)
                wanted = value if isinstance(value, str) else None
        wanted = wanted or listener.destination
        if wanted is not None:
            destination = self.destinations.get(wanted)
            if destination is None:
                raise Refused("no_route", f"destination {wanted!r} is not configured")
            return Route(wanted, destination)
        if listener.forward_to is not None:
            return Route(
                "forward_to",
                DestinationConfig(
                    address=listener.forward_to,
                    unsafe_plaintext=True,
                    connect_timeout_s=listener.connect_timeout_s,
                ),
            )
        raise Refused("no_route", f"no destination for listener {listener_name}")

    # -- credentials ------------------------------------------------------------------------------

    async def material(
        self, device: Device, template: str | None, default: str | None, kind: CredentialKind
    ) -> Material | None:
        if template is None and default is None:
            return None
        try:
            material = await self.registry.credential(device, template, default)
            if material is None:
                raise Refused(
                    "credential_missing",
                    f"no {kind.value} credential {template or default!r} for device {device.id}",
                )
            material.check_usable(self.clock, kind)
        except CredentialUnusable as exc:
            raise Refused(exc.cause, str(exc)) from None
        return material

    async def client_certificate(
        self, device: Device, destination: DestinationConfig
    ) -> ClientCertificate | None:
        material = await self.material(
            device, destination.credential, destination.default_credential, CredentialKind.X509
        )
        if material is None:
            return None
        cred = material.credential
        assert cred.certificate is not None
        assert material.secret is not None
        leaf = ssl.DER_cert_to_PEM_cert(cred.certificate).encode()  # checked when stored
        chain = (cred.chain or "").encode()
        return ClientCertificate(f"{cred.id}@{cred.revision}", leaf + chain, material.secret)

    async def login(self, device: Device, destination: DestinationConfig) -> Login | None:
        material = await self.material(
            device, destination.login_credential, None, CredentialKind.PASSWORD
        )
        if material is None:
            return None
        assert material.secret is not None
        return Login(str(material.credential.public.get("username", "")), material.secret.reveal())

    async def dial(self, device: Device, route: Route, *, preamble: bytes = b"") -> Endpoint:
        client = await self.client_certificate(device, route.destination)
        try:
            return await self.upstream.connect(
                route.name, route.destination, client, preamble=preamble
            )
        except UpstreamError as exc:
            raise Refused(exc.cause, exc.detail, upstream=True) from None
