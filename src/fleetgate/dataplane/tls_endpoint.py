"""TLS over a TCP socket through memory BIOs, with the same interface as a plain endpoint.

Driving OpenSSL ourselves (``SSLContext.wrap_bio``) instead of asyncio's TLS transport gives
what the gateway needs and asyncio does not offer: a saved session handed to a new connection
(resumption), the verified chain checked against SPKI pins before a single application byte is
sent, the precise reason a handshake failed, and the alert OpenSSL produced for the peer
written out before the socket closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ssl
from collections.abc import Callable, Iterable
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetgate.dataplane import native
from fleetgate.dataplane.endpoint import Endpoint

# Plaintext is read record by record (at most 16 KiB each) into one scratch buffer shared by
# every connection of the loop, then copied out once per batch: no 256 KiB allocation per read
# and no join of many small chunks.
RECORD_MAX = 16 * 1024
_SCRATCH = memoryview(bytearray(256 * 1024))
# What the socket gives is received straight into this buffer (shared too: it is handed on to
# OpenSSL's memory BIO before anything else can read), not into a new bytes object per read.
_RECEIVE = memoryview(bytearray(256 * 1024))

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) to the causes the gateway logs and counts.
_VERIFY_CAUSES = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    18: "unknown_ca",  # depth zero self-signed
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    23: "certificate_revoked",
    62: "hostname_mismatch",
    64: "hostname_mismatch",  # IP address mismatch
}
# OpenSSL reason strings (ssl.SSLError.reason) to causes.
_REASON_CAUSES = {
    "WRONG_VERSION_NUMBER": "not_tls",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake_failure",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client_certificate_refused",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_certificate_refused",
    "TLSV1_ALERT_UNKNOWN_CA": "client_certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "client_certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client_certificate_refused",
    "TLSV1_ALERT_ACCESS_DENIED": "client_certificate_refused",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "alpn_mismatch",
    # What a device-facing listener sees.
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
    "PSK_IDENTITY_NOT_FOUND": "unknown_psk_identity",
    "BINDER_DOES_NOT_VERIFY": "wrong_psk",  # TLS 1.3: a known identity, another key
    # TLS 1.2: the peer's Finished does not decrypt (with PSK: the keys differ).
    "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "bad_record_mac",
    # TLS 1.3 with no usable PSK falls back to certificates, which a psk listener has none of.
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_suitable_signature",
    "NO_SUITABLE_KEY_SHARE": "no_shared_group",
}


# A fatal unexpected_message alert (RFC 8446 section 6), as a TLS 1.2 plaintext record.
UNEXPECTED_MESSAGE_ALERT = b"\x15\x03\x03\x00\x02\x02\x0a"
# The endpoint whose handshake OpenSSL is stepping (one at a time: the loop is one thread), for
# callbacks that must know whose handshake they serve (the psk listener's key lookup).
_STEPPING: list[TlsEndpoint | None] = [None]


def stepping() -> TlsEndpoint | None:
    return _STEPPING[0]


# A session to resume: OpenSSL's own when it can be reached (see native), else the ssl module's.
type Resumable = ssl.SSLSession | native.Session
FREE_BUFFER_READS = 4
OPENING_BYTES = 64


def receive_buffer() -> memoryview:
    """The buffer reads are received into (for whoever stands in as the transport's protocol:
    see ``fastpath``)."""
    return _RECEIVE


def _ascii(server_hostname: str | None) -> str | None:
    """An ASCII name as bytes: the ssl module then skips its (slow) IDNA codec."""
    if server_hostname is None or not server_hostname.isascii():
        return server_hostname
    return cast(str, server_hostname.encode())


class TlsFailure(ConnectionError):
    """A handshake or pin check failed; ``cause`` is a short slug for logs and metrics."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


def reset_after_handshake() -> TlsFailure:
    """A destination reset the connection right after the handshake, before sending a byte:
    how a TLS 1.3 server refuses our client certificate (its alert, then a close with our first
    bytes unread), when a write meets the reset before the alert is read."""
    return TlsFailure(
        "reset_after_handshake",
        "reset before the peer sent anything (a refused client certificate, likely)",
    )


def cause_of_failure(verify_code: int, reason: str) -> str:
    """The cause of a failed TLS connection: from the chain's verify result when it failed
    there (an ``X509_V_ERR_*`` code), else from OpenSSL's reason (``WRONG_VERSION_NUMBER``)."""
    if verify_code:
        return _VERIFY_CAUSES.get(verify_code, "certificate_invalid")
    return _REASON_CAUSES.get(reason, "tls_error")


def classify(exc: BaseException) -> TlsFailure:
    if isinstance(exc, TlsFailure):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = (
            cause_of_failure(exc.verify_code or 0, "")
            if exc.verify_code
            else ("certificate_invalid")
        )
        return TlsFailure(cause, exc.verify_message or str(exc))
    if isinstance(exc, ssl.SSLError):
        return TlsFailure(cause_of_failure(0, exc.reason or ""), str(exc))
    return TlsFailure("connection_lost", str(exc) or type(exc).__name__)


def spki_sha256(der_certificate: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): the pin format of RFC 7469 and curl."""
    public = x509.load_der_x509_certificate(der_certificate).public_key()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def matches_pins(chain: Iterable[bytes], pins: frozenset[str]) -> bool:
    """Whether a certificate of ``chain`` (DER) has one of the SPKI ``pins``."""
    return any(spki_sha256(der) in pins for der in chain)


class TlsEndpoint(Endpoint, asyncio.BufferedProtocol):
    """A TLS connection (client or server side) with the plain endpoint's interface."""

    __slots__ = (
        "_after_read",
        "_free_reads",
        "_handshaken",
        "_incoming",
        "_outgoing",
        "_pins",
        "_preamble",
        "_raw",
        "_shutdown_sent",
        "_ssl",
        "chain_checked",
        "failure",
        "handshake",
        "opening",
        "psk_identity",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: Resumable | None = None,
        pins: frozenset[str] = frozenset(),
        preamble: bytes = b"",
    ) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=_ascii(server_hostname),
            session=session if isinstance(session, ssl.SSLSession) else None,
        )
        # The C object under ssl.SSLObject: its read and write without the wrapper's frame.
        self._raw = self._ssl._sslobj  # type: ignore[attr-defined]
        if isinstance(session, native.Session):
            native.offer_session(self._ssl, session)
        # OpenSSL 3 keeps its 16 KiB read buffer after reading post-handshake messages (session
        # tickets) even with SSL_MODE_RELEASE_BUFFERS: the first reads give it back.
        self._free_reads = FREE_BUFFER_READS if native.AVAILABLE else 0
        self._pins = pins
        self._preamble = preamble  # sent in clear before the handshake (PROXY protocol)
        self._handshaken = False
        self._shutdown_sent = False
        self._after_read: list[Callable[[], bool]] | None = None
        # Why the peer ended the connection after the handshake, when TLS said so: with TLS 1.3
        # a server refuses the client's certificate only after the client's handshake is done,
        # and the alert arrives with the first read.
        self.failure: TlsFailure | None = None
        # Set by a verification hook (chain_cache) that checked the pins itself, or knew the
        # chain had passed them moments ago.
        self.chain_checked = False
        self.psk_identity: str | None = None  # server side: whose key the handshake used
        self.opening = bytearray()  # the peer's first bytes, until the handshake is done
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    # -- transport callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._preamble and self.transport is not None:
            self.transport.write(self._preamble)
        if not self._ssl.server_side:
            self._step_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _RECEIVE

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_RECEIVE[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self._incoming.write(data)
        if not self._handshaken:
            if len(self.opening) < OPENING_BYTES:  # kept to say what a failed peer spoke
                self.opening += data[: OPENING_BYTES - len(self.opening)]
            self._step_handshake()
            if not self._handshaken:
                return
        self._read_plaintext()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if not self._handshaken:
            self._fail(TlsFailure("connection_lost", "the peer closed during the handshake"))
            return False
        self._read_plaintext()
        self._deliver_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if (
            self._handshaken
            and self.failure is None
            and self.received == 0
            and isinstance(exc, ConnectionResetError)
        ):
            self.failure = reset_after_handshake()
        if not self.handshake.done():
            self.handshake.set_exception(
                classify(exc) if exc else TlsFailure("connection_lost", "closed in handshake")
            )
            self.handshake.exception()  # retrieved: a caller that timed out does not leak it
        self._after_read = None  # hooks refer back to this endpoint: no cycle outlives it
        if self._handshaken and native.AVAILABLE and not self._ssl.server_side:
            native.keep_session_resumable(self._ssl)  # however it ended: see there
        super().connection_lost(exc)

    # -- handshake ----------------------------------------------------------------------------

    def _step_handshake(self) -> None:
        _STEPPING[0] = self  # for callbacks OpenSSL makes from inside do_handshake()
        try:
            self._handshake_step()
        finally:
            _STEPPING[0] = None

    def _handshake_step(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            failure = classify(exc)
            if failure.cause == "client_certificate_refused" and self._ssl.server_side:
                # The alert came from the device, about the gateway's own certificate.
                failure = TlsFailure(
                    "server_certificate_refused",
                    f"the device refused the gateway's certificate ({failure.detail}): "
                    "it needs fleetgate's CA (/pki/ca.pem) and the name it connects to",
                )
            if failure.cause == "not_tls" and self._ssl.server_side and not self._outgoing.pending:
                # OpenSSL answers a peer that does not speak TLS with silence; a device that
                # forgot TLS gets an alert all the same (in clear: no keys exist yet).
                self._outgoing.write(UNEXPECTED_MESSAGE_ALERT)
            self._flush()  # the alert for the peer goes out before we close
            self._fail(failure)
            return
        if self._pins and not self._pinned():
            self._flush()
            self._fail(TlsFailure("pin_mismatch", "no certificate in the chain matches a pin"))
            return
        self._handshaken = True
        self.opening.clear()  # only a failed handshake is explained with it
        if not self.handshake.done():
            self.handshake.set_result(None)
        # The last handshake flight goes out with the first application bytes when whoever
        # awaits the handshake writes at once (one segment, one wake-up of the peer fewer);
        # else on its own, one loop iteration later.
        asyncio.get_running_loop().call_soon(self._flush)
        if self._incoming.pending:
            self._read_plaintext()

    def _pinned(self) -> bool:
        if self.chain_checked:
            return True
        if self._ssl.session_reused:
            # No chain is sent on resumption; the session came from a handshake with this
            # context, whose pins it passed (sessions are never shared across destinations).
            return True
        chain = self._ssl.get_verified_chain() or []
        return matches_pins(chain, self._pins)

    def _fail(self, failure: TlsFailure) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(failure)
            self.handshake.exception()
        if self.transport is not None:
            self.transport.close()  # close() (not abort) lets the alert already written go out

    # -- data -----------------------------------------------------------------------------------

    def _read_plaintext(self) -> None:
        scratch, filled, eof = _SCRATCH, 0, False
        limit = len(scratch) - RECORD_MAX
        raw, incoming = self._raw, self._incoming
        while True:
            try:
                # With a buffer, read() fills it and returns a count.
                got = cast(int, raw.read(RECORD_MAX, scratch[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                self._flush()
                self.failure = classify(exc)
                if filled:  # what authenticated before the bad record is the peer's data
                    self._deliver(bytes(scratch[:filled]))
                if self.transport is not None:
                    self.transport.close()
                return
            if not got:
                eof = True
                break
            filled += got
            if filled > limit:
                self._deliver(bytes(scratch[:filled]))  # the receiver may re-enter: copy first
                filled = 0
            if not incoming.pending and not raw.pending():
                break  # all read: no SSLWantReadError raised and caught to find that out
        self._after_batch()
        if filled:
            self._deliver(bytes(scratch[:filled]))
        if eof:
            self._deliver_eof()

    def _after_batch(self) -> None:
        if self._outgoing.pending:
            self._flush()  # key updates and the like
        if self._after_read:
            self._after_read = [hook for hook in self._after_read if not hook()] or None
        if self._free_reads and not self._incoming.pending:
            self._free_reads -= 1
            native.free_buffers(self._ssl)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self._shutdown_sent:
            return
        view = memoryview(data)
        write = self._raw.write
        while view:
            written: int = write(view)
            view = view[written:]
        self.sent += len(data)
        self._flush()

    def write_eof(self) -> None:
        """Send close_notify (TLS half-close) and shut the socket's sending side."""
        if self.transport is None or self.transport.is_closing() or self._shutdown_sent:
            return
        self._shutdown_sent = True
        # The peer's close_notify is not waited for: reading goes on until it comes.
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
            self._ssl.unwrap()
        self._flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    @property
    def handshaken(self) -> bool:
        return self._handshaken

    def flush(self) -> None:
        """Write out the records OpenSSL has made (the handshake's last flight goes out with
        the first application bytes otherwise)."""
        self._flush()

    def can_hand_over(self, *, server_side: bool = False) -> bool:
        """Whether the tunnel core may relay this connection from now on (see ``handover``):
        the side asked for (a destination is a client, a TLS device's connection a server),
        its handshake done, reading the standard way, with nothing ended."""
        return (
            self._handshaken
            and self._ssl.server_side == server_side
            and not self._shutdown_sent
            and self.failure is None
            and not self._outgoing.pending
            and type(self).data_received is TlsEndpoint.data_received
            and type(self).buffer_updated is TlsEndpoint.buffer_updated
        )

    def run_read_hooks(self) -> bool:
        """Run the hooks waiting for the first reads (:meth:`after_first_read`) as after a
        batch of records; whether none is left."""
        if self._after_read:
            self._after_read = [hook for hook in self._after_read if not hook()] or None
        return self._after_read is None

    def ended_elsewhere(self) -> None:
        super().ended_elsewhere()
        self._after_read = None  # its hooks refer back to it: no cycle outlives it

    def relay_ready(self) -> bool:
        """Whether reads need nothing from this endpoint but decrypting: the first reads' work
        (session hooks, buffers given back) is done. Asked by the compiled relay."""
        return not self._free_reads and self._after_read is None

    def after_first_read(self, hook: Callable[[], bool]) -> None:
        """Run ``hook`` after each batch of incoming records until it returns True."""
        if self._after_read is None:
            self._after_read = []
        self._after_read.append(hook)

    def resumable_session(self) -> Resumable | None:
        """This connection's session, if a later one can resume it (TLS 1.3: once the
        server's ticket has arrived)."""
        if native.AVAILABLE:
            return native.take_session(self._ssl)
        session = self._ssl.session  # leaks a few KiB per read on some CPython builds
        return session if session is not None and session.has_ticket else None

    @property
    def session_reused(self) -> bool:
        return self._ssl.session_reused
