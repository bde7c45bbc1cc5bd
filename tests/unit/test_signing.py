"""The request signature fleetgate adds for HTTP and UDP destinations (``dataplane.signing``).

The canonical string is checked against the module's own documentation, the MAC against a
known answer computed here with nothing but ``hmac``/``hashlib``, and :func:`verify` against
every way a request can differ from what was signed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.dataplane import signing

KEY = b"fleetgate-test-signing-key-0123456789abcdef"
TIMESTAMP = 1_795_334_400
NONCE = "5f0c6a2e9d4b4c1f8e7a6b5c4d3e2f10"
METHOD = "POST"
TARGET = "/readings?site=7&x=%20y"
BODY = b'{"t": 21.5}'
DEVICE = "meter-7"
# Computed once with plain hmac/hashlib, independently of fleetgate (see the KAT test).
BODY_SHA256 = "d8d568f37c80d06f9f84e0538bc92f43c556cf1895a8e6139263936ddb6b9759"
KNOWN_MAC = "332bd8e50be3423f7e3cd59da9c7572c79f623a5c2f1d2bccbbfc1447bfdf3ba"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

DOCUMENTED_HEADERS = (
    "X-Fleetgate-Timestamp",
    "X-Fleetgate-Nonce",
    "X-Fleetgate-Content-SHA256",
    "X-Fleetgate-Key-Id",
    "X-Fleetgate-Signature",
)


def signed_headers(
    *,
    key: bytes = KEY,
    method: str = METHOD,
    target: str = TARGET,
    body: bytes = BODY,
    device_id: str = DEVICE,
    timestamp: int = TIMESTAMP,
    nonce: str | None = NONCE,
) -> dict[str, str]:
    """What a receiver gets: the signature headers plus X-Fleetgate-Device, keyed lowercase."""
    headers = signing.signature_headers(
        key,
        "ingest-2026",
        method=method,
        target=target,
        body=body,
        device_id=device_id,
        timestamp=timestamp,
        nonce=nonce,
    )
    received = {name.lower(): value for name, value in headers}
    received["x-fleetgate-device"] = device_id
    return received


def check(
    headers: dict[str, str],
    *,
    key: bytes = KEY,
    method: str = METHOD,
    target: str = TARGET,
    body: bytes = BODY,
    now: int = TIMESTAMP,
    tolerance_s: int = signing.DEFAULT_TOLERANCE_S,
) -> bool:
    """``verify`` of the reference request, with any part changed."""
    return signing.verify(
        key, method=method, target=target, body=body, headers=headers, now=now,
        tolerance_s=tolerance_s,
    )  # fmt: skip


def documented_canonical_lines() -> list[str]:
    """The placeholder lines of the canonical string, read from the module docstring."""
    doc = signing.__doc__
    assert doc is not None
    block = doc.split("The canonical string is these seven lines joined by ``\\n``", 1)[1]
    block = block.split("::", 1)[1].split("\n\n", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


# -- the canonical string ------------------------------------------------------------------------


def test_the_docstring_documents_seven_lines_in_this_order() -> None:
    assert documented_canonical_lines() == [
        "v1",
        "<timestamp>",
        "<nonce>",
        "<METHOD>",
        "<path and query, exactly as sent in the request line>",
        "<content sha256 hex>",
        "<device id>",
    ]


def test_canonical_string_is_the_documented_lines_joined_by_newline() -> None:
    values = {
        "v1": "v1",
        "<timestamp>": str(TIMESTAMP),
        "<nonce>": NONCE,
        "<METHOD>": METHOD,
        "<path and query, exactly as sent in the request line>": TARGET,
        "<content sha256 hex>": BODY_SHA256,
        "<device id>": DEVICE,
    }
    expected = "\n".join(values[line] for line in documented_canonical_lines()).encode()
    got = signing.canonical(
        timestamp=TIMESTAMP,
        nonce=NONCE,
        method="post",  # the method is upper-cased
        target=TARGET,
        body_sha256=BODY_SHA256,
        device_id=DEVICE,
    )
    assert got == expected
    assert not got.endswith(b"\n")
    assert got.count(b"\n") == 6


def test_the_target_is_taken_exactly_as_sent() -> None:
    """No normalisation: percent-encoding, query order and a trailing ? all count."""
    base = signed_headers()
    for other in ("/readings?x=%20y&site=7", "/readings?site=7&x= y", "/Readings?site=7&x=%20y"):
        assert not check(base, target=other), other
    assert not check(signed_headers(target="/readings?"), target="/readings")


# -- known answer ----------------------------------------------------------------------------------


def test_known_answer_vector() -> None:
    body_digest = hashlib.sha256(BODY).hexdigest()
    assert body_digest == BODY_SHA256
    text = f"v1\n{TIMESTAMP}\n{NONCE}\nPOST\n{TARGET}\n{body_digest}\n{DEVICE}"
    mac = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    assert mac == KNOWN_MAC

    headers = signing.signature_headers(
        KEY,
        "ingest-2026",
        method="POST",
        target=TARGET,
        body=BODY,
        device_id=DEVICE,
        timestamp=TIMESTAMP,
        nonce=NONCE,
    )
    assert headers == [
        ("X-Fleetgate-Timestamp", str(TIMESTAMP)),
        ("X-Fleetgate-Nonce", NONCE),
        ("X-Fleetgate-Content-SHA256", BODY_SHA256),
        ("X-Fleetgate-Key-Id", "ingest-2026"),
        ("X-Fleetgate-Signature", f"v1={KNOWN_MAC}"),
    ]


def test_the_headers_are_the_documented_ones() -> None:
    doc = signing.__doc__
    assert doc is not None
    documented = re.findall(r"^\s+(X-Fleetgate-[A-Za-z0-9-]+):", doc, re.MULTILINE)
    # X-Fleetgate-Device is documented too; the proxy adds it with the identity headers.
    assert documented == ["X-Fleetgate-Device", *DOCUMENTED_HEADERS]
    names = [name for name, _ in signing.signature_headers(
        KEY, "k", method="GET", target="/", body=b"", device_id="d", timestamp=1
    )]  # fmt: skip
    assert tuple(names) == DOCUMENTED_HEADERS


def test_an_empty_body_is_signed_with_the_digest_of_nothing() -> None:
    headers = signed_headers(method="GET", body=b"")
    assert headers["x-fleetgate-content-sha256"] == EMPTY_SHA256
    assert check(headers, method="GET", body=b"")


def test_a_fresh_nonce_is_32_hex_characters_and_never_repeats() -> None:
    nonces = {signed_headers(nonce=None)["x-fleetgate-nonce"] for _ in range(200)}
    assert len(nonces) == 200
    assert all(re.fullmatch(r"[0-9a-f]{32}", nonce) for nonce in nonces)


# -- verify ----------------------------------------------------------------------------------------


def test_verify_accepts_the_request_as_signed() -> None:
    headers = signed_headers()
    assert check(headers)
    assert check(headers, method="post")  # methods compare upper-cased, as signed
    # Within the tolerance on both sides, including its edge.
    for now in (TIMESTAMP - 300, TIMESTAMP + 300, TIMESTAMP + 10):
        assert check(headers, now=now), now
    assert check(headers, now=TIMESTAMP + 3000, tolerance_s=3000)


def test_verify_rejects_the_wrong_key() -> None:
    headers = signed_headers()
    assert not check(headers, key=KEY[:-1] + b"X")
    assert not check(headers, key=b"")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("method", "PUT"),
        ("target", "/readings?site=8&x=%20y"),
        ("target", "/other"),
        ("body", b'{"t": 21.6}'),
        ("body", BODY + b" "),
        ("body", b""),
    ],
)
def test_verify_rejects_a_changed_request(argument: str, value: Any) -> None:
    assert not check(signed_headers(), **{argument: value})


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-fleetgate-device", "meter-8"),
        ("x-fleetgate-timestamp", str(TIMESTAMP + 1)),
        ("x-fleetgate-nonce", "0" * 32),
        # A digest that matches another body does not help: the body is hashed again.
        ("x-fleetgate-content-sha256", EMPTY_SHA256),
        ("x-fleetgate-signature", "v1=" + "0" * 64),
        ("x-fleetgate-signature", f"v1={KNOWN_MAC[:-1]}"),
    ],
)
def test_verify_rejects_a_changed_header(header: str, value: str) -> None:
    headers = signed_headers()
    assert check(headers)
    headers[header] = value
    assert not check(headers)


def test_a_device_id_change_is_caught_even_with_a_consistent_digest() -> None:
    """Re-signing needs the key: a forwarder that swaps the device id cannot fix the MAC."""
    headers = signed_headers()
    forged = dict(headers, **{"x-fleetgate-device": "someone-else"})
    assert not check(forged)


@pytest.mark.parametrize("now", [TIMESTAMP - 301, TIMESTAMP + 301, 0, TIMESTAMP * 2])
def test_verify_rejects_a_timestamp_outside_the_tolerance(now: int) -> None:
    assert not check(signed_headers(), now=now)


def test_verify_rejects_a_stale_request_even_when_freshly_signed_with_an_old_clock() -> None:
    old = signed_headers(timestamp=TIMESTAMP - 3600)
    assert not check(old)
    assert check(old, now=TIMESTAMP - 3600)


@pytest.mark.parametrize(
    "missing",
    [
        "x-fleetgate-timestamp",
        "x-fleetgate-nonce",
        "x-fleetgate-content-sha256",
        "x-fleetgate-signature",
        "x-fleetgate-device",
    ],
)
def test_verify_rejects_a_missing_header(missing: str) -> None:
    headers = signed_headers()
    del headers[missing]
    assert not check(headers)


def test_verify_wants_lowercase_header_names() -> None:
    headers = {name.title(): value for name, value in signed_headers().items()}
    assert not check(headers)


@pytest.mark.parametrize("signature", ["v2={mac}", "V1={mac}", "{mac}", "v1:{mac}", "v1 = {mac}"])
def test_verify_rejects_another_version_or_format(signature: str) -> None:
    headers = signed_headers()
    headers["x-fleetgate-signature"] = signature.format(mac=KNOWN_MAC)
    assert not check(headers)


@pytest.mark.parametrize("timestamp", ["", "soon", "1.5e9", "0x6b04", "-1"])
def test_verify_rejects_a_timestamp_that_is_not_an_integer(timestamp: str) -> None:
    headers = signed_headers()
    headers["x-fleetgate-timestamp"] = timestamp
    assert not check(headers)


@pytest.mark.parametrize(
    "spelling", [f"+{TIMESTAMP}", f"0{TIMESTAMP}", f"{TIMESTAMP:_}", f" {TIMESTAMP}", "١٧٩٥٣٣٤٤٠٠"]
)
def test_verify_takes_the_timestamp_only_as_the_plain_digits_that_were_signed(
    spelling: str,
) -> None:
    """Another spelling of the same number is another signed string, as for a receiver that
    follows the documented recipe (which signs the header text)."""
    headers = signed_headers()
    headers["x-fleetgate-timestamp"] = spelling
    assert not check(headers)


@pytest.mark.parametrize("header", ["x-fleetgate-signature", "x-fleetgate-content-sha256"])
def test_verify_answers_false_for_non_ascii_values_instead_of_raising(header: str) -> None:
    """hmac.compare_digest raises TypeError for non-ASCII str; a receiver gets such headers
    from anyone (HTTP header bytes decoded as Latin-1)."""
    headers = signed_headers()
    headers[header] = ("v1=" if header.endswith("signature") else "") + "é" * 64
    assert not check(headers)


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    target=st.from_regex(r"/[A-Za-z0-9/_.~%?&=-]{0,60}", fullmatch=True),
    body=st.binary(max_size=512),
    device_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True),
    flip=st.integers(min_value=0),
)
def test_any_request_verifies_as_signed_and_no_longer_with_one_body_bit_flipped(
    method: str, target: str, body: bytes, device_id: str, flip: int
) -> None:
    headers = signed_headers(method=method, target=target, body=body, device_id=device_id)
    assert signing.verify(
        KEY, method=method, target=target, body=body, headers=headers, now=TIMESTAMP
    )
    if body:
        position = flip % (len(body) * 8)
        tampered = bytearray(body)
        tampered[position // 8] ^= 1 << (position % 8)
        assert not signing.verify(
            KEY, method=method, target=target, body=bytes(tampered), headers=headers, now=TIMESTAMP
        )
