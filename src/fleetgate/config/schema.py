"""The configuration's shape. Every model is frozen and rejects unknown keys.

Names follow mosquitto's vocabulary where one exists; listeners are named tables
(``[listeners.sensors]``) in the EMQX style instead of depending on line order.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from fleetgate.errors import InvalidRequest
from fleetgate.sealing.secret import Secret
from fleetgate.templates import Template


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:8080"`` / ``"localhost:80"`` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{value!r}: inside brackets goes an IPv6 address, like [::1]:8080"
            ) from None
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, like [::1]:8080")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _check_address(value: str) -> str:
    split_host_port(value)
    return value


Address = Annotated[str, AfterValidator(_check_address)]


class ApiConfig(Frozen):
    listen: Address = "127.0.0.1:8080"
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    drain_timeout_s: float = Field(default=10.0, ge=0, le=600)


class LogConfig(Frozen):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class StoreConfig(Frozen):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    sqlite_path: str = "fleetgate.db"
    postgresql_dsn: Secret | None = None
    postgresql_pool_max: int = Field(default=10, ge=1, le=200)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)

    @model_validator(mode="before")
    @classmethod
    def _wrap_dsn(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("postgresql_dsn"), str):
            return {**data, "postgresql_dsn": Secret(data["postgresql_dsn"])}
        return data

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> StoreConfig:
        if self.backend == "postgresql" and self.postgresql_dsn is None:
            raise ValueError(
                "backend is postgresql but postgresql_dsn is not set; set store.postgresql_dsn "
                "(or FLEETGATE_STORE__POSTGRESQL_DSN) to postgresql://user:password@host:port/db"
            )
        return self


class SealingConfig(Frozen):
    master_key_file: str = "master.key"


class AlertConfig(Frozen):
    """Expiry alerts for every certificate and CRL fleetgate holds."""

    thresholds_days: tuple[float, ...] = (30.0, 7.0, 1.0)
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(default=8, ge=1, le=100)


class SessionsConfig(Frozen):
    """Remote access sessions: a public port, for a while, mapped to one device's port.

    Session listeners bind ``bind`` (the public address) on a port from ``ports``; the answer
    names ``public_host``. A group's ``settings.session_ports`` lists the device ports sessions
    may reach in it; groups without one use ``allowed_ports``.
    """

    bind: str = Field(default="127.0.0.1", description="the address session listeners bind")
    public_host: str | None = Field(
        default=None, description="the host name clients are told; default: bind"
    )
    ports: str = Field(default="20000-20999", pattern=r"^\d{1,5}-\d{1,5}$")
    default_duration_s: int = Field(default=3600, ge=60, le=28_800)
    max_duration_s: int = Field(default=28_800, ge=60, le=28_800)
    allowed_ports: tuple[int, ...] = (22, 80, 443, 3389, 5900)
    certificate: str = Field(
        default="sessions-server",
        description="credential holding the certificate tls sessions present; issued by "
        "fleetgate's CA for server_names when missing (or import your own under this id)",
    )
    server_names: tuple[str, ...] = Field(
        default=("localhost", "127.0.0.1"),
        description="names on the certificate fleetgate issues for tls sessions",
    )
    event_retention_days: int = Field(default=90, ge=1, le=3650)

    @property
    def port_range(self) -> range:
        low, high = (int(p) for p in self.ports.split("-"))
        return range(low, high + 1)

    @model_validator(mode="after")
    def _coherent(self) -> SessionsConfig:
        low, high = (int(p) for p in self.ports.split("-"))
        if not 1 <= low <= high <= 65535:
            raise ValueError("ports: LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
        if self.default_duration_s > self.max_duration_s:
            raise ValueError("default_duration_s is above max_duration_s")
        if any(not 1 <= p <= 65535 for p in self.allowed_ports):
            raise ValueError("allowed_ports: port numbers 1-65535")
        return self


class PkiConfig(Frozen):
    """The built-in CA: algorithms, lifetimes, revocation publishing, renewal."""

    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/]+$",
        description="Base URL of /pki/… as devices and relying parties reach it",
    )
    key_algorithm: Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"] = (
        "ec-p256"
    )
    root_lifetime_days: int = Field(default=7300, ge=365, le=36500)
    issuing_lifetime_days: int = Field(default=1825, ge=30, le=36500)
    device_lifetime_days: int = Field(default=365, ge=1, le=3650)
    server_lifetime_days: int = Field(default=90, ge=1, le=825)
    ocsp_responder_lifetime_days: int = Field(default=30, ge=1, le=365)
    crl_lifetime_s: int = Field(default=7 * 86400, ge=600, le=90 * 86400)
    crl_refresh_fraction: float = Field(default=0.5, gt=0, lt=1)
    ocsp_validity_s: int = Field(default=3600, ge=60, le=7 * 86400)
    renew_at_fraction: float = Field(default=0.6667, gt=0, lt=1)
    maintenance_interval_s: float = Field(default=60.0, ge=1, le=3600)
    device_dns_templates: tuple[str, ...] = ()
    device_uri_templates: tuple[str, ...] = ()
    alerts: AlertConfig = AlertConfig()


Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
ListenerName = Name
DestinationName = Name
UNIQUE_USERNAME_FIELDS = ("device_id", "imsi", "imei", "iccid", "serial")


def _parse_template(text: str) -> None:
    try:
        Template.parse(text)
    except InvalidRequest as exc:
        raise ValueError(exc.detail) from None


class DestinationConfig(Frozen):
    """Where a route goes and how fleetgate authenticates it and itself there.

    The destination's server is verified (CA bundle or system roots, hostname, optional SPKI
    pin, minimum version) with the gateway's clock; the device's own credential, found through
    the ``credential`` template, is presented as the client certificate.
    """

    address: Address
    server_name: str | None = Field(
        default=None, description="SNI and the name checked; default: the host of address"
    )
    ca_file: str | None = Field(default=None, description="PEM bundle; default: system roots")
    pin_sha256: tuple[str, ...] = Field(
        default=(), description="base64 SHA-256 of a SubjectPublicKeyInfo in the verified chain"
    )
    min_tls: Literal["1.2", "1.3"] = "1.2"
    alpn: tuple[str, ...] = ()
    credential: str | None = Field(
        default=None, description="template naming the device's x509 credential: aws-#{imsi}"
    )
    default_credential: str | None = None
    login_credential: str | None = Field(
        default=None,
        description="template naming a password credential injected as MQTT username/password "
        "or HTTP basic auth",
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    response_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="http/udp: time for the answer to start; mqtt: for the CONNACK",
    )
    session_resumption: bool = True
    unsafe_plaintext: bool = Field(
        default=False, description="speak plain TCP to the destination: no TLS at all"
    )
    # tcp
    proxy_protocol: bool = False
    # http and udp
    signing_credential: str | None = Field(
        default=None, description="hmac credential signing each request (X-Fleetgate-Signature)"
    )
    identity_headers: tuple[str, ...] = Field(
        default=(), description="device attributes passed as X-Fleetgate-Attr-<name> headers"
    )
    udp_path: str = Field(default="/", pattern=r"^/")
    # mqtt
    client_id: str | None = Field(default=None, description="template: #{device_id}")
    topic_mount: str | None = Field(
        default=None, description="template prefixed to every topic: devices/#{device_id}/"
    )

    @field_validator("topic_mount")
    @classmethod
    def _mount_is_a_level(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith("/") or value.startswith("$")):
            raise ValueError(
                f"{value!r}: a topic mount ends with '/' and does not start with '$' "
                "(devices/#{device_id}/), so one device's topics never overlap another's"
            )
        return value

    @field_validator("pin_sha256")
    @classmethod
    def _pins_are_sha256(cls, pins: tuple[str, ...]) -> tuple[str, ...]:
        for pin in pins:
            try:
                raw = base64.b64decode(pin, validate=True)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"{pin[:60]!r} is not a base64 SHA-256 digest (44 characters)")
        return pins

    @field_validator(
        "credential",
        "default_credential",
        "login_credential",
        "client_id",
        "topic_mount",
        "signing_credential",
    )
    @classmethod
    def _templates_parse(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_template(value)
        return value


class ListenerTlsConfig(Frozen):
    """TLS towards the devices (``[listeners.<name>.tls]``).

    ``tls`` authenticates the gateway to the device; ``mtls`` also requires a client
    certificate chaining to a CA in the store (fleetgate's own, or one trusted with
    ``fleetgate ca trust``), checked against fleetgate's CRLs at the handshake and against the
    store for as long as the connection lives. ``psk`` authenticates both sides with the
    device's pre-shared key (a ``psk`` credential bound to the device; TLS 1.3 external PSK or
    the TLS 1.2 PSK suites): no certificates at all.

    The server certificate is the store credential ``certificate`` (default
    ``listener-<name>``), issued by fleetgate's CA on first start for ``server_names`` and renewed
    by fleetgate; or ``cert_file``/``key_file``, read again on reload.
    """

    mode: Literal["tls", "mtls", "psk"]
    certificate: str | None = Field(
        default=None, description="credential holding the server certificate: listener-<name>"
    )
    server_names: tuple[str, ...] = Field(
        default=("localhost",), description="DNS names / IP addresses of an issued certificate"
    )
    cert_file: str | None = Field(default=None, description="PEM chain, leaf first")
    key_file: str | None = None
    min_tls: Literal["1.2", "1.3"] = "1.2"
    handshake_timeout_s: float = Field(default=10.0, gt=0, le=300)
    device_name_from: Literal["cn", "san_dns", "san_uri", "email"] = Field(
        default="cn", description="mtls: the certificate field naming the device"
    )
    psk_identity_hint: str | None = Field(
        default=None, max_length=128, description="psk: the hint sent to devices (TLS 1.2)"
    )

    @model_validator(mode="after")
    def _files_come_in_pairs(self) -> ListenerTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.certificate is not None:
            raise ValueError("set certificate (a store credential) or cert_file/key_file, not both")
        if not self.server_names:
            raise ValueError("server_names: at least one name")
        return self


class ListenerConfig(Frozen):
    """A device-facing entry point.

    ``tcp`` relays bytes, ``mqtt`` speaks MQTT 3.1.1/5.0 to the device, ``http`` HTTP/1.1,
    ``udp`` turns each datagram into an HTTPS POST. The destination is the device's route for
    this listener (device routes, then its group's ``settings.routes``), else ``destination``.
    ``forward_to`` is a plain-TCP destination (tcp only), kept for simple internal relays.
    """

    protocol: Literal["tcp", "mqtt", "http", "udp"] = "tcp"
    bind: Address
    destination: DestinationName | None = None
    forward_to: Address | None = None
    identity: Literal["source_address", "username", "certificate", "psk"] = "source_address"
    username_field: str = Field(
        default="device_id",
        description="what a username names: device_id or a unique attribute (imsi, imei, ...)",
    )
    password_credential: str | None = Field(
        default=None,
        description="template naming the password credential a device logs in with: "
        "login-#{device_id}",
    )
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    max_per_source: int | None = Field(
        default=None, ge=1, description="connections one source address may hold at once"
    )
    max_per_device: int | None = Field(
        default=None, ge=1, description="connections one device may hold at once"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    idle_timeout_s: float = Field(default=3600.0, gt=0)
    first_packet_timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_packet_bytes: int = Field(default=1_048_576, ge=1024, le=268_435_455)
    max_header_bytes: int = Field(default=16_384, ge=1024, le=1_048_576)
    max_body_bytes: int = Field(default=1_048_576, ge=0, le=1 << 30)
    max_in_flight: int = Field(default=1000, ge=1, le=100_000)
    tls: ListenerTlsConfig | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ListenerConfig:
        if self.tls is not None and self.protocol == "udp":
            raise ValueError("tls is for stream listeners (tcp, mqtt, http); udp has no TLS here")
        if self.identity == "certificate" and (self.tls is None or self.tls.mode != "mtls"):
            raise ValueError("identity = certificate needs [tls] mode = mtls")
        if (self.identity == "psk") != (self.tls is not None and self.tls.mode == "psk"):
            raise ValueError("identity = psk and [tls] mode = psk go together")
        if self.forward_to is not None and self.protocol != "tcp":
            raise ValueError("forward_to is for tcp listeners; use destination for this protocol")
        if self.forward_to is not None and self.destination is not None:
            raise ValueError("set destination or forward_to, not both")
        if self.identity == "username":
            if self.protocol not in ("mqtt", "http"):
                raise ValueError("identity = username needs protocol mqtt or http")
            if self.password_credential is None:
                raise ValueError(
                    "identity = username needs password_credential (for example "
                    '"login-#{device_id}"): the credential each device logs in with'
                )
            _parse_template(self.password_credential)
            if self.username_field not in UNIQUE_USERNAME_FIELDS:
                raise ValueError(f"username_field is one of {', '.join(UNIQUE_USERNAME_FIELDS)}")
        return self


class NodeConfig(Frozen):
    name: str = Field(default="fleetgate-1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="processes serving the listeners (SO_REUSEPORT); the first also runs the API",
    )
    worker_affinity: Literal["source_address", "connection"] = Field(
        default="source_address",
        description="with several workers: a device's connections go to one process chosen by "
        "its source address (warm caches and TLS sessions), or anywhere (connection)",
    )


class Config(Frozen):
    node: NodeConfig = NodeConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    sealing: SealingConfig = SealingConfig()
    pki: PkiConfig = PkiConfig()
    sessions: SessionsConfig = SessionsConfig()
    destinations: dict[DestinationName, DestinationConfig] = {}
    listeners: dict[ListenerName, ListenerConfig] = {}

    @model_validator(mode="after")
    def _listeners_reach_destinations(self) -> Config:
        for name, listener in self.listeners.items():
            if listener.destination is not None and listener.destination not in self.destinations:
                raise ValueError(
                    f"listeners.{name}.destination: no [destinations.{listener.destination}]"
                )
        return self
