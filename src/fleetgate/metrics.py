"""Prometheus instruments, in a registry per process (tests build their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from fleetgate import __version__


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        Info("fleetgate_build", "fleetgate version", registry=self.registry).info(
            {"version": __version__}
        )
        self.http_requests = Counter(
            "fleetgate_http_requests",
            "API requests by route template, method and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "fleetgate_http_request_duration_seconds",
            "API request duration",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.devices = Gauge(
            "fleetgate_devices", "Registered devices by status", ["status"], registry=self.registry
        )
        self.store_up = Gauge(
            "fleetgate_store_up", "1 when the last store check succeeded", registry=self.registry
        )
        self.listener_up = Gauge(
            "fleetgate_listener_up",
            "1 while a listener is bound",
            ["listener"],
            registry=self.registry,
        )
        self.listener_connections = Counter(
            "fleetgate_listener_connections",
            "Accepted device connections by listener and outcome",
            ["listener", "outcome"],
            registry=self.registry,
        )
        self.listener_active = Gauge(
            "fleetgate_listener_active_connections",
            "Device connections being relayed now",
            ["listener"],
            registry=self.registry,
        )
        self.listener_bytes = Counter(
            "fleetgate_listener_relayed_bytes",
            "Bytes relayed by listener and direction (up: device to destination)",
            ["listener", "direction"],
            registry=self.registry,
        )
        self.listener_relays = Counter(
            "fleetgate_listener_relays",
            "Relayed connections that ended, by listener and what relayed them (core: the tunnel "
            "core in C, compiled: the compiled relay on asyncio transports, python)",
            ["listener", "relay"],
            registry=self.registry,
        )
        self.not_after = Gauge(
            "fleetgate_certificate_not_after_timestamp_seconds",
            "End of validity of every certificate fleetgate issued or holds (kind: certificate, "
            "imported, ca) and of every CRL (kind: crl, its nextUpdate); certificates fleetgate "
            "renews by itself appear only once their renewal is overdue",
            ["kind", "id", "subject", "device", "credential", "auto_renew"],
            registry=self.registry,
        )
        self.renewing = Gauge(
            "fleetgate_certificates_renewing_on_time",
            "Certificates fleetgate renews by itself whose renewal is on schedule (not listed "
            "one by one in fleetgate_certificate_not_after_timestamp_seconds)",
            registry=self.registry,
        )
        self.renewals_overdue = Gauge(
            "fleetgate_certificate_renewals_overdue",
            "Certificates fleetgate renews by itself whose renewal is overdue (failing); each is "
            "listed in fleetgate_certificate_not_after_timestamp_seconds",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "fleetgate_config_reloads",
            "Configuration reloads by result",
            ["result"],
            registry=self.registry,
        )
