"""Server chains a destination verified lately, so the next connection need not verify again.

Every new upstream connection gets the same chain from the same server. Building and checking it
(parsing the trust store's candidates, two or three signature checks, name and time checks) is
about a fifth of the CPU a full TLS 1.3 handshake costs the gateway. A chain that passed, byte for
byte the same, for the same server name, with the same trust and pins (one cache per destination:
trust, name and pins are the destination's), passes again until the earliest ``notAfter`` in it
or :data:`REMEMBER_S`, whichever comes first. What a hit does not skip: the handshake itself still
proves that the server holds the leaf's private key (its CertificateVerify is checked against the
leaf), so a copied chain without the key gets nowhere.

Never remembered: a chain that failed verification, or failed the pins (the endpoint then refuses
it with the precise cause, as without the cache), or a handshake OpenSSL runs outside a
:class:`~fleetgate.dataplane.tls_endpoint.TlsEndpoint` (nothing to key the server name on).
"""

from __future__ import annotations

from collections import OrderedDict

from fleetgate.clock import Clock
from fleetgate.dataplane import native
from fleetgate.dataplane.tls_endpoint import matches_pins, stepping

REMEMBER_S = 60.0
MAX_CHAINS = 16  # per destination: a server behind a balancer may present a few


class VerifiedChains:
    """One destination's recently verified server chains (a verification hook for its contexts)."""

    __slots__ = ("_clock", "_known", "_pins", "hits", "misses")

    def __init__(self, clock: Clock, pins: frozenset[str]) -> None:
        self._clock = clock
        self._pins = pins
        self._known: OrderedDict[tuple[object, bytes], float] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, chain: native.PeerChain) -> bool:
        endpoint = stepping()
        if endpoint is None or endpoint.ssl_object.server_side:
            return chain.verify()
        key = (endpoint.ssl_object.server_hostname, chain.fingerprint())
        now = self._clock.monotonic()
        until = self._known.get(key)
        if until is not None:
            if now < until:
                self.hits += 1
                endpoint.chain_checked = True
                return True
            del self._known[key]
        self.misses += 1
        if not chain.verify():
            return False
        if self._pins and not matches_pins(chain.verified_ders(), self._pins):
            return True  # verified, but the endpoint's pin check will refuse it: not remembered
        endpoint.chain_checked = True
        self._known[key] = now + min(REMEMBER_S, chain.seconds_valid())
        if len(self._known) > MAX_CHAINS:
            self._known.popitem(last=False)
        return True

    def clear(self) -> None:
        self._known.clear()
