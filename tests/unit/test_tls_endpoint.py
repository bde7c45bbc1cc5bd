"""``classify()`` on real TLS failures, and the SPKI pin format.

Every failure here is produced by OpenSSL itself: two ``SSLObject``s, a client on the context
the gateway's upstream builds (``upstream.build_context``) and a server presenting a
certificate from :mod:`support.certs`, hand their records to each other through memory BIOs
until one of them raises. No exception is fabricated.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fleetgate.dataplane.tls_endpoint import TlsFailure, classify, spki_sha256
from support.certs import CertFiles, Issued, TestCA, Validity, spki_sha256_b64
from support.tls_pair import Outcome, Pair, client_context, server_context


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    cafile: Path
    directory: Path

    def files(self, issued: Issued, stem: str) -> CertFiles:
        return issued.write(self.directory, stem)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCA.create("classify root")
    return Pki(ca, ca.write_bundle(tmp_path / "ca.pem"), tmp_path)


def _revocation_list(ca: TestCA, revoked: x509.Certificate) -> bytes:
    now = datetime.now(UTC)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(revoked.serial_number)
        .revocation_date(now - timedelta(minutes=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + timedelta(days=1))
        .add_revoked_certificate(entry)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.root.private_key.public_key()),
            critical=False,
        )
        .sign(ca.root.private_key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


# -- the destination's certificate, as the gateway's client side judges it -----------------------


@pytest.mark.parametrize(
    ("case", "verify_code", "cause"),
    [
        ("expired", 10, "certificate_expired"),
        ("not_yet_valid", 9, "certificate_not_yet_valid"),
        ("wrong_host", 62, "hostname_mismatch"),
        ("wrong_ip", 64, "hostname_mismatch"),
        ("unknown_ca", 20, "unknown_ca"),
        ("self_signed", 18, "unknown_ca"),
        ("revoked", 23, "certificate_revoked"),
        ("client_only_usage", 26, "certificate_invalid"),  # not for serverAuth
    ],
)
def test_server_certificate_failures_map_to_their_cause(
    pki: Pki, case: str, verify_code: int, cause: str
) -> None:
    now, ca = pki.ca.now, pki.ca
    server_hostname = "localhost"
    context = client_context(pki.cafile)
    match case:
        case "expired":
            issued = ca.issue_server(validity=Validity.expired(now))
        case "not_yet_valid":
            issued = ca.issue_server(validity=Validity.not_yet_valid(now))
        case "wrong_host":
            issued = ca.issue_server(dns_names=("other.test",), ip_addresses=())
        case "wrong_ip":
            issued, server_hostname = ca.issue_server(), "127.0.0.2"
        case "unknown_ca":
            issued = TestCA.create("stranger", now=now).issue_server()
        case "self_signed":
            issued = TestCA.create("lonely", now=now).root
        case "revoked":
            issued = ca.issue_server()
            crl = pki.directory / "crl.pem"
            crl.write_bytes(_revocation_list(ca, issued.certificate))
            context.load_verify_locations(cafile=crl)  # a PEM file may hold CRLs too
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        case _:
            issued = ca.issue_client("localhost", dns_names=("localhost",))
    pair = Pair(context, server_context(pki.files(issued, case)), server_hostname)
    outcome = pair.handshake()
    assert isinstance(outcome.client, ssl.SSLCertVerificationError), outcome
    assert outcome.client.verify_code == verify_code, outcome.client.verify_message
    failure = classify(outcome.client)
    assert failure.cause == cause
    assert failure.detail == outcome.client.verify_message


def test_a_good_chain_completes_and_classify_is_not_needed(pki: Pki) -> None:
    server = pki.files(pki.ca.issue_server(), "good")
    outcome = Pair(client_context(pki.cafile), server_context(server)).handshake()
    assert outcome == Outcome(None, None)


# -- the destination refusing what the gateway presents ------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no_certificate", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        ("stranger_certificate", "TLSV1_ALERT_UNKNOWN_CA"),
        ("expired_certificate", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
    ],
)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_refused_client_certificate_is_client_certificate_refused(
    pki: Pki, case: str, reason: str, version: ssl.TLSVersion
) -> None:
    if case == "no_certificate" and version is ssl.TLSVersion.TLSv1_2:
        reason = "SSLV3_ALERT_HANDSHAKE_FAILURE"  # TLS 1.2 has no certificate_required alert
    now = pki.ca.now
    client: CertFiles | None = None
    if case == "stranger_certificate":
        client = pki.files(TestCA.create("stranger", now=now).issue_client("dev"), case)
    elif case == "expired_certificate":
        client = pki.files(pki.ca.issue_client("dev", validity=Validity.expired(now)), case)
    server = pki.files(pki.ca.issue_server(), "server")
    pair = Pair(
        client_context(pki.cafile, client=client, maximum=version),
        server_context(server, client_cafile=pki.cafile),
    )
    outcome = pair.handshake(then_read=True)  # TLS 1.3: the alert comes after our Finished
    assert isinstance(outcome.client, ssl.SSLError), outcome
    assert outcome.client.reason == reason
    refused = reason != "SSLV3_ALERT_HANDSHAKE_FAILURE"
    expected = "client_certificate_refused" if refused else "handshake_failure"
    assert classify(outcome.client).cause == expected


# -- versions and garbage -------------------------------------------------------------------------


def test_no_common_version_is_protocol_version_on_both_sides(pki: Pki) -> None:
    server = pki.files(pki.ca.issue_server(), "server")
    pair = Pair(
        client_context(pki.cafile, maximum=ssl.TLSVersion.TLSv1_2),
        server_context(server, minimum=ssl.TLSVersion.TLSv1_3),
    )
    outcome = pair.handshake()
    assert outcome.server is not None, outcome
    assert outcome.client is not None, outcome
    assert classify(outcome.server).cause == "protocol_version"  # UNSUPPORTED_PROTOCOL
    assert classify(outcome.client).cause == "protocol_version"  # the alert it was sent


def test_a_server_that_does_not_speak_tls_is_not_tls(pki: Pki) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(pki.cafile).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    assert outgoing.read()[:1] == b"\x16"  # the ClientHello went out
    incoming.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ssl.SSLError) as raised:
        client.do_handshake()
    assert raised.value.reason == "WRONG_VERSION_NUMBER"
    assert classify(raised.value).cause == "not_tls"


def test_other_errors_are_connection_lost_and_failures_pass_through() -> None:
    lost = classify(ConnectionResetError(104, "Connection reset by peer"))
    assert (lost.cause, lost.detail) == ("connection_lost", "[Errno 104] Connection reset by peer")
    assert classify(ConnectionAbortedError()).detail == "ConnectionAbortedError"
    already = TlsFailure("pin_mismatch", "no certificate in the chain matches a pin")
    assert classify(already) is already


# -- pins -----------------------------------------------------------------------------------------


def test_spki_sha256_is_the_pin_format_of_the_test_factory(pki: Pki) -> None:
    ca = TestCA.create("pins", intermediate=True)
    for certificate in (
        ca.certificate,
        *ca.issue_server().chain(),
        pki.ca.issue_client("dev").certificate,
    ):
        der = certificate.public_bytes(serialization.Encoding.DER)
        assert spki_sha256(der) == spki_sha256_b64(certificate)
    a, b = pki.ca.issue_server(), pki.ca.issue_server()
    assert spki_sha256(a.certificate.public_bytes(serialization.Encoding.DER)) != spki_sha256(
        b.certificate.public_bytes(serialization.Encoding.DER)
    )
