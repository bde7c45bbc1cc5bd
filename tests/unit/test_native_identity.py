"""A client identity's certificate chain, parsed by OpenSSL: the certificates after the leaf
(an issuing CA every device certificate carries) are parsed once and shared by the identities
that present them, and each identity still presents its whole chain, whatever happened to the
others that shared it.

The handshakes are OpenSSL's own, through memory BIOs (``support.tls_pair``): a server that
trusts only the root accepts a device only if the intermediate came with its certificate.
"""

from __future__ import annotations

import gc
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from fleetgate.config.schema import DestinationConfig
from fleetgate.dataplane import native
from fleetgate.dataplane.upstream import build_context
from support.certs import Issued, TestCA, certificates_pem, subject_common_name
from support.tls_pair import Outcome, Pair, server_context

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


@pytest.fixture
def ca() -> TestCA:
    return TestCA.create("identity chain root", intermediate=True)


@pytest.fixture(autouse=True)
def no_shared_certificates_left() -> None:
    """Every test starts with nothing shared (what other tests parsed stays out of the way)."""
    native._forget_shared_certificates()


def _chain(identity: native.ClientIdentity) -> list[int]:
    lib = native._lib
    assert lib is not None
    _, _, stack = identity.pointers()
    return [lib.OPENSSL_sk_value(stack, i) for i in range(lib.OPENSSL_sk_num(stack))]


def _identity(device: Issued) -> native.ClientIdentity:
    return native.ClientIdentity(device.chain_pem(), device.key_pem())


def _handshake(identity: native.ClientIdentity, ca: TestCA, tmp_path: Path) -> tuple[Outcome, Pair]:
    """A full handshake with a server that trusts only ``ca``'s root."""
    server = ca.issue_server(dns_names=("localhost",)).write(tmp_path, "server")
    roots = ca.write_bundle(tmp_path / "roots.pem")
    client = build_context(DestinationConfig(address="localhost:1", ca_file=str(roots)), None)
    pair = Pair(client, server_context(server, client_cafile=roots))
    identity.present(pair.client)
    return pair.handshake(then_read=True), pair


def _accepted_as(identity: native.ClientIdentity, ca: TestCA, tmp_path: Path) -> str | None:
    """The common name the server saw."""
    outcome, pair = _handshake(identity, ca, tmp_path)
    assert outcome.client is None, outcome
    assert outcome.server is None, outcome
    seen = pair.server.getpeercert(binary_form=True)
    assert seen is not None
    return subject_common_name(x509.load_der_x509_certificate(seen))


def test_devices_of_one_issuing_ca_share_its_parsed_certificate(ca: TestCA) -> None:
    first, second = _identity(ca.issue_client("device-1")), _identity(ca.issue_client("device-2"))

    assert len(_chain(first)) == 1
    assert _chain(first) == _chain(second)  # one X509 for both
    assert first.pointers()[0] != second.pointers()[0]  # each its own leaf
    assert list(native._shared_certificates.values()) == _chain(first)


def test_an_identity_presents_the_shared_certificate_after_the_others_are_gone(
    ca: TestCA, tmp_path: Path
) -> None:
    survivor_cert = ca.issue_client("device-survivor")
    others = [_identity(ca.issue_client(f"device-{n}")) for n in range(3)]
    survivor = _identity(survivor_cert)
    shared = _chain(survivor)[0]
    del others
    gc.collect()

    assert _chain(survivor) == [shared]
    assert _accepted_as(survivor, ca, tmp_path) == "device-survivor"
    assert _accepted_as(_identity(ca.issue_client("device-late")), ca, tmp_path) == "device-late"


def test_without_the_intermediate_the_server_refuses(ca: TestCA, tmp_path: Path) -> None:
    """The handshake check above can fail: a leaf alone does not reach the root."""
    device = ca.issue_client("device-alone")
    alone = native.ClientIdentity(certificates_pem([device.certificate]), device.key_pem())
    outcome, _ = _handshake(alone, ca, tmp_path)
    assert isinstance(outcome.server, ssl.SSLError)
    assert "certificate verify failed" in str(outcome.server)


def test_past_the_bound_certificates_are_parsed_per_identity(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "MAX_SHARED_CERTIFICATES", 0)
    first, second = _identity(ca.issue_client("device-1")), _identity(ca.issue_client("device-2"))

    assert _chain(first) != _chain(second)
    assert native._shared_certificates == {}
    assert _accepted_as(second, ca, tmp_path) == "device-2"


def test_the_least_recently_presented_is_let_go_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Past the bound the oldest shared certificate goes; identities presenting it keep it."""
    monkeypatch.setattr(native, "MAX_SHARED_CERTIFICATES", 2)
    cas = [TestCA.create(f"root {n}", intermediate=True) for n in range(3)]
    devices = [ca.issue_client(f"device-{n}") for n, ca in enumerate(cas)]
    first = _identity(devices[0])
    _identity(devices[1])
    _identity(cas[0].issue_client("device-0b"))  # the first CA, presented again: the newest
    _identity(devices[2])  # the second CA's goes

    held = {certificates_pem(devices[n].intermediates).strip() for n in (0, 2)}
    assert set(native._shared_certificates) == held
    native._forget_shared_certificates()
    assert _accepted_as(first, cas[0], tmp_path) == "device-0"


def test_a_begin_line_with_trailing_blanks_is_read_as_openssl_reads_it(
    ca: TestCA, tmp_path: Path
) -> None:
    """The expression that splits the chain does not match such a line; OpenSSL does, and the
    intermediate after it must still be presented."""
    device = ca.issue_client("device-1")
    leaf, intermediate = (certificates_pem([c]) for c in device.chain())
    padded = intermediate.replace(b"-----BEGIN CERTIFICATE-----", b"-----BEGIN CERTIFICATE----- \t")

    identity = native.ClientIdentity(leaf + padded, device.key_pem())
    assert len(_chain(identity)) == 1
    assert _accepted_as(identity, ca, tmp_path) == "device-1"


def test_more_blocks_than_a_chain_may_hold_are_refused(ca: TestCA) -> None:
    device = ca.issue_client("device-1")
    intermediate = certificates_pem(device.intermediates)
    too_long = certificates_pem([device.certificate]) + intermediate * native.MAX_PEM_OBJECTS

    with pytest.raises(ValueError, match="more than 16 PEM blocks"):
        native.ClientIdentity(too_long, device.key_pem())


def test_a_chain_certificate_that_cannot_be_read_is_refused(ca: TestCA) -> None:
    device = ca.issue_client("device-1")
    leaf = certificates_pem([device.certificate])
    broken = b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"

    with pytest.raises(ValueError, match="cannot be read"):
        native.ClientIdentity(leaf + broken, device.key_pem())
    assert native._shared_certificates == {}


def test_text_between_the_certificates_is_ignored(ca: TestCA, tmp_path: Path) -> None:
    """As ``openssl x509 -text`` or a bundle with comments writes them."""
    device = ca.issue_client("device-1")
    leaf, intermediate = (certificates_pem([c]) for c in device.chain())
    commented = b"subject=CN=device-1\n" + leaf + b"\n# the issuing CA\n" + intermediate

    identity = native.ClientIdentity(commented, device.key_pem())
    assert len(_chain(identity)) == 1
    assert _accepted_as(identity, ca, tmp_path) == "device-1"


def test_another_kind_of_block_reads_the_chain_as_openssl_does(ca: TestCA) -> None:
    """A chain holding something other than plain certificates is not split here."""
    device = ca.issue_client("device-1")
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"

    identity = native.ClientIdentity(params + device.chain_pem(), device.key_pem())
    assert len(_chain(identity)) == 1
    assert native._shared_certificates == {}


def test_a_leaf_alone_still_needs_its_key(ca: TestCA) -> None:
    device, other = ca.issue_client("device-1"), ca.issue_client("device-2")
    with pytest.raises(ValueError, match="does not belong"):
        native.ClientIdentity(device.chain_pem(), other.key_pem())


def test_no_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="no certificate"):
        native.ClientIdentity(b"not a pem", b"")


def test_the_shared_certificate_is_the_issuing_cas(ca: TestCA) -> None:
    device = ca.issue_client("device-1")
    _identity(device)
    (block,) = native._shared_certificates
    assert block == certificates_pem(device.intermediates).strip()
