"""Two ``SSLObject``s talking through memory BIOs: a client on the context the gateway's
upstream builds (``upstream.build_context``) and a server presenting a certificate from
:mod:`support.certs`. Every record is OpenSSL's own; nothing is fabricated."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane.upstream import ClientCertificate, build_context
from fleetgate.sealing import Secret
from support.certs import CertFiles

MAX_FLIGHTS = 10


@dataclass(frozen=True)
class Outcome:
    """Who raised what, once the handshake (and, optionally, one read) is over."""

    client: BaseException | None
    server: BaseException | None


class Pair:
    """A client and a server ``SSLObject`` wired to each other through memory BIOs."""

    def __init__(
        self,
        client_context: ssl.SSLContext,
        server_context: ssl.SSLContext,
        server_hostname: str = "localhost",
    ) -> None:
        self._to_server, self._to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._server_out, self._client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self._to_client, self._client_out, server_hostname=server_hostname
        )
        self.server = server_context.wrap_bio(self._to_server, self._server_out, server_side=True)

    def _pump(self) -> None:
        self._to_server.write(self._client_out.read())
        self._to_client.write(self._server_out.read())

    def handshake(self, *, then_read: bool = False) -> Outcome:
        """Step both sides until both finish or one fails; with ``then_read`` the server
        also sends a byte and the client reads it (TLS 1.3 servers judge a client certificate
        after the client has already finished, so a refusal arrives with the first read)."""
        errors: dict[str, BaseException] = {}
        done = {"client": False, "server": False}
        sides = (("client", self.client), ("server", self.server))
        for _ in range(MAX_FLIGHTS):
            for side, obj in sides:
                if done[side] or side in errors:
                    continue
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    errors[side] = exc
                self._pump()  # a failing side's alert goes to the other, which reads it next
            if all(done[side] or side in errors for side, _ in sides):
                break
        if then_read and done["client"]:
            if done["server"]:
                self.server.write(b"!")
                self._pump()
            try:
                self.client.read(1)
            except ssl.SSLError as exc:
                errors["client"] = exc
        assert errors or all(done.values()), "the handshake neither finished nor failed"
        return Outcome(errors.get("client"), errors.get("server"))


def client_context(
    cafile: Path, *, client: CertFiles | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """The gateway's own upstream context for a destination trusting ``cafile``."""
    presented = (
        None
        if client is None
        else ClientCertificate("test@1", client.cert.read_bytes(), Secret(client.key.read_bytes()))
    )
    context = build_context(
        DestinationConfig(address="localhost:1", ca_file=str(cafile)), presented
    )
    if maximum is not None:  # the destination config has no maximum: forced here
        context.maximum_version = maximum
    return context


def server_context(
    server: CertFiles,
    *,
    client_cafile: Path | None = None,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    context.load_cert_chain(server.cert, server.key)
    if client_cafile is not None:
        context.load_verify_locations(cafile=client_cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
