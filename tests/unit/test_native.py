"""The OpenSSL calls reached through ctypes: they must be available on the machines we ship
for, resume real sessions, and not leak what ``SSLObject.session`` leaks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from fleetgate.dataplane import native
from support.certs import TestCA
from support.tls_pair import Pair, client_context, server_context


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = TestCA.create("native root")
    cafile = ca.write_bundle(tmp_path / "ca.pem")
    server = ca.issue_server().write(tmp_path, "server")
    return client_context(cafile), server_context(server)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_the_layout_check_passes_here() -> None:
    assert native.AVAILABLE, native.WHY_NOT


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_taken_natively_resumes_the_next_connection(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion
) -> None:
    client, server = contexts
    client.maximum_version = version
    first = Pair(client, server)
    assert first.handshake(then_read=True).client is None  # TLS 1.3: the ticket came with it
    session = native.take_session(first.client)
    assert session is not None
    assert not first.client.session_reused

    second = Pair(client, server)
    native.offer_session(second.client, session)
    del session  # OpenSSL holds its own reference now
    assert second.handshake(then_read=True).client is None
    assert second.client.session_reused
    assert second.client.version() == first.client.version()


def test_no_session_before_the_tls13_ticket_arrives(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    pair = Pair(*contexts)
    assert pair.handshake().client is None  # finished, but nothing read after it yet
    assert native.take_session(pair.client) is None


def test_taking_sessions_does_not_grow_memory(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """``SSLObject.session`` costs about 6 KiB of memory that never comes back, per read, on
    the CPython builds here; 3,000 native takes must not cost even 1 KiB each."""
    pair = Pair(*contexts)
    pair.handshake(then_read=True)
    reads = 3000
    native.take_session(pair.client)  # first-use allocations are not the leak
    before = _resident_bytes()
    for _ in range(reads):
        assert native.take_session(pair.client) is not None
    grown = _resident_bytes() - before
    assert grown < reads * 1024, f"{grown / reads:.0f} bytes per take"


def test_buffers_are_given_back_once_everything_is_read(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    pair = Pair(*contexts)
    assert pair.handshake(then_read=True).client is None
    assert native.free_buffers(pair.client)
    # The connection goes on working: OpenSSL allocates again on the next record.
    pair.server.write(b"after")
    pair.handshake()  # pumps the record across (both sides are done: no new flights)
    assert pair.client.read(5) == b"after"


@pytest.mark.parametrize(
    ("version", "safe"),
    [
        ((3, 0, 13), False),
        ((3, 0, 14), True),
        ((3, 0, 22), True),
        ((3, 1, 5), False),
        ((3, 1, 6), True),
        ((3, 2, 1), False),
        ((3, 2, 2), True),
        ((3, 3, 0), False),
        ((3, 3, 1), True),
        ((3, 4, 0), True),
        ((1, 1, 1), False),
    ],
)
def test_record_buffers_are_freed_only_where_openssl_does_it_safely(
    version: tuple[int, int, int], safe: bool
) -> None:
    # CVE-2024-4741: SSL_free_buffers with a partial record buffered (a peer's choice).
    assert native.buffers_can_be_freed(version) is safe


def test_this_machines_openssl_version_is_read_whole() -> None:
    # "OpenSSL 3.0.22 25 Aug 2026": the patch is the ssl module's fourth field from 3.0 on.
    major, minor, patch = native.openssl_version()
    assert ssl.OPENSSL_VERSION.startswith(f"OpenSSL {major}.{minor}.{patch}")
