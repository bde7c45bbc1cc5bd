"""What the PKI end-to-end tests share: the real ``openssl`` CLI, pkilint's CLIs, and the few
API calls every test makes (register a device, issue, revoke, fetch the public PKI files)."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from e2e.gateway import Gateway, base_env, free_port

PROBLEM = "application/problem+json"
OCSP_RESPONSE = "application/ocsp-response"
# pkilint severities that must never show up; INFO and NOTICE are allowed.
SEVERE = frozenset({"FATAL", "ERROR", "WARNING"})


# -- processes -------------------------------------------------------------------------------


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``openssl`` CLI; fail with its output when ``check`` and it fails."""
    binary = shutil.which("openssl")
    assert binary is not None, "openssl is not installed"
    result = subprocess.run(
        [binary, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"openssl {' '.join(str(a) for a in args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def _venv_tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found is not None, f"{name} (pkilint) is not installed"
    return found


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str | None
    node_path: str


def pkilint(tool: str, document: Path, *options: str) -> list[Finding]:
    """Every pkilint finding (INFO and worse) for ``document``, read from its JSON report.

    pkilint exits with the number of findings at or above the ``-s`` threshold (clamped to
    255), and with 1 and nothing on stdout when it cannot load the document: both are checked.
    """
    result = subprocess.run(
        [_venv_tool(tool), "lint", *options, "-s", "INFO", "-f", "JSON", str(document)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip(), f"{tool} could not load {document}: {result.stderr}"
    report = json.loads(result.stdout)
    findings = [
        Finding(f["severity"], f["code"], f["message"], r["node_path"])
        for r in report["results"]
        for f in r["finding_descriptions"]
    ]
    assert result.returncode == min(len(findings), 255), (result.returncode, findings)
    return findings


def assert_lint_clean(tool: str, document: Path, *options: str) -> list[Finding]:
    findings = pkilint(tool, document, *options)
    severe = [f for f in findings if f.severity in SEVERE]
    assert not severe, f"{tool} on {document.name}: {severe}"
    return findings


# -- the API ---------------------------------------------------------------------------------


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The problem+json body of an error answer, after checking its shape."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM, response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:fleetgate:problem:")
    return body


def add_device(api: httpx.Client, device_id: str, **fields: Any) -> None:
    created = api.post("/v1/devices", json={"id": device_id, **fields})
    assert created.status_code == 201, created.text


def issue(api: httpx.Client, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/devices/{id}/certificates and return the 201 body."""
    issued = api.post(f"/v1/devices/{device_id}/certificates", json=body)
    assert issued.status_code == 201, issued.text
    result: dict[str, Any] = issued.json()
    return result


def issue_csr(api: httpx.Client, device_id: str, csr: Path) -> dict[str, Any]:
    return issue(api, device_id, {"csr": csr.read_text()})


def issue_generated(api: httpx.Client, device_id: str, algorithm: str) -> dict[str, Any]:
    return issue(api, device_id, {"generate_key": {"algorithm": algorithm}})


def revoke(api: httpx.Client, serial: str, reason: str = "keyCompromise") -> dict[str, Any]:
    revoked = api.post(f"/v1/certificates/{serial}/revoke", json={"reason": reason})
    assert revoked.status_code == 200, revoked.text
    body: dict[str, Any] = revoked.json()
    assert body["status"] == "revoked"
    assert body["revocation_reason"] == reason
    return body


def fetch(gateway: Gateway, path: str, dest: Path) -> Path:
    """A public /pki file, fetched without a token, written to ``dest``."""
    with gateway.client(None) as anonymous:
        response = anonymous.get(path)
    assert response.status_code == 200, (path, response.status_code, response.text)
    dest.write_bytes(response.content)
    return dest


def write_pem(dest: Path, text: str) -> Path:
    dest.write_text(text)
    return dest


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def serial_of(path: Path) -> str:
    """The serial as the API spells it: lowercase hex without leading zeros."""
    return format(certificate(path).serial_number, "x")


def pem_from_der(der: bytes, label: str) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


# -- openssl recipes -------------------------------------------------------------------------


def make_csr(
    workdir: Path,
    name: str,
    subject: str,
    *,
    subject_alt_name: str | None = None,
    key_options: Sequence[str] = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
) -> tuple[Path, Path]:
    """(key, CSR) made by ``openssl req``, e.g. subject ``/CN=meter-7``."""
    key, csr = workdir / f"{name}.key", workdir / f"{name}.csr"
    args: list[str | Path] = ["req", "-new", *key_options, "-nodes", "-keyout", key]
    args += ["-subj", subject, "-out", csr]
    if subject_alt_name:
        args += ["-addext", f"subjectAltName={subject_alt_name}"]
    openssl(*args)
    return key, csr


@dataclass(frozen=True)
class PublicPki:
    root: Path
    issuing: Path
    crl: Path


def fetch_public_pki(gateway: Gateway, workdir: Path, prefix: str = "") -> PublicPki:
    return PublicPki(
        root=fetch(gateway, "/pki/root.pem", workdir / f"{prefix}root.pem"),
        issuing=fetch(gateway, "/pki/issuing.pem", workdir / f"{prefix}issuing.pem"),
        crl=fetch(gateway, "/pki/crl.pem", workdir / f"{prefix}crl.pem"),
    )


def verify(
    root: Path, untrusted: Path, leaf: Path, *, crl: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` (with ``-crl_check`` when a CRL is given); not checked."""
    args: list[str | Path] = ["verify", "-CAfile", root, "-untrusted", untrusted]
    if crl is not None:
        args += ["-crl_check", "-CRLfile", crl]
    return openssl(*args, leaf, check=False)


@dataclass(frozen=True)
class OcspAnswer:
    stdout: str
    stderr: str
    response: Path

    @property
    def verified(self) -> bool:
        return "Response verify OK" in self.stderr

    def status_of(self, name: str) -> str:
        """The status openssl prints for ``name`` (the -cert path or the -serial text)."""
        for line in self.stdout.splitlines():
            if line.startswith(f"{name}: "):
                return line.removeprefix(f"{name}: ").strip()
        raise AssertionError(f"no status for {name} in:\n{self.stdout}\n{self.stderr}")


def ocsp(
    gateway: Gateway,
    issuer: Path,
    root: Path,
    *,
    cert: Path | None = None,
    serial: str | None = None,
    options: Sequence[str] = (),
) -> OcspAnswer:
    """``openssl ocsp`` against the gateway's responder (POST), keeping the DER response."""
    response = issuer.parent / f"ocsp-{secrets.token_hex(4)}.der"
    args: list[str | Path] = ["ocsp", "-issuer", issuer, *options]
    if cert is not None:
        args += ["-cert", cert]
    if serial is not None:
        args += ["-serial", serial]
    args += ["-url", f"{gateway.url}/pki/ocsp", "-CAfile", root, "-respout", response]
    result = openssl(*args)
    return OcspAnswer(result.stdout, result.stderr, response)


@dataclass(frozen=True)
class OutsideCa:
    root: Path
    root_key: Path
    intermediate: Path
    intermediate_key: Path


_OUTSIDE_CNF = """\
[req]
distinguished_name = dn
[dn]
[v3_root]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_intermediate]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_intermediate_no_ski]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
subjectKeyIdentifier = none
authorityKeyIdentifier = keyid:always
"""


def make_outside_ca(workdir: Path, name: str = "outside", *, ski: bool = True) -> OutsideCa:
    """A root and an intermediate CA made with ``openssl req``/``openssl x509``, the way an
    organisation's own PKI would (v3_ca extensions; without SKI when ``ski`` is False)."""
    cnf = workdir / f"{name}.cnf"
    cnf.write_text(_OUTSIDE_CNF)
    root, root_key = workdir / f"{name}-root.pem", workdir / f"{name}-root.key"
    inter, inter_key = workdir / f"{name}-intermediate.pem", workdir / f"{name}-intermediate.key"
    csr = workdir / f"{name}-intermediate.csr"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req", "-x509", "-new", *curve, "-keyout", root_key, "-subj",
        f"/O=Outside {name}/CN=Outside {name} Root", "-days", "3650",
        "-config", cnf, "-extensions", "v3_root", "-out", root,
    )  # fmt: skip
    openssl(
        "req", "-new", *curve, "-keyout", inter_key, "-subj",
        f"/O=Outside {name}/CN=Outside {name} Issuing", "-config", cnf, "-out", csr,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", root, "-CAkey", root_key,
        "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "1825", "-extfile", cnf,
        "-extensions", "v3_intermediate" if ski else "v3_intermediate_no_ski", "-out", inter,
    )  # fmt: skip
    return OutsideCa(root, root_key, inter, inter_key)


@contextmanager
def running_gateway(data_dir: Path, **env: str) -> Iterator[Gateway]:
    """A gateway for a whole module (tests that only add devices and issue can share one)."""
    gateway = Gateway(data_dir=data_dir, port=free_port(), env=base_env(**env)).start()
    try:
        yield gateway
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.process.kill()
            gateway.wait_exit()


def unhandled(gateway: Gateway, since: int = 0) -> list[str]:
    """The internal errors the gateway logged (``api.unhandled_exception``), for messages."""
    return [
        f"{e.get('error')}: {e.get('detail')}"
        for e in gateway.events[since:]
        if e.get("event") == "api.unhandled_exception"
    ]


def served_certificate(
    port: int, *, cafile: Path | None = None, cadata: str | None = None
) -> x509.Certificate:
    """The certificate a new TLS handshake with 127.0.0.1:``port`` is served, verified against
    ``cafile`` or ``cadata`` and the address (the connection is then closed)."""
    context = ssl.create_default_context(cafile=cafile, cadata=cadata)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def tls_listener_env(name: str, port: int, forward_to: int, **tls: str) -> dict[str, str]:
    """The environment that defines listener ``name`` on 127.0.0.1:``port`` relaying to
    127.0.0.1:``forward_to`` over TLS: ``[listeners.NAME.tls]`` keys from ``tls`` (mode tls,
    and the address as the certificate's name unless it comes from files)."""
    prefix = f"FLEETGATE_LISTENERS__{name.upper()}__"
    env = {
        f"{prefix}BIND": f"127.0.0.1:{port}",
        f"{prefix}FORWARD_TO": f"127.0.0.1:{forward_to}",
        f"{prefix}TLS__MODE": "tls",
    }
    if "cert_file" not in tls:
        env[f"{prefix}TLS__SERVER_NAMES"] = '["127.0.0.1"]'
    env.update({f"{prefix}TLS__{key.upper()}": value for key, value in tls.items()})
    return env
