"""Simulated sensors: real paho-mqtt clients (1.6 or 2.x, 3.1.1 or 5.0) with X.509 certificates, for tests and
the demo. Everything they observe is recorded (received messages, acknowledgement reason codes, disconnects).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

try:  # paho-mqtt 2.x
    from paho.mqtt.enums import CallbackAPIVersion

    PAHO2 = True
except ImportError:  # paho-mqtt 1.6
    PAHO2 = False


def _code(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else 0


@dataclass
class Sensor:
    client_id: str
    port: int
    ca_file: Path | None  # None: plain MQTT, no TLS (the gateway's loopback or unix listeners)
    cert_file: Path | None = None
    key_file: Path | None = None
    mqtt5: bool = False
    host: str = "127.0.0.1"
    will: tuple[str, bytes, int] | None = None
    clean: bool = True
    received: list[tuple[str, bytes, int]] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)  # mid -> reason code (0 for 3.1.1)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    connack: int | None = None
    disconnects: list[int] = field(default_factory=list)
    keepalive: int = 30
    session_expiry: int | None = None  # 5.0; default: 0 with clean, else 600
    will_delay: int = 0  # 5.0 Will Delay Interval (s)
    session_present: bool | None = None
    connack_properties: dict[str, Any] = field(default_factory=dict)  # 5.0, by paho's property names

    def __post_init__(self) -> None:
        protocol = paho.MQTTv5 if self.mqtt5 else paho.MQTTv311
        kw: dict[str, Any] = {"client_id": self.client_id, "protocol": protocol}
        if not self.mqtt5:
            kw["clean_session"] = self.clean
        if PAHO2:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, **kw)
        else:
            self.client = paho.Client(**kw)
        if self.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            if self.cert_file is not None and self.key_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            self.client.tls_set_context(ctx)
        if self.will is not None:
            will_props = None
            if self.mqtt5 and self.will_delay:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
                will_props.WillDelayInterval = self.will_delay
            self.client.will_set(self.will[0], self.will[1], qos=self.will[2], properties=will_props)
        self._lock = threading.Lock()
        c = self.client
        c.on_connect = self._on_connect
        c.on_message = lambda cl, ud, msg: self.received.append((msg.topic, bytes(msg.payload), msg.qos))
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
        self.connack = _code(rc)
        present = getattr(flags, "session_present", None)  # 2.x: ConnectFlags; 1.6: a dict
        self.session_present = bool(flags.get("session present") if isinstance(flags, dict) else present)
        props = rest[0] if rest else None
        if props is not None:
            self.connack_properties = {k: v for k, v in vars(props).items() if k[:1].isupper()}

    def _on_publish(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        self.acks[mid] = _code(rest[0]) if PAHO2 and rest else 0

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, granted: Any, *rest: Any) -> None:
        self.subacks[mid] = [_code(g) for g in granted]

    def _on_disconnect(self, client: Any, userdata: Any, *args: Any) -> None:
        rc = args[1] if PAHO2 else args[0]  # 2.x: (flags, reason, properties); 1.6: (rc,) or (rc, properties)
        self.disconnects.append(_code(rc))

    def _guard_network_thread(self) -> None:
        """paho-mqtt 1.6's network thread dies on ssl.SSLEOFError when the server closes the connection in the
        middle of a write (the gateway disconnecting an oversized publisher while paho still sends it): a
        bug of the library, which then reports nothing. Recorded here as what it is, a lost connection
        (paho's MQTT_ERR_CONN_LOST, 7, what 1.6 reports for a server's DISCONNECT too)."""
        run = self.client._thread_main

        def guarded() -> None:
            try:
                run()
            except (ssl.SSLError, OSError):
                self.disconnects.append(7)

        self.client._thread_main = guarded  # type: ignore[method-assign]

    def connect(self, timeout: float = 10) -> int:
        """Connect and wait for CONNACK; returns its code (raises on TLS failure)."""
        kw: dict[str, Any] = {}
        if self.mqtt5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            expiry = self.session_expiry
            props.SessionExpiryInterval = expiry if expiry is not None else 0 if self.clean else 600
            kw = {"clean_start": self.clean, "properties": props}
        self.client.connect(self.host, self.port, self.keepalive, **kw)
        self._guard_network_thread()
        self.client.loop_start()
        wait_until(lambda: self.connack is not None or bool(self.disconnects), timeout, "CONNACK")
        return self.connack if self.connack is not None else -1

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10) -> int:
        """Publish and, for QoS > 0, wait for the acknowledgement; returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            return 0
        wait_until(lambda: info.mid in self.acks, timeout, f"acknowledgement of {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10) -> list[int]:
        _rc, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        wait_until(lambda: mid in self.subacks, timeout, f"SUBACK for {topic_filter}")
        return self.subacks[mid]

    def subscribe_many(self, topic_filters: list[str], qos: int = 1, timeout: float = 10) -> list[int]:
        """One SUBSCRIBE with several filters; the SUBACK's codes."""
        _rc, mid = self.client.subscribe([(f, qos) for f in topic_filters])
        assert mid is not None
        wait_until(lambda: mid in self.subacks, timeout, f"SUBACK for {len(topic_filters)} filters")
        return self.subacks[mid]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def disconnect_with_expiry(self, session_expiry: int) -> None:
        """5.0: DISCONNECT carrying a new Session Expiry Interval (section 3.14.2.2.2)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        self.client.disconnect(properties=props)
        self.client.loop_stop()

    def kill(self) -> None:
        """End the connection without DISCONNECT, as a sensor that loses power: no reconnect either."""
        self.client.loop_stop()  # paho's thread would reconnect
        sock: Any = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def go_silent(self) -> None:
        """Stop sending anything (no PINGREQ) but keep the connection open: a hung sensor."""
        self.client.loop_stop()


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.02)
