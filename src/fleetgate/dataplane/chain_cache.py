"""Server chains a destination verified lately, so the next connection need not verify again.

Every new upstream connection gets the same chain from the same server. Building and checking it
(parsing the trust store's candidates, two or three signature checks, name and time checks) is
about a fifth of the CPU a full TLS 1.3 handshake costs the gateway. A chain that passed, byte for
byte the same, for the same server name, with the same trust and pins (one cache per destination:
trust, name and pins are the destination's), passes again until the earliest ``notAfter`` in it
or :data:`REMEMBER_S`, whichever comes first. Its parsed certificates are kept with it, and the
sessions of the connections that present it again hold those instead of their own copies (a
connection keeps the server's chain in its session as long as it lives: 4 to 5 KiB per
certificate, most of an idle relayed connection's memory otherwise). What a hit does not skip:
the handshake itself still proves that the server holds the leaf's private key (its
CertificateVerify is checked against the leaf), so a copied chain without the key gets nowhere.

Never remembered: a chain that failed verification, or failed the pins (the endpoint then refuses
it with the precise cause, as without the cache), or a handshake OpenSSL runs outside a
:class:`~fleetgate.dataplane.tls_endpoint.TlsEndpoint` (nothing to key the server name on)
unless the context serves one server name only (``server_name``: the tunnel core's contexts).
There, with no endpoint to check the pins after the handshake, a chain that fails them is
refused here, named :data:`PIN_MISMATCH` in the connection's verify result.
"""

from __future__ import annotations

from collections import OrderedDict

from fleetgate.clock import Clock
from fleetgate.dataplane import native
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, matches_pins, stepping

REMEMBER_S = 60.0
MAX_CHAINS = 16  # per destination: a server behind a balancer may present a few
# X509_V_ERR_APPLICATION_VERIFICATION (x509_vfy.h): what a chain refused for its pins reports.
PIN_MISMATCH = 50


class VerifiedChains:
    """One destination's recently verified server chains (a verification hook for its contexts)."""

    __slots__ = ("_clock", "_known", "_pins", "_server_name", "hits", "misses")

    def __init__(self, clock: Clock, pins: frozenset[str], server_name: str | None = None) -> None:
        self._clock = clock
        self._pins = pins
        self._server_name = server_name
        # (name, fingerprint) -> until when, and the chain's parsed certificates
        self._known: OrderedDict[tuple[object, bytes], tuple[float, native.SharedChain]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def __call__(self, chain: native.PeerChain) -> bool:
        endpoint = stepping()
        try:
            return self._decide(chain, endpoint)
        except Exception:
            if endpoint is None and self._pins:
                return False  # nobody checks the pins after the handshake: fail closed
            raise

    def _decide(self, chain: native.PeerChain, endpoint: TlsEndpoint | None) -> bool:
        name = self._server_name_of(endpoint)
        if name is None:
            return chain.verify()
        key = (name, chain.fingerprint())
        now = self._clock.monotonic()
        known = self._known.get(key)
        if known is not None:
            until, kept = known
            if now < until:
                self.hits += 1
                if endpoint is not None:
                    endpoint.chain_checked = True
                chain.share(kept)  # the session holds the parsed chain only once
                return True
            del self._known[key]
        self.misses += 1
        if not chain.verify():
            return False
        if self._pins and not matches_pins(chain.verified_ders(), self._pins):
            if endpoint is None:  # nobody checks after the handshake: refused here
                chain.refuse(PIN_MISMATCH)
                return False
            return True  # verified, but the endpoint's pin check will refuse it: not remembered
        if endpoint is not None:
            endpoint.chain_checked = True
        self._known[key] = (now + min(REMEMBER_S, chain.seconds_valid()), chain.keep())
        if len(self._known) > MAX_CHAINS:
            self._known.popitem(last=False)
        return True

    def _server_name_of(self, endpoint: TlsEndpoint | None) -> object:
        """Whose chain this is: the name the client side checks; None for a server side's
        (a device's chain: not remembered here) or an unknown one."""
        if endpoint is None:
            return self._server_name
        if endpoint.ssl_object.server_side:
            return None
        return endpoint.ssl_object.server_hostname

    def clear(self) -> None:
        self._known.clear()
