"""A destination's verified server chain is remembered briefly, and nothing else is: real TLS
servers on 127.0.0.1, the gateway's own upstream code, an injected clock for the remembering."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import native
from fleetgate.dataplane.chain_cache import REMEMBER_S
from fleetgate.dataplane.tls_endpoint import TlsEndpoint, TlsFailure
from fleetgate.dataplane.upstream import Upstream, UpstreamError, build_context
from support.certs import CertFiles, TestCA, Validity, spki_sha256_b64
from support.tls_pair import server_context

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


@dataclass
class Server:
    """A TLS echo server whose certificate can be swapped between connections."""

    context: ssl.SSLContext
    port: int = 0
    served: list[str] = field(default_factory=list)

    def present(self, files: CertFiles) -> None:
        self.context.load_cert_chain(files.cert, files.key)


@dataclass
class Setup:
    ca: TestCA
    cafile: Path
    server: Server
    tmp: Path

    def destination(self, **overrides: object) -> DestinationConfig:
        values: dict[str, object] = {
            "address": f"127.0.0.1:{self.server.port}",
            "server_name": "localhost",
            "ca_file": str(self.cafile),
            "session_resumption": False,  # every connection a full handshake, with a chain
        }
        values.update(overrides)
        return DestinationConfig.model_validate(values)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    ca = TestCA.create("chain cache root", intermediate=True)
    cafile = ca.write_bundle(tmp_path / "ca.pem")
    server = Server(server_context(ca.issue_server().write(tmp_path, "server")))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.read(100))
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # a client that refused our chain
        finally:
            writer.close()

    listening = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server.context)
    server.port = listening.sockets[0].getsockname()[1]
    yield Setup(ca, cafile, server, tmp_path)
    listening.close()
    listening.close_clients()  # a test that failed may have left a connection open
    await listening.wait_closed()


async def _exchange(upstream: Upstream, destination: DestinationConfig) -> TlsEndpoint:
    """Connect, and see the server echo (the connection is good, not merely handshaken)."""
    endpoint = await upstream.connect("to", destination, None)
    assert isinstance(endpoint, TlsEndpoint)
    endpoint.write(b"ping")
    assert await asyncio.wait_for(endpoint.read_some(), 5) == b"ping"
    endpoint.close()
    return endpoint


async def _refused(upstream: Upstream, destination: DestinationConfig) -> str:
    with pytest.raises(UpstreamError) as refused:
        await upstream.connect("to", destination, None)
    return refused.value.cause


async def test_the_next_connection_skips_verifying_the_same_chain(setup: Setup) -> None:
    clock = FakeClock()
    upstream = Upstream(clock)
    destination = setup.destination()
    first = await _exchange(upstream, destination)
    second = await _exchange(upstream, destination)
    chains = upstream.verified_chains("to", destination)
    assert (chains.misses, chains.hits) == (1, 1)
    assert first.chain_checked
    assert second.chain_checked
    assert not second.session_reused  # a full handshake each time: only verification was saved


def _leaf_der(files: CertFiles) -> bytes:
    """The first certificate of the file (the leaf; the intermediate follows it)."""
    end = "-----END CERTIFICATE-----"
    first = files.cert.read_text().split(end)[0] + end
    return ssl.PEM_cert_to_DER_cert(first)


def _peer_chain(endpoint: TlsEndpoint) -> list[int]:
    """The addresses of the certificates the connection's session holds for the server."""
    lib = native._lib
    assert lib is not None
    chain = lib.SSL_get_peer_cert_chain(native.ssl_address(endpoint.ssl_object))
    return [lib.OPENSSL_sk_value(chain, i) for i in range(lib.OPENSSL_sk_num(chain))]


async def test_connections_presented_the_same_chain_share_its_parsed_certificates(
    setup: Setup,
) -> None:
    known = setup.ca.issue_server().write(setup.tmp, "known")
    setup.server.present(known)
    upstream = Upstream(FakeClock())
    destination = setup.destination()
    first = await _exchange(upstream, destination)
    second = await _exchange(upstream, destination)
    shared = _peer_chain(first)
    assert len(shared) == 2  # the leaf and the intermediate, parsed once for both sessions
    assert _peer_chain(second) == shared
    assert second.ssl_object.getpeercert(binary_form=True) == _leaf_der(known)
    del first  # its session's references go; the cache's and the second session's stay
    third = await _exchange(upstream, destination)
    assert _peer_chain(third) == shared
    assert third.ssl_object.getpeercert(binary_form=True) == _leaf_der(known)

    renewal = setup.ca.issue_server().write(setup.tmp, "renewed")
    setup.server.present(renewal)
    renewed = await _exchange(upstream, destination)  # another leaf: parsed, verified, its own
    assert _peer_chain(renewed)[0] != shared[0]
    assert renewed.ssl_object.getpeercert(binary_form=True) == _leaf_der(renewal)


# Run in a fresh interpreter: what earlier tests left in this one (buffers, caches, malloc's
# settings) makes its byte counts too noisy to see 9 KiB per connection.
_MEASURE = """
import asyncio, ctypes, json, sys
from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import native
from fleetgate.dataplane.upstream import Upstream

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def in_use():  # bytes malloc handed out and did not get back (exact, not RSS)
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd

async def held_per_connection(destination, count):
    upstream = Upstream(FakeClock())
    held = [await upstream.connect("to", destination, None) for _ in range(5)]
    before = in_use()
    held += [await upstream.connect("to", destination, None) for _ in range(count)]
    grown = (in_use() - before) / count
    for endpoint in held:
        endpoint.close()
    return grown

async def main():
    destination = DestinationConfig.model_validate(json.loads(sys.argv[1]))
    shared = await held_per_connection(destination, 200)
    native.PeerChain.share = lambda self, kept: False
    own = await held_per_connection(destination, 200)
    print(json.dumps([shared, own]))

asyncio.run(main())
"""


async def test_the_parsed_copies_are_freed_not_kept_per_connection(setup: Setup) -> None:
    destination = setup.destination().model_dump_json()
    measuring = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MEASURE, destination, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, _ = await measuring.communicate()
    assert measuring.returncode == 0
    shared, own = json.loads(out)
    # A leaf and an intermediate parsed are about 9 KiB: freed at once when shared.
    assert own - shared > 6 * 1024, (own, shared)


async def test_remembered_for_a_minute_at_most(setup: Setup) -> None:
    clock = FakeClock()
    upstream = Upstream(clock)
    destination = setup.destination()
    await _exchange(upstream, destination)
    clock.advance(REMEMBER_S - 1)
    await _exchange(upstream, destination)
    clock.advance(2)
    await _exchange(upstream, destination)
    chains = upstream.verified_chains("to", destination)
    assert (chains.misses, chains.hits) == (2, 1)


async def test_never_remembered_past_the_chain_expiry(setup: Setup) -> None:
    now = setup.ca.now
    short = Validity(now - timedelta(minutes=5), now + timedelta(seconds=30))
    setup.server.present(setup.ca.issue_server(validity=short).write(setup.tmp, "short"))
    clock = FakeClock()
    upstream = Upstream(clock)
    destination = setup.destination()
    await _exchange(upstream, destination)
    clock.advance(31)  # well inside a minute, but past what the leaf had left when verified
    await _exchange(upstream, destination)
    chains = upstream.verified_chains("to", destination)
    assert (chains.misses, chains.hits) == (2, 0)


async def test_a_changed_chain_is_verified_again_and_can_fail(setup: Setup) -> None:
    upstream = Upstream(FakeClock())
    destination = setup.destination()
    await _exchange(upstream, destination)
    outsider = TestCA.create("not trusted")
    setup.server.present(outsider.issue_server().write(setup.tmp, "outsider"))
    assert await _refused(upstream, destination) == "unknown_ca"
    assert await _refused(upstream, destination) == "unknown_ca"
    chains = upstream.verified_chains("to", destination)
    assert (chains.misses, chains.hits) == (3, 0)


async def test_a_failing_chain_is_never_remembered(setup: Setup) -> None:
    upstream = Upstream(FakeClock())
    destination = setup.destination(server_name="elsewhere.test")
    for _ in range(3):
        assert await _refused(upstream, destination) == "hostname_mismatch"
    assert upstream.verified_chains("to", destination).hits == 0


async def test_a_chain_remembered_for_one_name_is_checked_again_for_another(
    setup: Setup,
) -> None:
    upstream = Upstream(FakeClock())
    destination = setup.destination()
    await _exchange(upstream, destination)
    # The same cache, handed a handshake for a name the certificate does not carry.
    chains = upstream.verified_chains("to", destination)
    context = build_context(destination, None)
    native.hook_verification(context, chains)
    endpoint: TlsEndpoint | None = None

    def factory() -> TlsEndpoint:
        nonlocal endpoint
        endpoint = TlsEndpoint(context, server_hostname="elsewhere.test")
        return endpoint

    await asyncio.get_running_loop().create_connection(factory, "127.0.0.1", setup.server.port)
    assert endpoint is not None
    with pytest.raises(TlsFailure) as refused:
        await asyncio.wait_for(endpoint.handshake, 5)
    assert refused.value.cause == "hostname_mismatch"
    assert chains.hits == 0


async def test_pins_are_checked_before_a_chain_is_remembered(setup: Setup) -> None:
    upstream = Upstream(FakeClock())
    wrong = setup.destination(pin_sha256=["A" * 43 + "="])
    for _ in range(2):
        assert await _refused(upstream, wrong) == "pin_mismatch"
    assert upstream.verified_chains("to", wrong).hits == 0

    pin = spki_sha256_b64(setup.ca.certificate)  # the root's key: a pin on the trust anchor
    pinned = setup.destination(pin_sha256=[pin])
    await _exchange(upstream, pinned)
    await _exchange(upstream, pinned)
    assert upstream.verified_chains("to", pinned).hits == 1
