"""A paho-mqtt client for tests: its callbacks feed events and a message queue the test
waits on, with a timeout, never a sleep."""

from __future__ import annotations

import queue
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT_S = 15.0
HOST = "127.0.0.1"
V311 = MQTTProtocolVersion.MQTTv311


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS device holds: the CA it trusts, and its own certificate and key (mtls)."""

    cafile: Path
    cert: Path | None = None
    key: Path | None = None


class Peer:
    """A paho client whose callbacks feed events and a message queue the test waits on."""

    def __init__(
        self,
        client_id: str,
        *,
        protocol: MQTTProtocolVersion = V311,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        tls: TlsFiles | ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        # A dropped client must stay dropped while the test looks (paho would reconnect).
        self.client.reconnect_delay_set(min_delay=120, max_delay=120)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        if isinstance(tls, ssl.SSLContext):
            self.client.tls_set_context(tls)
        elif tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.cafile),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
            )
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connack = reason_code
        self.connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.disconnected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.subacks.put(reason_codes)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def start(self, port: int, *, source: str) -> ReasonCode:
        """Connect from ``source`` and run the network loop; the CONNACK's reason code."""
        self.client.connect(HOST, port, keepalive=30, bind_address=source)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT_S), f"{self.client_id}: no CONNACK"
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str, qos: int) -> None:
        result, _ = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        [granted] = self.subacks.get(timeout=TIMEOUT_S)
        assert granted.value == qos, f"{self.client_id} subscribing to {topic}: {granted}"

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        """Publish and wait for the flow to complete (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT_S)
        assert info.is_published(), f"{self.client_id}: publish to {topic} not acknowledged"

    def next_message(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"{self.client_id} received nothing in {TIMEOUT_S}s") from None

    def pending(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of the messages received and not yet taken."""
        return [(m.topic, m.payload) for m in list(self.messages.queue)]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
