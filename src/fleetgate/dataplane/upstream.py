"""Dialling a destination: TCP, then TLS verified the destination's way, presenting the device's
own client certificate.

One ``SSLContext`` per destination, shared by every device: each connection presents its
device's certificate itself (:class:`~fleetgate.dataplane.native.ClientIdentity`, parsed once
per credential revision), so ten thousand devices cost ten thousand parsed certificates and
keys (a few KiB each) instead of ten thousand contexts (25 KiB and 2 ms to build each). Where
:mod:`~fleetgate.dataplane.native` is not available, the standard library's only way is used:
a context per (destination, credential). A private CA bundle is a few KiB per context, and the
system roots are read through the hashed directory (looked up on demand) instead of the 800 KiB
bundle each context would otherwise parse.

Entries are cached by the credential's id and revision, so a renewal or a new key makes the next
connection use fresh material; a revoked credential never reaches here (the registry view
refuses it). Each entry keeps the last healthy session *of that credential* for resumption
(a session resumed by another device would present the first device's identity), refreshed at
most once a second; sessions are taken and offered through OpenSSL directly where ``native``
can, since the ``ssl`` module's way costs a copy and, on the CPython builds here, leaks a few KiB
each time. A server chain verified for a destination is remembered for a minute
(:mod:`~fleetgate.dataplane.chain_cache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetgate.clock import Clock
from fleetgate.config.schema import DestinationConfig, split_host_port
from fleetgate.dataplane import native
from fleetgate.dataplane.chain_cache import VerifiedChains
from fleetgate.dataplane.endpoint import Endpoint, PlainEndpoint
from fleetgate.dataplane.tls_endpoint import Resumable, TlsEndpoint, TlsFailure, classify
from fleetgate.sealing import Secret

MAX_ENTRIES = 50_000  # credentials (per destination) whose material and session are kept
# An entry not used for a connection this long goes: by then a TLS 1.3 ticket has usually
# expired (OpenSSL's default lifetime), and what is left to save is one parse of the identity.
ENTRY_IDLE_S = 7200.0
SESSION_REFRESH_S = 1.0


class UpstreamError(ConnectionError):
    """The destination could not be reached or authenticated; ``cause`` names why."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class ClientCertificate:
    """What the gateway presents for a device: leaf + chain (PEM) and the private key."""

    key_id: str  # cache identity: credential id and revision
    chain_pem: bytes
    key: Secret


@dataclass
class _Entry:
    """One credential at one destination: the context to use, the identity to present on it
    (None: the context presents it, or none is presented), and its session to resume."""

    context: ssl.SSLContext
    identity: native.ClientIdentity | None = None
    session: Resumable | None = None
    session_at: float = field(default=-1e18)
    used_at: float = 0.0


def _memfd_path(name: str, data: bytes) -> tuple[int, str]:
    """An anonymous in-memory file: key material is handed to OpenSSL without touching disk."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def build_context(
    destination: DestinationConfig, client: ClientCertificate | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if destination.min_tls == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if destination.ca_file is not None:
        context.load_verify_locations(cafile=destination.ca_file)
    else:
        paths = ssl.get_default_verify_paths()
        if paths.capath and os.path.isdir(paths.capath):
            context.load_verify_locations(capath=paths.capath)
        else:
            context.load_default_certs()
    if destination.alpn:
        context.set_alpn_protocols(list(destination.alpn))
    if client is not None:
        cert_fd, cert_path = _memfd_path("fleetgate-cert", client.chain_pem)
        key_fd, key_path = _memfd_path("fleetgate-key", client.key.reveal())
        try:
            context.load_cert_chain(cert_path, key_path)
        finally:
            os.close(cert_fd)
            os.close(key_fd)
    return context


type _Key = tuple[str, DestinationConfig, str]  # destination name, its config, key_id


def _credential(key: _Key) -> _Key:
    """The same credential at the same destination, whatever its revision (``id@revision``)."""
    name, destination, key_id = key
    return name, destination, key_id.rpartition("@")[0] or key_id


class Upstream:
    """Opens verified connections to destinations; owns the context and session caches.

    The cache keeps, per credential revision and destination, the parsed identity and the
    last session: least recently used first, so what a gone or renewed device left goes
    first. An entry goes when its credential has a newer revision in use, when it was not used
    for :data:`ENTRY_IDLE_S`, or past :data:`MAX_ENTRIES`."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        # Per credential (its key_id less the revision) and destination: the entry in use.
        self._revisions: dict[_Key, _Key] = {}
        # Per destination: the context every device shares (native), and the server chains
        # verified lately (the server's chain does not depend on who the device is).
        self._shared: dict[tuple[str, DestinationConfig], ssl.SSLContext] = {}
        self._chains: dict[tuple[str, DestinationConfig], VerifiedChains] = {}

    def _entry(
        self, name: str, destination: DestinationConfig, client: ClientCertificate | None
    ) -> _Entry:
        key = (name, destination, client.key_id if client else "")
        now = self._clock.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            entry.used_at = now
            self._entries.move_to_end(key)
            self._let_go_idle(now)
            return entry
        try:
            if native.AVAILABLE:
                identity = (
                    native.ClientIdentity(client.chain_pem, client.key.reveal())
                    if client is not None
                    else None
                )
                entry = _Entry(self._shared_context(name, destination), identity)
            else:
                entry = _Entry(build_context(destination, client))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise UpstreamError("tls_setup", f"destination {name}: {exc}") from None
        entry.used_at = now
        credential = _credential(key)
        replaced = self._revisions.get(credential)
        if replaced is not None and replaced != key:
            self._entries.pop(replaced, None)  # an older revision: never presented again
        self._revisions[credential] = key
        self._entries[key] = entry
        if len(self._entries) > MAX_ENTRIES:
            self._drop(next(iter(self._entries)))
        self._let_go_idle(now)
        return entry

    def _let_go_idle(self, now: float) -> None:
        """Drop the entries not used for ENTRY_IDLE_S (the oldest are first)."""
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now - oldest.used_at < ENTRY_IDLE_S:
                return
            self._drop(key)

    def _drop(self, key: _Key) -> None:
        del self._entries[key]
        credential = _credential(key)
        if self._revisions.get(credential) == key:
            del self._revisions[credential]

    def _shared_context(self, name: str, destination: DestinationConfig) -> ssl.SSLContext:
        context = self._shared.get((name, destination))
        if context is None:
            context = build_context(destination, None)
            native.hook_verification(context, self.verified_chains(name, destination))
            self._shared[(name, destination)] = context
        return context

    def verified_chains(self, name: str, destination: DestinationConfig) -> VerifiedChains:
        chains = self._chains.get((name, destination))
        if chains is None:
            chains = VerifiedChains(self._clock, frozenset(destination.pin_sha256))
            self._chains[(name, destination)] = chains
        return chains

    def keep_only(self, destinations: Mapping[str, DestinationConfig]) -> None:
        """Forget what was kept for destinations no longer configured as they were (a reload
        removed or changed them): their contexts, verified chains, identities and sessions.
        Connections open on them carry on (each holds what it uses)."""
        current = set(destinations.items())
        for key in [key for key in self._entries if (key[0], key[1]) not in current]:
            self._drop(key)
        for kept in (self._shared, self._chains):
            for gone in [pair for pair in kept if pair not in current]:
                del kept[gone]

    async def connect(
        self,
        name: str,
        destination: DestinationConfig,
        client: ClientCertificate | None,
        *,
        preamble: bytes = b"",
    ) -> Endpoint:
        """A ready endpoint: connected, handshake done, chain verified and pinned.
        ``preamble`` goes on the wire first, in clear (a PROXY protocol header)."""
        host, port = split_host_port(destination.address)
        loop = asyncio.get_running_loop()
        if destination.unsafe_plaintext:
            try:
                async with asyncio.timeout(destination.connect_timeout_s):
                    _, plain = await loop.create_connection(PlainEndpoint, host, port)
            except TimeoutError:
                raise UpstreamError("connect_timeout", f"{destination.address}") from None
            except OSError as exc:
                raise UpstreamError("connect_failed", f"{destination.address}: {exc}") from None
            if preamble:
                plain.write(preamble)
            return plain
        entry = self._entry(name, destination, client)
        pins = frozenset(destination.pin_sha256)
        server_name = destination.server_name or host
        endpoint: TlsEndpoint | None = None

        def factory() -> TlsEndpoint:
            nonlocal endpoint
            endpoint = TlsEndpoint(
                entry.context,
                server_hostname=server_name,
                session=entry.session if destination.session_resumption else None,
                pins=pins,
                preamble=preamble,
            )
            if entry.identity is not None:
                entry.identity.present(endpoint.ssl_object)
            return endpoint

        try:
            async with asyncio.timeout(destination.connect_timeout_s):
                await loop.create_connection(factory, host, port)
                assert endpoint is not None
                await endpoint.handshake
        except TimeoutError:
            if endpoint is not None:
                endpoint.abort()
            raise UpstreamError("connect_timeout", f"{destination.address}") from None
        except TlsFailure as exc:
            raise UpstreamError(exc.cause, exc.detail) from None
        except ssl.SSLError as exc:
            failure = classify(exc)
            raise UpstreamError(failure.cause, failure.detail) from None
        except OSError as exc:
            raise UpstreamError("connect_failed", f"{destination.address}: {exc}") from None
        except ValueError as exc:  # the identity could not be put on the connection
            raise UpstreamError("tls_setup", f"destination {name}: {exc}") from None
        if destination.session_resumption:
            self._keep_session(entry, endpoint)
        return endpoint

    def _keep_session(self, entry: _Entry, endpoint: TlsEndpoint) -> None:
        """Remember a session for the next connection, once it carries its ticket (TLS 1.3
        tickets arrive after the handshake, with the first data)."""
        now = self._clock.monotonic()
        if now - entry.session_at < SESSION_REFRESH_S:
            return

        def refresh() -> bool:
            with contextlib.suppress(ValueError, AttributeError):
                session = endpoint.resumable_session()
                if session is not None:
                    entry.session = session
                    entry.session_at = self._clock.monotonic()
                    return True
            return endpoint.received > 0  # data flowed and still no ticket: none is coming

        if endpoint.ssl_object.version() == "TLSv1.2":
            refresh()
        else:
            endpoint.after_first_read(refresh)
