"""The configuration's shape. Every model is frozen and rejects unknown keys.

Names follow mosquitto's vocabulary where one exists; listeners are named tables
(``[listeners.sensors]``) in the EMQX style instead of depending on line order.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from fleetgate.sealing.secret import Secret


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


class ListenerConfig(Frozen):
    """A device-facing entry point. Plain TCP relays to ``forward_to`` for registered devices."""

    protocol: Literal["tcp"] = "tcp"
    bind: Address
    forward_to: Address
    identity: Literal["source_address"] = "source_address"
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    idle_timeout_s: float = Field(default=3600.0, gt=0)


ListenerName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]


class NodeConfig(Frozen):
    name: str = Field(default="fleetgate-1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Config(Frozen):
    node: NodeConfig = NodeConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    sealing: SealingConfig = SealingConfig()
    pki: PkiConfig = PkiConfig()
    listeners: dict[ListenerName, ListenerConfig] = {}
