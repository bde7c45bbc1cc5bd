"""Remote access sessions with real peers: a web server reached with curl (through a tls
session, and through fleetgate connect on a plain one), a real sshd reached with OpenSSH's ssh
(and the same ssh refused by a tls session, with the SSH diagnosis in the session's events),
a source outside the CIDRs denied, and a live connection cut when the session is deleted and
when it expires.
"""

from __future__ import annotations

import http.server
import json
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.conftest import ADMIN
from e2e.gateway import Gateway, base_env, fleetgate_argv, free_port, run_cli
from e2e.pki_support import running_gateway, served_certificate

HOST = "127.0.0.1"
TIMEOUT_S = 15.0
PAGE = b"hello from the device\n"
# More loopback addresses sshd answers on: devices of their own (a device's address is its own).
MORE_DEVICES = {
    "device_disabled": "127.0.0.11",
    "device_address_removed": "127.0.0.12",
    "device_group_changed": "127.0.0.13",
    "device_deleted": "127.0.0.14",
}


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Site:
    gateway: Gateway
    web_port: int
    ssh_port: int
    workdir: Path

    def api(self) -> httpx.Client:
        return self.gateway.client(ADMIN)


def _start_sshd(workdir: Path, port: int) -> subprocess.Popen[str]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(sshd).exists(), "sshd missing: scripts/test installs openssh-server"
    key = workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {HOST}\nHostKey {key}\nPidFile {workdir / 'sshd.pid'}\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nStrictModes no\n"
        + "".join(f"ListenAddress {address}\n" for address in MORE_DEVICES.values())
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    process = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    for line in process.stderr:  # sshd -e logs to stderr; it says when it listens
        if f"Server listening on {HOST} port {port}" in line:
            # Keep reading what it logs, so a full pipe never stalls it.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process
    raise AssertionError(f"sshd exited ({process.wait()}) without listening")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("sessions")
    web = http.server.ThreadingHTTPServer((HOST, 0), _Page)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    ssh_port = free_port()
    sshd = _start_sshd(workdir, ssh_port)
    try:
        with running_gateway(workdir / "data", FLEETGATE_ADMIN_TOKEN=ADMIN) as gateway:
            site = Site(gateway, web.server_address[1], ssh_port, workdir)
            with site.api() as api:
                ports = [site.web_port, ssh_port]
                group = {"name": "lab", "settings": {"session_ports": ports}}
                assert api.post("/v1/groups", json=group).status_code == 201
                device = {"id": "kiosk", "group": "lab", "addresses": [HOST]}
                assert api.post("/v1/devices", json=device).status_code == 201
            yield site
    finally:
        web.shutdown()
        sshd.terminate()
        sshd.wait(TIMEOUT_S)


def open_session(site: Site, port: int, **body: Any) -> dict[str, Any]:
    with site.api() as api:
        opened = api.post("/v1/sessions", json={"device_id": "kiosk", "port": port, **body})
    assert opened.status_code == 201, opened.text
    session: dict[str, Any] = opened.json()
    site.gateway.wait_for("session.bound", lambda e: e["session"] == session["id"])
    return session


def events(site: Site, session_id: str) -> list[dict[str, Any]]:
    with site.api() as api:
        found = api.get(f"/v1/sessions/{session_id}/events")
    assert found.status_code == 200, found.text
    items: list[dict[str, Any]] = found.json()["items"]
    return items


def wait_for_event(site: Site, session_id: str, kind: str) -> dict[str, Any]:
    """The session's first event of ``kind``, once the gateway says it recorded one."""
    site.gateway.wait_for(
        "session.event", lambda e: e["session"] == session_id and e["kind"] == kind
    )
    return next(e for e in events(site, session_id) if e["kind"] == kind)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def curl_through_connect(*connect_args: str, env: dict[str, str] | None = None) -> str:
    """Plain curl through ``fleetgate connect <connect_args> --listen <a free port>``: what it
    fetched (fleetgate connect speaks the TLS)."""
    local = free_port()
    relay = subprocess.Popen(
        fleetgate_argv("connect", *connect_args, "--listen", f"{HOST}:{local}"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert relay.stderr is not None
        for line in relay.stderr:  # it says when it listens
            if "connect.listening" in line:
                break
        fetched = curl(f"http://{HOST}:{local}/")
        assert fetched.returncode == 0, fetched.stderr
        return fetched.stdout
    finally:
        relay.terminate()
        relay.wait(TIMEOUT_S)


# -- HTTP ------------------------------------------------------------------------------------------


def test_a_tls_session_serves_curl_with_the_ca_it_names(site: Site) -> None:
    session = open_session(site, site.web_port, tls=True, cidrs=[f"{HOST}/32"])
    assert session["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    ca = site.workdir / f"{session['id']}-ca.pem"
    ca.write_text(session["ca_pem"])
    fetched = curl("--cacert", str(ca), f"https://{HOST}:{session['public_port']}/")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.encode() == PAGE
    closed = wait_for_event(site, session["id"], "CLOSED")
    assert closed["destination"] == f"{HOST}:{site.web_port}"
    assert closed["detail"]["down_bytes"] > len(PAGE)
    kinds = [e["kind"] for e in events(site, session["id"])]
    assert kinds[:3] == ["CREATED", "ACCESS", "CONNECTED"], kinds


def test_a_tls_session_serves_the_reissued_certificate_without_a_restart(site: Site) -> None:
    session = open_session(site, site.web_port, tls=True, cidrs=[f"{HOST}/32"])
    before = served_certificate(session["public_port"], cadata=session["ca_pem"]).serial_number
    since = len(site.gateway.events)
    with site.api() as api:
        reissued = api.post("/v1/certificates", json={
            "credential_id": "sessions-server", "profile": "gateway_server",
            "common_name": "localhost", "dns_names": ["localhost"], "ip_addresses": [HOST],
        })  # fmt: skip
    assert reissued.status_code == 201, reissued.text
    site.gateway.wait_for(
        "listener.tls_reloaded", lambda e: e["listener"] == "sessions", since=since
    )
    after = served_certificate(session["public_port"], cadata=session["ca_pem"]).serial_number
    assert after != before
    assert format(after, "x") == reissued.json()["certificate"]["serial"]


def test_fleetgate_connect_lets_plain_curl_use_a_tls_session(site: Site) -> None:
    session = open_session(site, site.web_port, tls=True, cidrs=[f"{HOST}/32"])
    ca = site.workdir / f"{session['id']}-ca.pem"
    ca.write_text(session["ca_pem"])
    fetched = curl_through_connect("--to", f"{HOST}:{session['public_port']}", "--cafile", str(ca))
    assert fetched.encode() == PAGE


def test_a_source_outside_the_cidrs_is_denied_and_recorded(site: Site) -> None:
    session = open_session(site, site.web_port, cidrs=[f"{HOST}/32"])
    fetched = curl("--interface", "127.0.0.2", f"http://{HOST}:{session['public_port']}/")
    assert fetched.returncode != 0
    denied = wait_for_event(site, session["id"], "DENIED")
    assert denied["source"].startswith("127.0.0.2:")
    assert "CONNECTED" not in [e["kind"] for e in events(site, session["id"])]


# -- SSH -------------------------------------------------------------------------------------------


def ssh(port: int) -> subprocess.CompletedProcess[str]:
    """OpenSSH's ssh up to authentication (no key is accepted: reaching it is the point)."""
    return subprocess.run(
        ["ssh", "-v", "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         f"nobody@{HOST}", "true"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def test_ssh_reaches_sshd_through_a_plain_session(site: Site) -> None:
    session = open_session(site, site.ssh_port, cidrs=[f"{HOST}/32"])
    answered = ssh(session["public_port"])
    assert "remote software version OpenSSH" in answered.stderr, answered.stderr
    assert "Permission denied" in answered.stderr, answered.stderr  # it got to authentication
    closed = wait_for_event(site, session["id"], "CLOSED")
    assert closed["detail"]["up_bytes"] > 0


def test_ssh_against_a_tls_session_is_refused_with_the_ssh_diagnosis(site: Site) -> None:
    session = open_session(site, site.ssh_port, tls=True, cidrs=[f"{HOST}/32"])
    answered = ssh(session["public_port"])
    assert answered.returncode != 0
    refused = wait_for_event(site, session["id"], "REFUSED")
    diagnosis = refused["detail"]["diagnosis"]
    assert "SSH banner" in diagnosis, refused
    assert "without --tls" in diagnosis, refused


# -- the end of a session cuts what goes through it -----------------------------------------------


def _held_connection(port: int) -> socket.socket:
    """A connection to sshd through the session, past sshd's banner (so relayed)."""
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT_S)
    assert sock.recv(4) == b"SSH-"
    return sock


def _cut(sock: socket.socket) -> bool:
    """Whether the gateway closed the connection (end of stream or reset) within the timeout."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_deleting_a_session_cuts_its_live_connection_and_closes_the_port(site: Site) -> None:
    session = open_session(site, site.ssh_port, cidrs=[f"{HOST}/32"])
    with _held_connection(session["public_port"]) as sock:
        with site.api() as api:
            deleted = api.delete(f"/v1/sessions/{session['id']}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["state"] == "ended"
        assert _cut(sock)
    with socket.socket() as probe:
        assert probe.connect_ex((HOST, session["public_port"])) != 0  # nobody listens now
    kinds = [e["kind"] for e in events(site, session["id"])]
    assert "DELETED" in kinds
    assert "CLOSED" in kinds


def test_expiry_cuts_a_live_connection(site: Site) -> None:
    session = open_session(site, site.ssh_port, cidrs=[f"{HOST}/32"], duration_s=5)
    with _held_connection(session["public_port"]) as sock:
        assert _cut(sock)  # sshd waits for our banner for far longer than 5 s
    site.gateway.wait_for(
        "session.unbound", lambda e: e["session"] == session["id"] and e["reason"] == "expired"
    )
    assert "EXPIRED" in [e["kind"] for e in events(site, session["id"])]
    with site.api() as api:
        found = api.get(f"/v1/sessions/{session['id']}").json()
    assert (found["state"], found["end_reason"]) == ("ended", "expired")


# -- the CLI: an operator's whole round trip -------------------------------------------------------


def test_the_cli_opens_a_session_and_connect_session_uses_it(site: Site) -> None:
    opened = run_cli(
        site.gateway, "session", "open", "kiosk", "--port", str(site.web_port), "--for", "10m",
        "--from", f"{HOST}/32", "--tls", "--json", token=ADMIN,
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    session = json.loads(opened.stdout)
    assert (session["device_port"], session["tls"]) == (site.web_port, True)
    env = base_env(FLEETGATE_URL=site.gateway.url, FLEETGATE_TOKEN=ADMIN)
    fetched = curl_through_connect("--session", session["id"], env=env)
    assert fetched.encode() == PAGE
    shown = run_cli(site.gateway, "session", "events", session["id"], token=ADMIN)
    assert shown.returncode == 0, shown.stderr
    assert "CONNECTED" in shown.stdout
    closed = run_cli(site.gateway, "session", "close", session["id"], "--json", token=ADMIN)
    assert closed.returncode == 0, closed.stderr
    assert json.loads(closed.stdout)["end_reason"] == "deleted"


# -- restarts --------------------------------------------------------------------------------------


@contextmanager
def _gateway_with_ports(site: Site, tmp_path: Path, ports: str) -> Iterator[Gateway]:
    """A gateway of its own whose session pool is ``ports``, with the lab device (the web
    server) registered."""
    gateway = Gateway(data_dir=tmp_path / "data", port=free_port(), env=base_env(
        FLEETGATE_ADMIN_TOKEN=ADMIN, FLEETGATE_SESSIONS__PORTS=ports,
    )).start()  # fmt: skip
    try:
        with gateway.client(ADMIN) as api:
            group = {"name": "lab", "settings": {"session_ports": [site.web_port]}}
            assert api.post("/v1/groups", json=group).status_code == 201
            device = {"id": "kiosk", "group": "lab", "addresses": [HOST]}
            assert api.post("/v1/devices", json=device).status_code == 201
        yield gateway
    finally:
        gateway.stop()


def test_an_open_session_is_bound_again_after_a_restart(site: Site, tmp_path: Path) -> None:
    with _gateway_with_ports(site, tmp_path, "21000-21099") as gateway:
        with gateway.client(ADMIN) as api:
            opened = api.post(
                "/v1/sessions",
                json={"device_id": "kiosk", "port": site.web_port, "cidrs": [f"{HOST}/32"]},
            )
        assert opened.status_code == 201, opened.text
        session = opened.json()
        assert gateway.stop() == 0
        with socket.socket() as probe:  # nobody serves it while the gateway is down
            assert probe.connect_ex((HOST, session["public_port"])) != 0
        gateway.start()
        bound = gateway.wait_for("session.bound", lambda e: e["session"] == session["id"])
        assert bound["port"] == session["public_port"]
        fetched = curl(f"http://{HOST}:{session['public_port']}/")
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.encode() == PAGE


# -- mtls sessions: a client certificate for the session alone ------------------------------------


def test_an_mtls_session_admits_only_its_own_certificate_which_connect_presents(
    site: Site,
) -> None:
    opened = run_cli(
        site.gateway, "session", "open", "kiosk", "--port", str(site.web_port),
        "--from", f"{HOST}/32", "--mtls", "--json", token=ADMIN,
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    session = json.loads(opened.stdout)
    assert (session["tls"], session["mtls"]) == (True, True)
    site.gateway.wait_for("session.bound", lambda e: e["session"] == session["id"])
    ca = site.workdir / f"{session['id']}-ca.pem"
    ca.write_text(session["ca_pem"])
    # Without the session's certificate: refused, and the events say what to use instead.
    bare = curl("--cacert", str(ca), f"https://{HOST}:{session['public_port']}/")
    assert bare.returncode != 0
    refused = wait_for_event(site, session["id"], "REFUSED")
    assert "fleetgate connect --session" in refused["detail"]["diagnosis"], refused
    # fleetgate connect --session fetches the certificate and presents it.
    env = base_env(FLEETGATE_URL=site.gateway.url, FLEETGATE_TOKEN=ADMIN)
    fetched = curl_through_connect("--session", session["id"], env=env)
    assert fetched.encode() == PAGE


def test_tls_on_a_plain_session_is_refused_with_the_diagnosis(site: Site) -> None:
    session = open_session(site, site.web_port, cidrs=[f"{HOST}/32"])
    fetched = curl("--insecure", f"https://{HOST}:{session['public_port']}/")
    assert fetched.returncode != 0
    refused = wait_for_event(site, session["id"], "REFUSED")
    assert refused["detail"]["reason"] == "tls_on_plain_session", refused
    assert "started a TLS handshake" in refused["detail"]["diagnosis"]
    assert "--tls" in refused["detail"]["diagnosis"]


def _two_free_ports() -> int:
    """The lower of two free neighbouring ports, below the kernel's ephemeral range (from
    32768 here): a port picked from that range can be taken by any outgoing connection (the
    gateway's, curl's) between this check and the gateway's bind."""
    for _ in range(200):
        low = random.randrange(20_000, 32_000)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind((HOST, low))
                second.bind((HOST, low + 1))
        except OSError:
            continue
        return low
    raise AssertionError("no two free neighbouring ports")


def test_a_public_port_another_program_holds_is_passed_over(site: Site, tmp_path: Path) -> None:
    low = _two_free_ports()
    body = {"device_id": "kiosk", "port": site.web_port, "cidrs": [f"{HOST}/32"]}
    with socket.socket() as squatter:
        squatter.bind((HOST, low))
        squatter.listen()
        with (
            _gateway_with_ports(site, tmp_path, f"{low}-{low + 1}") as gateway,
            gateway.client(ADMIN) as api,
        ):
            opened = api.post("/v1/sessions", json=body)
            assert opened.status_code == 201, opened.text
            assert opened.json()["public_port"] == low + 1
            fetched = curl(f"http://{HOST}:{low + 1}/")
            assert fetched.stdout.encode() == PAGE, fetched.stderr
            # The held port is not tried again at once: nothing is left to offer.
            refused = api.post("/v1/sessions", json=body)
            assert refused.status_code == 409, refused.text
            assert "1 held by other programs" in refused.json()["detail"]
            found = api.get("/v1/sessions").json()["items"]
    by_port = {s["public_port"]: s for s in found}
    assert (by_port[low]["state"], by_port[low]["end_reason"]) == ("ended", "bind_failed")
    assert by_port[low + 1]["state"] == "open"


def test_when_every_public_port_is_held_the_api_says_which_and_why(
    site: Site, tmp_path: Path
) -> None:
    body = {"device_id": "kiosk", "port": site.web_port, "cidrs": [f"{HOST}/32"]}
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with (
            _gateway_with_ports(site, tmp_path, f"{taken}-{taken}") as gateway,
            gateway.client(ADMIN) as api,
        ):
            refused = api.post("/v1/sessions", json=body)
            assert refused.status_code == 409, refused.text
            assert f"public ports could not be bound: {taken} (" in refused.json()["detail"]
            [ended] = api.get("/v1/sessions").json()["items"]
    assert (ended["state"], ended["end_reason"]) == ("ended", "bind_failed")


def test_a_sessions_certificate_that_cannot_load_is_refused_not_promised(
    site: Site, tmp_path: Path
) -> None:
    gateway = Gateway(data_dir=tmp_path / "data", port=free_port(), env=base_env(
        FLEETGATE_ADMIN_TOKEN=ADMIN, FLEETGATE_SESSIONS__PORTS="21100-21199",
        FLEETGATE_SESSIONS__CERTIFICATE="not-a-certificate",
    )).start()  # fmt: skip
    try:
        with gateway.client(ADMIN) as api:
            password = {
                "id": "not-a-certificate", "kind": "password", "secret": "s3cret-s3cret",
                "public": {"username": "u"},
            }  # fmt: skip
            made = api.post("/v1/credentials", json=password)
            assert made.status_code == 201, made.text
            device = {"id": "kiosk", "addresses": [HOST]}
            assert api.post("/v1/devices", json=device).status_code == 201
            body = {"device_id": "kiosk", "port": 22, "cidrs": [f"{HOST}/32"], "tls": True}
            refused = api.post("/v1/sessions", json=body)
            assert refused.status_code == 409, refused.text
            assert "not-a-certificate is not a certificate" in refused.json()["detail"]
            [ended] = api.get("/v1/sessions").json()["items"]
        assert (ended["state"], ended["end_reason"]) == ("ended", "tls_failed")
    finally:
        gateway.stop()


# -- what ends a session besides its time ----------------------------------------------------------


def _send_banner(sock: socket.socket) -> int:
    """Our SSH banner, and sshd's key exchange back (so the banner went through): bytes sent."""
    banner = b"SSH-2.0-fleetgate-test\r\n"
    sock.sendall(banner)
    seen = b""
    while b"\n" not in seen:
        seen += sock.recv(1)  # the rest of sshd's banner line
    assert sock.recv(1), "sshd answered our banner with nothing"
    return len(banner)


def test_a_connection_cut_by_the_session_end_reports_what_it_relayed(site: Site) -> None:
    session = open_session(site, site.ssh_port, cidrs=[f"{HOST}/32"])
    with _held_connection(session["public_port"]) as sock:
        sent = _send_banner(sock)
        with site.api() as api:
            assert api.delete(f"/v1/sessions/{session['id']}").status_code == 200
        assert _cut(sock)
    closed = wait_for_event(site, session["id"], "CLOSED")
    assert closed["detail"]["reason"] == "cut: the session ended"
    assert closed["detail"]["up_bytes"] == sent
    assert closed["detail"]["down_bytes"] > len("SSH-2.0-")


def test_a_client_that_leaves_is_recorded_as_client_lost(site: Site) -> None:
    session = open_session(site, site.ssh_port, cidrs=[f"{HOST}/32"])
    sock = _held_connection(session["public_port"])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, as a client that went away
    closed = wait_for_event(site, session["id"], "CLOSED")
    assert closed["detail"]["reason"] == "client_lost", closed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "disabled"}, "device_disabled"),
        ({"addresses": ["127.0.0.2"]}, "device_address_removed"),
        ({"group": "default"}, "device_group_changed"),
        (None, "device_deleted"),
    ],
)
def test_a_device_change_ends_its_sessions_and_cuts_their_connections(
    site: Site, change: dict[str, Any] | None, reason: str
) -> None:
    device_id = f"kiosk-{reason}".replace("_", "-")
    with site.api() as api:
        device = {"id": device_id, "group": "lab", "addresses": [MORE_DEVICES[reason]]}
        made = api.post("/v1/devices", json=device)
        assert made.status_code == 201, made.text
        opened = api.post("/v1/sessions", json={
            "device_id": device_id, "port": site.ssh_port, "cidrs": [f"{HOST}/32"],
        })  # fmt: skip
        assert opened.status_code == 201, opened.text
    session = opened.json()
    site.gateway.wait_for("session.bound", lambda e: e["session"] == session["id"])
    with _held_connection(session["public_port"]) as sock:
        with site.api() as api:
            if change is None:
                gone = api.delete(f"/v1/devices/{device_id}")
            else:
                etag = api.get(f"/v1/devices/{device_id}").headers["ETag"]
                gone = api.patch(
                    f"/v1/devices/{device_id}", json=change, headers={"If-Match": etag}
                )
            assert gone.status_code in (200, 204), gone.text
        assert _cut(sock)
    site.gateway.wait_for(
        "session.unbound", lambda e: e["session"] == session["id"] and e["reason"] == reason
    )
    with site.api() as api:
        found = api.get(f"/v1/sessions/{session['id']}").json()
        audit = api.get("/v1/audit", params={"target_id": session["id"]}).json()["items"]
    assert (found["state"], found["end_reason"]) == ("ended", reason)
    ended = [e for e in events(site, session["id"]) if e["kind"] == "ENDED"]
    assert [e["detail"]["reason"] for e in ended] == [reason]
    assert "session.end" in [entry["action"] for entry in audit]


def test_a_group_refuses_session_ports_that_are_not_a_list_of_ports(site: Site) -> None:
    with site.api() as api:
        for bad in (22, [22, "ssh"], [0], [70000], [True], list(range(1, 300))):
            made = api.post("/v1/groups", json={"name": "bad", "settings": {"session_ports": bad}})
            assert made.status_code == 422, (bad, made.text)
            assert made.json()["errors"][0]["field"] == "settings.session_ports", made.text
        fine = api.post("/v1/groups", json={"name": "fine", "settings": {"session_ports": []}})
        assert fine.status_code == 201, fine.text
