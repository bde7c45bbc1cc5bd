"""Every device presents its own certificate through one shared context per destination, and
resumes only its own sessions: a real TLS server on 127.0.0.1 that requires a client
certificate and answers with the name it saw."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization

from fleetgate.clock import FakeClock
from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import native
from fleetgate.dataplane import upstream as upstream_module
from fleetgate.dataplane.datapath import DataPath
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from fleetgate.dataplane.upstream import ClientCertificate, Upstream, UpstreamError
from fleetgate.metrics import Metrics
from fleetgate.sealing import Secret
from support.certs import TestCA
from support.tls_pair import server_context

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


class Site:
    def __init__(self, ca: TestCA, port: int) -> None:
        self.ca = ca
        self.port = port

    def destination(self) -> DestinationConfig:
        return DestinationConfig(
            address=f"127.0.0.1:{self.port}", server_name="localhost", ca_file=self.cafile
        )

    cafile = ""

    def device(self, name: str) -> ClientCertificate:
        issued = self.ca.issue_client(name)
        return ClientCertificate(f"{name}@1", issued.chain_pem(), Secret(issued.key_pem()))


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    # Leaves are signed by an intermediate the server does not hold: a device's chain must be
    # presented whole for the server to accept it.
    ca = TestCA.create("identity root", intermediate=True)
    root = tmp_path / "root.pem"
    root.write_bytes(ca.bundle_pem())
    context = server_context(ca.issue_server().write(tmp_path, "server"), client_cafile=root)
    context.verify_mode = ssl.CERT_REQUIRED

    async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)
            peer = writer.get_extra_info("peercert") or {}
            subject = dict(item[0] for item in peer.get("subject", ()))
            writer.write(subject.get("commonName", "?").encode())
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(who, "127.0.0.1", 0, ssl=context)
    found = Site(ca, server.sockets[0].getsockname()[1])
    found.cafile = str(root)
    yield found
    server.close()
    server.close_clients()
    await server.wait_closed()


async def _seen_as(
    upstream: Upstream,
    site: Site,
    device: ClientCertificate,
    route: str = "to",
    destination: DestinationConfig | None = None,
) -> tuple[str, bool]:
    """The name the server saw, once it answered (a TLS 1.3 ticket comes before the answer),
    and whether the session was resumed."""
    endpoint = await upstream.connect(route, destination or site.destination(), device)
    assert isinstance(endpoint, TlsEndpoint)
    endpoint.write(b"?")
    name = b""
    while chunk := await asyncio.wait_for(endpoint.read_some(), 5):
        name += chunk
    endpoint.close()
    return name.decode(), endpoint.session_reused


async def test_each_device_is_seen_as_itself_through_one_context(site: Site) -> None:
    upstream = Upstream(FakeClock())
    alpha, beta = site.device("alpha"), site.device("beta")
    seen = [await _seen_as(upstream, site, device) for device in (alpha, alpha, beta, beta)]
    # Each resumes its own session, never another device's (which would present that
    # device's name): beta's first connection is a full handshake although alpha's session is
    # at hand on the same context.
    assert seen == [("alpha", False), ("alpha", True), ("beta", False), ("beta", True)]
    shared = {upstream._entry("to", site.destination(), d).context for d in (alpha, beta)}
    assert len(shared) == 1


async def test_a_renewed_credential_is_presented_from_the_next_connection(site: Site) -> None:
    upstream = Upstream(FakeClock())
    assert await _seen_as(upstream, site, site.device("gamma")) == ("gamma", False)
    issued = site.ca.issue_client("gamma-renewed")
    renewed = ClientCertificate("gamma@2", issued.chain_pem(), Secret(issued.key_pem()))
    name, reused = await _seen_as(upstream, site, renewed)
    assert (name, reused) == ("gamma-renewed", False)  # not the old revision's session


async def test_a_key_that_does_not_match_is_refused_before_dialling(site: Site) -> None:
    upstream = Upstream(FakeClock())
    one, other = site.ca.issue_client("one"), site.ca.issue_client("other")
    mismatched = ClientCertificate("one@1", one.chain_pem(), Secret(other.key_pem()))
    with pytest.raises(UpstreamError) as refused:
        await upstream.connect("to", site.destination(), mismatched)
    assert refused.value.cause == "tls_setup"
    assert "does not belong" in refused.value.detail
    garbage = ClientCertificate("bad@1", b"not a certificate", Secret(one.key_pem()))
    with pytest.raises(UpstreamError) as refused:
        await upstream.connect("to", site.destination(), garbage)
    assert refused.value.cause == "tls_setup"
    # An encrypted key is refused (never a password prompt on the gateway's terminal).
    locked = one.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    encrypted = ClientCertificate("locked@1", one.chain_pem(), Secret(locked))
    with pytest.raises(UpstreamError) as refused:
        await upstream.connect("to", site.destination(), encrypted)
    assert (refused.value.cause, refused.value.detail) == (
        "tls_setup",
        "destination to: no private key",
    )
    # Nothing was left in OpenSSL's error queue to surface in an unrelated later call.
    assert await _seen_as(upstream, site, site.device("after")) == ("after", False)


async def test_a_connection_cut_without_close_notify_leaves_the_session_resumable(
    site: Site,
) -> None:
    upstream = Upstream(FakeClock())
    device = site.device("delta")
    assert await _seen_as(upstream, site, device) == ("delta", False)
    for _ in range(3):
        # Ended the way a device that drops off ends it: no close_notify to the destination.
        endpoint = await upstream.connect("to", site.destination(), device)
        assert isinstance(endpoint, TlsEndpoint)
        assert endpoint.session_reused
        endpoint.abort()
        await endpoint.closed
        del endpoint
        gc.collect()  # OpenSSL judges the session when the connection's SSL is freed


def _cached(upstream: Upstream) -> list[str]:
    return [key_id for _, _, key_id in upstream._entries]


async def test_what_a_device_left_unused_for_two_hours_goes(site: Site) -> None:
    """A gone device's identity and session do not stay for ever: an entry not used for a
    connection in ENTRY_IDLE_S goes at the next connection; one in use stays."""
    clock = FakeClock()
    upstream = Upstream(clock)
    alpha, beta, gamma = site.device("alpha"), site.device("beta"), site.device("gamma")
    for device in (alpha, beta):
        await _seen_as(upstream, site, device)
    clock.advance(upstream_module.ENTRY_IDLE_S / 2)
    assert await _seen_as(upstream, site, alpha) == ("alpha", True)  # used again
    clock.advance(upstream_module.ENTRY_IDLE_S / 2 + 1)  # beta: idle for longer than that
    assert _cached(upstream) == ["beta@1", "alpha@1"]  # nothing goes without a connection
    assert await _seen_as(upstream, site, gamma) == ("gamma", False)
    assert _cached(upstream) == ["alpha@1", "gamma@1"]
    assert await _seen_as(upstream, site, beta) == ("beta", False)  # a full handshake again


async def test_a_renewed_credential_lets_its_old_revision_go_at_once(site: Site) -> None:
    upstream = Upstream(FakeClock())
    await _seen_as(upstream, site, site.device("gamma"))
    await _seen_as(upstream, site, site.device("delta"))
    issued = site.ca.issue_client("gamma-renewed")
    renewed = ClientCertificate("gamma@2", issued.chain_pem(), Secret(issued.key_pem()))
    assert await _seen_as(upstream, site, renewed) == ("gamma-renewed", False)
    assert _cached(upstream) == ["delta@1", "gamma@2"]


async def test_past_the_bound_the_least_recently_used_goes(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_module, "MAX_ENTRIES", 2)
    upstream = Upstream(FakeClock())
    one, two, three = site.device("one"), site.device("two"), site.device("three")
    for device in (one, two, one, three):
        await _seen_as(upstream, site, device)
    assert _cached(upstream) == ["one@1", "three@1"]
    assert await _seen_as(upstream, site, two) == ("two", False)
    assert _cached(upstream) == ["three@1", "two@1"]
    assert await _seen_as(upstream, site, three) == ("three", True)


async def test_a_reload_that_changes_a_destination_forgets_what_was_kept_for_it(
    site: Site,
) -> None:
    """Contexts, chains, identities and sessions of a destination that is no longer configured
    as it was go at the reload; an unchanged destination keeps its sessions."""
    upstream = Upstream(FakeClock())
    kept, changed = site.destination(), site.destination().model_copy(update={"alpn": ("mqtt",)})
    alpha, beta = site.device("alpha"), site.device("beta")
    assert await _seen_as(upstream, site, alpha, "kept", kept) == ("alpha", False)
    endpoint = await upstream.connect("changed", kept, beta)
    upstream.keep_only({"kept": kept, "changed": changed})

    assert [(name, key_id) for name, _, key_id in upstream._entries] == [("kept", "alpha@1")]
    assert set(upstream._shared) == {("kept", kept)}
    assert set(upstream._chains) == {("kept", kept)}
    assert not endpoint.is_closed  # what is open on the old settings carries on
    endpoint.close()
    # The unchanged destination resumes its session; the changed one starts afresh.
    assert await _seen_as(upstream, site, alpha, "kept", kept) == ("alpha", True)
    assert await _seen_as(upstream, site, beta, "changed", changed) == ("beta", False)


async def test_the_data_path_tells_the_upstream_what_a_reload_kept(site: Site) -> None:
    upstream = Upstream(FakeClock())
    old = site.destination()
    unused = cast(Any, None)  # (reconfiguring reads neither the registry nor the keys)
    path = DataPath(unused, upstream, {"to": old}, FakeClock(), Metrics(), unused)
    await _seen_as(upstream, site, site.device("alpha"))
    path.reconfigure({"to": old})
    assert _cached(upstream) == ["alpha@1"]
    path.reconfigure({"to": old.model_copy(update={"connect_timeout_s": 3.0})})
    assert _cached(upstream) == []
