"""The few OpenSSL calls the ``ssl`` module does not offer, reached through ctypes.

What the data path needs and the ``ssl`` module does not do well:

* taking a session out of a connection for resumption: ``SSLObject.session`` leaks about
  6 KiB per read on the CPython builds here (3.12 and 3.13.0), and fleetgate reads one per
  device credential;
* handing that session to the next connection without CPython's copy through DER;
* giving back OpenSSL's 16 KiB record buffer once an idle connection has read everything
  (``SSL_free_buffers``): about a quarter of an idle proxied connection's memory;
* choosing the key-exchange groups a server accepts (``SSL_CTX_set1_groups_list``);
* stapling an OCSP response to the server certificate for clients that ask for one
  (``SSL_CTX_set_tlsext_status_cb``, ``SSL_set_tlsext_status_ocsp_resp``);
* presenting a client certificate per connection (``SSL_use_cert_and_key``) instead of per
  context: the ``ssl`` module offers only ``SSLContext.load_cert_chain``, and a context per
  device costs 25 KiB and 2 ms to build;
* deciding how a server's chain gets verified (``SSL_CTX_set_cert_verify_callback``), so a
  chain verified moments ago need not be built and checked again (see ``chain_cache``), and
  letting the session of such a connection hold the certificates parsed when the chain was
  verified instead of its own copies (``OPENSSL_sk_set`` on the chain being verified, which is
  the session's own: checked first).

Reaching OpenSSL's objects means reading the pointers inside CPython's ``_ssl`` objects, whose
layout is not a public interface. So nothing is trusted: at import, the layout is checked on a
real context and connection (the ``SSL`` found must belong to the ``SSL_CTX`` found, and the
libssl loaded here must be the one ``_ssl`` was built against). When any check fails,
:data:`AVAILABLE` is false, the callers use the ``ssl`` module's own (slower, leaking) path,
and :data:`WHY_NOT` says why.
"""

from __future__ import annotations

import binascii
import ctypes
import ctypes.util
import re
import ssl
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

# CPython's PySSLContext: PyObject_HEAD, then SSL_CTX *ctx.
# CPython's PySSLSocket (what SSLObject._sslobj is): PyObject_HEAD, PyObject *Socket, SSL *ssl.
_HEAD = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
_CTX_OFFSET = _HEAD
_SSL_OFFSET = _HEAD + ctypes.sizeof(ctypes.c_void_p)
_KNOWN_LAYOUT = ((3, 10), (3, 14))  # versions whose _ssl structs start this way (inclusive)


class Session:
    """An OpenSSL client session (one reference held), for resuming later connections made
    with the same context."""

    __slots__ = ("_pointer",)

    def __init__(self, pointer: int) -> None:
        self._pointer = pointer

    @property
    def pointer(self) -> int:
        return self._pointer

    def __del__(self) -> None:
        if _lib is not None and self._pointer:
            _lib.SSL_SESSION_free(self._pointer)
            self._pointer = 0


def _ssl_pointer(obj: ssl.SSLObject) -> int:
    raw = obj._sslobj  # type: ignore[attr-defined]
    value = ctypes.c_void_p.from_address(id(raw) + _SSL_OFFSET).value
    if not value:
        raise ValueError("no SSL object")
    return value


def _ctx_pointer(context: ssl.SSLContext) -> int:
    value = ctypes.c_void_p.from_address(id(context) + _CTX_OFFSET).value
    if not value:
        raise ValueError("no SSL_CTX")
    return value


def take_session(obj: ssl.SSLObject) -> Session | None:
    """The connection's session if it can resume (TLS 1.3: once its ticket has arrived)."""
    assert _lib is not None
    pointer = _lib.SSL_get1_session(_ssl_pointer(obj))
    if not pointer:
        return None
    session = Session(pointer)
    if not _lib.SSL_SESSION_is_resumable(pointer):
        return None  # freed with ``session``
    return session


def offer_session(obj: ssl.SSLObject, session: Session) -> None:
    """Offer ``session`` in the coming handshake (before it starts). OpenSSL takes its own
    reference, so ``session`` may be dropped afterwards."""
    assert _lib is not None
    if _lib.SSL_set_session(_ssl_pointer(obj), session.pointer) != 1:
        raise ValueError("SSL_set_session refused the session")


_SSL_SENT_SHUTDOWN = 1  # ssl.h


def keep_session_resumable(obj: ssl.SSLObject) -> None:
    """Let the session of a connection that ended without our close_notify stay resumable.

    When such a connection's ``SSL`` is freed, OpenSSL marks its session non-resumable (the
    TLS 1.0 rule against truncation attacks; TLS 1.1 and later dropped it, RFC 5246 section
    7.2.1, and TLS 1.3 sessions are tickets). That session is the very object kept for the next
    connections (``SSL_get1_session`` shares it), so one device that drops its connection would
    cost the next ones their resumption. The connection is gone when this is called.
    """
    assert _lib is not None
    pointer = _ssl_pointer(obj)
    _lib.SSL_set_shutdown(pointer, _lib.SSL_get_shutdown(pointer) | _SSL_SENT_SHUTDOWN)


def ssl_address(obj: ssl.SSLObject) -> int:
    """The address of the connection's ``SSL`` (for the compiled relay)."""
    return _ssl_pointer(obj)


_RELAY_ENTRY_POINTS = (
    "SSL_read_ex",
    "SSL_write_ex",
    "SSL_get_error",
    "SSL_get_rbio",
    "SSL_get_wbio",
    "BIO_write",
    "BIO_read",
    "BIO_ctrl_pending",
    "SSL_pending",
    "SSL_get_shutdown",
    "ERR_clear_error",
)


def relay_entry_points() -> tuple[int, ...]:
    """The addresses of the OpenSSL functions the compiled relay calls, in its order: the
    libssl the ``ssl`` module uses, found and checked here."""
    return _addresses(_RELAY_ENTRY_POINTS)


# What the tunnel core (_tunnel.c) calls, in the order of its bind().
_TUNNEL_ENTRY_POINTS = (
    "SSL_new",
    "SSL_free",
    "SSL_set_bio",
    "BIO_new",
    "BIO_s_mem",
    "SSL_set_connect_state",
    "SSL_do_handshake",
    "SSL_read_ex",
    "SSL_write_ex",
    "SSL_get_error",
    "BIO_write",
    "BIO_read",
    "BIO_ctrl_pending",
    "SSL_shutdown",
    "SSL_ctrl",
    "SSL_set1_host",
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set1_ip_asc",
    "SSL_set_session",
    "SSL_get1_session",
    "SSL_SESSION_is_resumable",
    "SSL_SESSION_free",
    "SSL_get_verify_result",
    "SSL_use_cert_and_key",
    "SSL_get_shutdown",
    "SSL_set_shutdown",
    "ERR_peek_last_error",
    "ERR_clear_error",
    "ERR_reason_error_string",
    "SSL_session_reused",
    "SSL_free_buffers",
    "BIO_free",
    "SSL_get_rbio",
    "SSL_get_wbio",
)


def _addresses(names: tuple[str, ...]) -> tuple[int, ...]:
    assert _lib is not None
    addresses = tuple(
        ctypes.cast(getattr(_lib, name), ctypes.c_void_p).value or 0 for name in names
    )
    if not all(addresses):
        raise RuntimeError("an OpenSSL entry point has no address")
    return addresses


def tunnel_entry_points() -> tuple[int, ...]:
    """The addresses of the OpenSSL functions the tunnel core calls, in its order."""
    return _addresses(_TUNNEL_ENTRY_POINTS)


def context_address(context: ssl.SSLContext) -> int:
    """The address of the context's ``SSL_CTX`` (for the tunnel core; the context must be
    kept alive as long as it is used)."""
    return _ctx_pointer(context)


def verify_message(code: int) -> str:
    """OpenSSL's words for an ``X509_V_ERR_*`` code."""
    assert _lib is not None
    text: bytes | None = _lib.X509_verify_cert_error_string(code)
    return text.decode(errors="replace") if text else ""


# SSL_free_buffers with a partial record buffered could free memory still in use before these
# releases (CVE-2024-4741): a peer decides what is buffered, so on those it is never called.
_FREE_BUFFERS_FIXED_IN = {(3, 0): 14, (3, 1): 6, (3, 2): 2, (3, 3): 1}


def openssl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the OpenSSL the ssl module uses. From 3.0 on, the ssl module's
    version tuple keeps the patch in its fourth field (3.0.22 is ``(3, 0, 0, 22, 0)``)."""
    info = ssl.OPENSSL_VERSION_INFO
    return (info[0], info[1], info[3] if info[0] >= 3 else info[2])


def buffers_can_be_freed(version: tuple[int, int, int]) -> bool:
    """Whether an OpenSSL (major, minor, patch) frees a connection's record buffers safely
    (CVE-2024-4741 fixed: 3.0.14, 3.1.6, 3.2.2, 3.3.1, or 3.4 and later)."""
    major, minor, patch = version
    fixed = _FREE_BUFFERS_FIXED_IN.get((major, minor))
    if fixed is not None:
        return patch >= fixed
    return (major, minor) >= (3, 4)


FREE_BUFFERS = buffers_can_be_freed(openssl_version())


def free_buffers(obj: ssl.SSLObject) -> bool:
    """Release the record buffers if nothing is pending in them; whether it did (never on an
    OpenSSL affected by CVE-2024-4741: the buffers stay, the memory goal is given up)."""
    assert _lib is not None
    if not FREE_BUFFERS:
        return False
    return bool(_lib.SSL_free_buffers(_ssl_pointer(obj)))


_SSL_CTRL_SET_GROUPS_LIST = 92  # ssl.h


def set_groups(context: ssl.SSLContext, groups: str) -> None:
    """Limit the key-exchange groups a context offers/accepts (``"X25519:P-256:P-384"``)."""
    assert _lib is not None
    names = ctypes.create_string_buffer(groups.encode())
    if _lib.SSL_CTX_ctrl(_ctx_pointer(context), _SSL_CTRL_SET_GROUPS_LIST, 0, names) != 1:
        raise ValueError(f"OpenSSL refused the groups {groups!r}")


# -- OCSP stapling ---------------------------------------------------------------------------------

_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63  # ssl.h: SSL_CTX_set_tlsext_status_cb
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71  # ssl.h: SSL_set_tlsext_status_ocsp_resp
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_NOACK = 3  # no status in the handshake (the client goes on without one)
_STATUS_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


@dataclass(frozen=True)
class Staple:
    """A DER OCSP response for a context's certificate, and until when it may be sent."""

    der: bytes
    usable_until: float  # on ``now``'s scale
    now: Callable[[], float]


_staples: dict[int, Staple] = {}  # SSL_CTX pointer -> what its handshakes staple


def _status_request(ssl_pointer: int | None, _arg: int | None) -> int:
    """OpenSSL asks, inside a server handshake whose client sent status_request."""
    try:
        assert _lib is not None
        staple = _staples.get(_lib.SSL_get_SSL_CTX(ssl_pointer) or 0)
        if staple is None or staple.now() >= staple.usable_until:
            return _SSL_TLSEXT_ERR_NOACK  # never a stale answer
        size = len(staple.der)
        buffer = _lib.CRYPTO_malloc(size, b"fleetgate", 0)  # OpenSSL frees it with the SSL
        if not buffer:
            return _SSL_TLSEXT_ERR_NOACK
        ctypes.memmove(buffer, staple.der, size)
        _lib.SSL_ctrl(ssl_pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, size, buffer)
        return _SSL_TLSEXT_ERR_OK
    except Exception:  # noqa: BLE001 - an exception must not cross into OpenSSL
        return _SSL_TLSEXT_ERR_NOACK


_STATUS_REQUEST = _STATUS_CALLBACK(_status_request)  # kept alive for OpenSSL


def staple(context: ssl.SSLContext, found: Staple | None) -> None:
    """Staple ``found`` to the certificate of ``context``'s handshakes from now on (None: stop)."""
    assert _lib is not None
    pointer = _ctx_pointer(context)
    if found is None:
        _staples.pop(pointer, None)
        return
    if pointer not in _staples:
        callback = ctypes.cast(_STATUS_REQUEST, ctypes.c_void_p)
        _lib.SSL_CTX_callback_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, callback)
        # A freed context's address may be reused by the next: forget it with the context.
        weakref.finalize(context, _staples.pop, pointer, None)
    _staples[pointer] = found


# -- client certificates per connection ------------------------------------------------------------


class ClientIdentity:
    """A certificate, the chain after it and its private key, parsed by OpenSSL once, for
    presenting on connections of any client context (:func:`present`)."""

    __slots__ = ("_certificate", "_chain", "_key")

    def __init__(self, chain_pem: bytes, key_pem: bytes) -> None:
        assert _lib is not None
        self._certificate = self._key = self._chain = 0
        leaf, after = _read_identity_chain(chain_pem)
        self._certificate = leaf
        self._chain = _lib.OPENSSL_sk_new_null() or 0
        for index, extra in enumerate(after):
            if not self._chain or not _lib.OPENSSL_sk_push(self._chain, extra):
                for rest in after[index:]:
                    _lib.X509_free(rest)
                raise ValueError("cannot hold the certificate chain")
        self._key = _read_private_key(key_pem)
        if _lib.X509_check_private_key(self._certificate, self._key) != 1:
            _lib.ERR_clear_error()
            raise ValueError("the private key does not belong to the certificate")

    def present(self, obj: ssl.SSLObject) -> None:
        """Make ``obj`` (before its handshake) present this identity when asked for one."""
        assert _lib is not None
        if (
            _lib.SSL_use_cert_and_key(
                _ssl_pointer(obj), self._certificate, self._key, self._chain, 1
            )
            != 1
        ):
            _lib.ERR_clear_error()
            raise ValueError("SSL_use_cert_and_key refused the certificate")

    def pointers(self) -> tuple[int, int, int]:
        """The certificate, key and chain (``X509``, ``EVP_PKEY``, ``STACK_OF(X509)``), for
        the tunnel core, which presents them itself; valid while this object lives."""
        return self._certificate, self._key, self._chain

    def __del__(self) -> None:
        if _lib is None:
            return
        if self._chain:
            for index in range(_lib.OPENSSL_sk_num(self._chain)):
                _lib.X509_free(_lib.OPENSSL_sk_value(self._chain, index))
            _lib.OPENSSL_sk_free(self._chain)
        if self._certificate:
            _lib.X509_free(self._certificate)
        if self._key:
            _lib.EVP_PKEY_free(self._key)
        self._chain = self._certificate = self._key = 0


def _read_identity_chain(chain_pem: bytes) -> tuple[int, list[int]]:
    """The leaf certificate and the certificates after it, each an ``X509`` reference the
    caller frees. The ones after the leaf (the issuing CAs) are shared: see
    :func:`_chain_certificate`. A chain that is not only plain certificate blocks the
    expression finds (another kind of block, a BEGIN line with trailing blanks) is read whole,
    as OpenSSL reads it."""
    assert _lib is not None
    begun = chain_pem.count(_PEM_BEGIN)
    if begun > MAX_PEM_OBJECTS:
        raise ValueError(f"more than {MAX_PEM_OBJECTS} PEM blocks in the certificate chain")
    blocks = list(_PEM_BLOCK.finditer(chain_pem))
    if len(blocks) != begun or any(match.group(1) != b"CERTIFICATE" for match in blocks):
        found = _read_pem(chain_pem, _lib.PEM_read_bio_X509)
        if not found:
            raise ValueError("no certificate in the chain")
        return found[0], found[1:]
    if not blocks:
        raise ValueError("no certificate in the chain")
    leaf = _read_one_certificate(blocks[0].group(0))
    after: list[int] = []
    try:
        for match in blocks[1:]:
            after.append(_chain_certificate(match.group(0)))
    except BaseException:
        for certificate in [leaf, *after]:
            _lib.X509_free(certificate)
        raise
    return leaf, after


def _read_one_certificate(block: bytes) -> int:
    assert _lib is not None
    return _read_first(
        block, _lib.PEM_read_bio_X509, _lib.X509_free, "a certificate of the chain cannot be read"
    )


def _read_first(
    data: bytes, read: Callable[..., int | None], free: Callable[[int], None], missing: str
) -> int:
    """The first object ``read`` finds in ``data`` (the others freed); ``missing`` if none."""
    found = _read_pem(data, read)
    for extra in found[1:]:
        free(extra)
    if not found:
        raise ValueError(missing)
    return found[0]


# The certificates identities present after their own, by PEM block: every device certificate
# the gateway issued carries the same issuing CA, and a parsed certificate costs about 9 KiB
# and 0.13 ms in OpenSSL 3.0. Each is parsed once and referenced by every identity presenting
# it (``X509`` objects are reference-counted and not changed by being presented). At most
# MAX_SHARED_CERTIFICATES are held here, the least recently presented let go first (identities
# that present it keep their own references).
_shared_certificates: dict[bytes, int] = {}
MAX_SHARED_CERTIFICATES = 256


def _chain_certificate(block: bytes) -> int:
    """A new reference to the ``X509`` of ``block``, a PEM certificate after the leaf."""
    assert _lib is not None
    shared = _shared_certificates.pop(block, None)
    if shared is not None:
        _shared_certificates[block] = shared  # the most recently presented, last
        if _lib.X509_up_ref(shared):
            return shared
    certificate = _read_one_certificate(block)
    if shared is None and MAX_SHARED_CERTIFICATES > 0 and _lib.X509_up_ref(certificate):
        while len(_shared_certificates) >= MAX_SHARED_CERTIFICATES:
            _lib.X509_free(_shared_certificates.pop(next(iter(_shared_certificates))))
        _shared_certificates[block] = certificate
    return certificate


def _forget_shared_certificates() -> None:
    """Let go of every shared certificate (identities keep theirs)."""
    assert _lib is not None
    while _shared_certificates:
        _lib.X509_free(_shared_certificates.popitem()[1])


_PASSWORD_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p
)
# An encrypted key gets no password (and so fails) instead of OpenSSL's default, which would
# ask for one on the terminal and block the process.
_NO_PASSWORD = _PASSWORD_CALLBACK(lambda _buf, _size, _rw, _arg: 0)


def _read_pem(data: bytes, read: Callable[..., int | None]) -> list[int]:
    """Every object ``read`` (a ``PEM_read_bio_*``) finds in ``data``, in order."""
    assert _lib is not None
    bio = _lib.BIO_new_mem_buf(data, len(data))
    if not bio:
        raise ValueError("out of memory")
    found: list[int] = []
    try:
        while len(found) < MAX_PEM_OBJECTS and (item := read(bio, None, _NO_PASSWORD, None)):
            found.append(item)
    finally:
        _lib.BIO_free(bio)
        _lib.ERR_clear_error()  # the read that found no more leaves "no start line" behind
    return found


MAX_PEM_OBJECTS = 16

_PEM_BEGIN = b"-----BEGIN "
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_EVP_PKEY_RSA, _EVP_PKEY_EC, _EVP_PKEY_ED25519 = 6, 408, 1087  # evp.h / obj_mac.h
_TYPE_BY_LABEL = {b"EC PRIVATE KEY": _EVP_PKEY_EC, b"RSA PRIVATE KEY": _EVP_PKEY_RSA}
# PKCS #8 ("PRIVATE KEY") names its algorithm near the start: these OIDs, DER-encoded.
_TYPE_BY_OID = (
    (b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01", _EVP_PKEY_EC),  # id-ecPublicKey
    (b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", _EVP_PKEY_RSA),  # rsaEncryption
    (b"\x06\x03\x2b\x65\x70", _EVP_PKEY_ED25519),  # id-Ed25519
)


def _read_private_key(pem: bytes) -> int:
    """The first private key in ``pem``.

    OpenSSL 3.0's ``PEM_read_bio_PrivateKey`` tries every decoder it has: 0.68 ms for a P-256
    key here, a device's first connection's largest single cost. When the PEM block says which
    kind of key it holds (its label, or the algorithm a PKCS #8 key names), the decoder for that
    kind alone reads it (0.11 ms); anything else (an encrypted key, another algorithm, a key the
    hint was wrong about) takes the general path, with the same outcome as before.
    """
    assert _lib is not None
    hinted = _key_der(pem)
    if hinted is not None:
        kind, der = hinted
        cursor = ctypes.c_char_p(der)
        key = _lib.d2i_PrivateKey(kind, None, ctypes.byref(cursor), len(der))
        _lib.ERR_clear_error()
        if key:
            return int(key)
    return _read_first(pem, _lib.PEM_read_bio_PrivateKey, _lib.EVP_PKEY_free, "no private key")


def _key_der(pem: bytes) -> tuple[int, bytes] | None:
    """The kind and DER of the first private key block, when it is plain and its kind is known."""
    for match in _PEM_BLOCK.finditer(pem):
        label, body = match.group(1), match.group(2)
        if not label.endswith(b"PRIVATE KEY"):
            continue  # EC PARAMETERS before the key, a certificate, ...
        if b":" in body:
            return None  # headers: an encrypted traditional key
        try:
            der = binascii.a2b_base64(body)
        except binascii.Error:
            return None
        if label == b"PRIVATE KEY":
            head = der[:32]
            kinds = [kind for oid, kind in _TYPE_BY_OID if oid in head]
            return (kinds[0], der) if len(kinds) == 1 else None
        kind = _TYPE_BY_LABEL.get(label)
        return (kind, der) if kind is not None else None
    return None


# -- peer chain verification ----------------------------------------------------------------------

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_SHA256_SIZE = 32


class PeerChain:
    """The chain a peer presented, as OpenSSL is about to verify it (valid only inside the
    verification hook)."""

    __slots__ = ("_result", "_store")

    def __init__(self, store: int) -> None:
        self._store = store
        self._result: bool | None = None

    def fingerprint(self) -> bytes:
        """SHA-256 of each certificate as sent, leaf first, concatenated."""
        assert _lib is not None
        sent = _lib.X509_STORE_CTX_get0_untrusted(self._store)
        count = _lib.OPENSSL_sk_num(sent) if sent else 0
        digest = ctypes.create_string_buffer(_SHA256_SIZE * max(count, 1))
        size = ctypes.c_uint()
        sha256 = _lib.EVP_sha256()
        for index in range(count):
            certificate = _lib.OPENSSL_sk_value(sent, index)
            slot = ctypes.byref(digest, _SHA256_SIZE * index)
            if _lib.X509_digest(certificate, sha256, slot, ctypes.byref(size)) != 1:
                raise ValueError("X509_digest failed")
        if not count:
            raise ValueError("no chain")
        return digest.raw

    def keep(self) -> SharedChain:
        """The presented certificates, a reference held on each: what a later connection
        presenting the same chain can :meth:`share` instead of its own parsed copies."""
        assert _lib is not None
        sent = _lib.X509_STORE_CTX_get0_untrusted(self._store)
        kept = SharedChain()
        for index in range(_lib.OPENSSL_sk_num(sent) if sent else 0):
            certificate = _lib.OPENSSL_sk_value(sent, index)
            if _lib.X509_up_ref(certificate) != 1:
                kept.release()
                return SharedChain()
            kept.pointers.append(certificate)
        return kept

    def share(self, kept: SharedChain) -> bool:
        """Let the connection's session hold ``kept``'s certificates in place of those just
        parsed from the handshake, which are freed (a parsed certificate is 4 to 5 KiB, and a
        session holds the server's chain as long as the connection lives). The caller matched
        the chains byte for byte (:meth:`fingerprint`). Done only where the chain being
        verified is the session's own (OpenSSL 3's client); false where it is not."""
        assert _lib is not None
        sent = _lib.X509_STORE_CTX_get0_untrusted(self._store)
        ssl_pointer = _lib.X509_STORE_CTX_get_ex_data(
            self._store, _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
        )
        if not sent or not ssl_pointer or _lib.SSL_get_peer_cert_chain(ssl_pointer) != sent:
            return False
        if _lib.OPENSSL_sk_num(sent) != len(kept.pointers) or not kept.pointers:
            return False
        for index, certificate in enumerate(kept.pointers):
            if _lib.X509_up_ref(certificate) != 1:
                return index > 0  # those swapped so far are whole; the rest stay as parsed
            parsed = _lib.OPENSSL_sk_value(sent, index)
            _lib.OPENSSL_sk_set(sent, index, certificate)  # (returns the new element)
            if index == 0:  # what the store context verifies: no longer the freed copy
                _lib.X509_STORE_CTX_set_cert(self._store, certificate)
            _lib.X509_free(parsed)
        return True

    def verify(self) -> bool:
        """OpenSSL's own verification (chain building, signatures, names, time); once."""
        assert _lib is not None
        if self._result is None:
            self._result = _lib.X509_verify_cert(self._store) == 1
        return self._result

    def _verified(self) -> list[int]:
        assert _lib is not None
        assert self._result
        chain = _lib.X509_STORE_CTX_get0_chain(self._store)
        return [_lib.OPENSSL_sk_value(chain, i) for i in range(_lib.OPENSSL_sk_num(chain))]

    def refuse(self, code: int) -> None:
        """Name why the chain is refused (an ``X509_V_ERR_*`` code), for whoever reads the
        connection's verify result afterwards."""
        assert _lib is not None
        _lib.X509_STORE_CTX_set_error(self._store, code)

    def verified_ders(self) -> list[bytes]:
        """The verified chain (leaf to trust anchor), DER; after a successful :meth:`verify`."""
        assert _lib is not None
        ders = []
        for certificate in self._verified():
            size = _lib.i2d_X509(certificate, None)
            buffer = ctypes.create_string_buffer(max(size, 1))
            cursor = ctypes.c_void_p(ctypes.addressof(buffer))
            if size <= 0 or _lib.i2d_X509(certificate, ctypes.byref(cursor)) != size:
                raise ValueError("i2d_X509 failed")
            ders.append(buffer.raw[:size])
        return ders

    def seconds_valid(self) -> float:
        """Seconds until the first certificate of the verified chain expires."""
        assert _lib is not None
        days, seconds = ctypes.c_int(), ctypes.c_int()
        left = float("inf")
        for certificate in self._verified():
            not_after = _lib.X509_get0_notAfter(certificate)
            if not _lib.ASN1_TIME_diff(ctypes.byref(days), ctypes.byref(seconds), None, not_after):
                return 0.0
            left = min(left, days.value * 86_400.0 + seconds.value)
        return left


class SharedChain:
    """A verified server chain's certificates (a reference held on each), shared by the
    sessions of later connections that present the same chain (:meth:`PeerChain.share`)."""

    __slots__ = ("pointers",)

    def __init__(self) -> None:
        self.pointers: list[int] = []

    def release(self) -> None:
        """Let go of the references (the sessions that share them keep their own)."""
        pointers, self.pointers = self.pointers, []
        if _lib is not None:
            for certificate in pointers:
                _lib.X509_free(certificate)

    def __del__(self) -> None:
        self.release()


type VerifyHook = Callable[[PeerChain], bool]
_verify_hooks: dict[int, VerifyHook] = {}  # SSL_CTX pointer -> who decides


def _verify_chain(store: int | None, ctx_pointer: int | None) -> int:
    """OpenSSL asks, inside a handshake, whether the peer's chain is good."""
    chain = PeerChain(store or 0)
    try:
        hook = _verify_hooks.get(ctx_pointer or 0)
        return int(hook(chain) if hook is not None else chain.verify())
    except Exception:  # noqa: BLE001 - an exception must not cross into OpenSSL
        return int(chain.verify())  # OpenSSL's own answer, as without a hook


_VERIFY_CHAIN = _VERIFY_CALLBACK(_verify_chain)  # kept alive for OpenSSL


def hook_verification(context: ssl.SSLContext, hook: VerifyHook) -> None:
    """Let ``hook`` decide on the peer chains of ``context``'s handshakes. The hook answers
    whether the chain is good; :meth:`PeerChain.verify` gives OpenSSL's own answer (whose
    error, when it fails, is what the handshake reports)."""
    assert _lib is not None
    pointer = _ctx_pointer(context)
    if pointer not in _verify_hooks:
        _lib.SSL_CTX_set_cert_verify_callback(pointer, _VERIFY_CHAIN, pointer)
        weakref.finalize(context, _verify_hooks.pop, pointer, None)
    _verify_hooks[pointer] = hook


def _load() -> ctypes.CDLL:
    """The libssl ``_ssl`` uses: already loaded in this process, so found by its soname."""
    import _ssl

    candidates = [_ssl.__file__, "libssl.so.3", ctypes.util.find_library("ssl") or ""]
    for name in candidates:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.OpenSSL_version_num  # noqa: B018 - raises AttributeError if absent
        except (OSError, AttributeError):
            continue
        return lib
    raise OSError("libssl not found")


def _bind(lib: ctypes.CDLL) -> None:
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[tuple[type, ...], type | None]] = {
        "OpenSSL_version_num": ((), ctypes.c_ulong),
        "SSL_get_SSL_CTX": ((vp,), vp),
        "SSL_get1_session": ((vp,), vp),
        "SSL_set_session": ((vp, vp), c_int),
        "SSL_SESSION_free": ((vp,), None),
        "SSL_SESSION_is_resumable": ((vp,), c_int),
        "SSL_free_buffers": ((vp,), c_int),
        "SSL_CTX_ctrl": ((vp, c_int, ctypes.c_long, vp), ctypes.c_long),
        "SSL_CTX_callback_ctrl": ((vp, c_int, vp), ctypes.c_long),
        "SSL_ctrl": ((vp, c_int, ctypes.c_long, vp), ctypes.c_long),
        "CRYPTO_malloc": ((ctypes.c_size_t, ctypes.c_char_p, c_int), vp),
        "SSL_CTX_set_cert_verify_callback": ((vp, _VERIFY_CALLBACK, vp), None),
        "X509_verify_cert": ((vp,), c_int),
        "X509_STORE_CTX_get0_untrusted": ((vp,), vp),
        "X509_STORE_CTX_set_cert": ((vp, vp), None),
        "X509_STORE_CTX_get_ex_data": ((vp, c_int), vp),
        "SSL_get_ex_data_X509_STORE_CTX_idx": ((), c_int),
        "SSL_get_peer_cert_chain": ((vp,), vp),
        "OPENSSL_sk_set": ((vp, c_int, vp), vp),
        "X509_STORE_CTX_get0_chain": ((vp,), vp),
        "X509_STORE_CTX_set_error": ((vp, c_int), None),
        "X509_verify_cert_error_string": ((ctypes.c_long,), ctypes.c_char_p),
        "OPENSSL_sk_num": ((vp,), c_int),
        "OPENSSL_sk_value": ((vp, c_int), vp),
        "EVP_sha256": ((), vp),
        "X509_digest": ((vp, vp, vp, vp), c_int),
        "i2d_X509": ((vp, vp), c_int),
        "X509_get0_notAfter": ((vp,), vp),
        "ASN1_TIME_diff": ((vp, vp, vp, vp), c_int),
        "BIO_new_mem_buf": ((ctypes.c_char_p, c_int), vp),
        "BIO_free": ((vp,), c_int),
        "PEM_read_bio_X509": ((vp, vp, _PASSWORD_CALLBACK, vp), vp),
        "PEM_read_bio_PrivateKey": ((vp, vp, _PASSWORD_CALLBACK, vp), vp),
        "d2i_PrivateKey": ((c_int, vp, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long), vp),
        "X509_free": ((vp,), None),
        "X509_up_ref": ((vp,), c_int),
        "EVP_PKEY_free": ((vp,), None),
        "X509_check_private_key": ((vp, vp), c_int),
        "OPENSSL_sk_new_null": ((), vp),
        "OPENSSL_sk_push": ((vp, vp), c_int),
        "OPENSSL_sk_free": ((vp,), None),
        "ERR_clear_error": ((), None),
        "SSL_use_cert_and_key": ((vp, vp, vp, vp, c_int), c_int),
        "SSL_get_shutdown": ((vp,), c_int),
        "SSL_set_shutdown": ((vp, c_int), None),
        # What the compiled relay calls (its addresses only: see relay_entry_points).
        "SSL_read_ex": ((vp, vp, ctypes.c_size_t, vp), c_int),
        "SSL_write_ex": ((vp, vp, ctypes.c_size_t, vp), c_int),
        "SSL_get_error": ((vp, c_int), c_int),
        "SSL_get_rbio": ((vp,), vp),
        "SSL_get_wbio": ((vp,), vp),
        "BIO_write": ((vp, vp, c_int), c_int),
        "BIO_read": ((vp, vp, c_int), c_int),
        "BIO_ctrl_pending": ((vp,), ctypes.c_size_t),
        "SSL_pending": ((vp,), c_int),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = args
        function.restype = result


def _check(lib: ctypes.CDLL) -> None:
    if not _KNOWN_LAYOUT[0] <= sys.version_info[:2] <= _KNOWN_LAYOUT[1]:
        raise RuntimeError(f"Python {sys.version_info[:2]}: _ssl layout not known")
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise RuntimeError("the libssl found is not the one the ssl module uses")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    obj = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="check.invalid")
    if lib.SSL_get_SSL_CTX(_ssl_pointer(obj)) != _ctx_pointer(context):
        raise RuntimeError("the SSL object found does not belong to its context")


def _init() -> tuple[ctypes.CDLL | None, str]:
    """libssl, bound and checked; or None and why not."""
    try:
        lib = _load()
        _bind(lib)
        _check(lib)
    except (OSError, AttributeError, RuntimeError, ValueError) as exc:
        return None, str(exc)
    return lib, ""


_lib, WHY_NOT = _init()
AVAILABLE = _lib is not None
