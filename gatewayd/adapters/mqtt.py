"""The upstream MQTT client (paho-mqtt), the same on paho 1.6 (bookworm) and 2.x (trixie, PyPI).

Driven from an external select() loop (paho's socket()/loop_read()/loop_write()/loop_misc() API, present in
both), so every paho call and callback runs on one thread: the owner's. Callbacks only record events in
`self.events`; the owner drains them. Nothing here keeps state beyond paho's own.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

try:  # paho-mqtt 2.x: callbacks are chosen by API version
    from paho.mqtt.enums import CallbackAPIVersion

    PAHO2 = True
except ImportError:  # paho-mqtt 1.6 (Debian bookworm)
    PAHO2 = False


@dataclass(frozen=True)
class Event:
    kind: str  # "connack", "disconnect", "puback", "suback", "message"
    code: int = 0
    mid: int = 0
    detail: str = ""
    codes: tuple[int, ...] = ()
    message: Any = None


def _code(rc: Any) -> int:
    """paho 2.x passes ReasonCode objects, 1.6 plain ints; both become ints."""
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else 0


class _Client(paho.Client):
    """A paho client that can connect to an address other than the name it verifies (TLS SNI/hostname), and
    that gathers what paho sends into one buffer, written by flush_out() once per pass of the owner's loop:
    paho sends every packet with its own send() (one TLS record and one system call per PUBLISH; measured:
    a fifth of the uplink process's CPU per message). `_sock_send(buf)` is the one place both paho 1.6 and
    2.x write to the socket, with the same contract (returns the bytes taken)."""

    connect_address: str | None = None
    _outbuf: bytearray | None = None

    def _create_socket_connection(self) -> socket.socket:
        self._outbuf = bytearray()  # a new connection: nothing of the last one is sent on it
        if not self.connect_address:
            return super()._create_socket_connection()
        return socket.create_connection((self.connect_address, self._port), timeout=self._connect_timeout)

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._outbuf is None:
            return int(super()._sock_send(buf))
        self._outbuf += buf
        if buf[:1] == b"\xe0":  # DISCONNECT: paho closes the socket as soon as it believes it sent it
            self.flush_out()
        return len(buf)

    def flush_out(self) -> None:
        """Write what was gathered, as much as the socket takes now (the rest waits for writability)."""
        out, sock = self._outbuf, self._sock
        if not out or sock is None:
            return
        try:
            while out:
                sent = sock.send(out[:262144])
                if sent <= 0:
                    break
                del out[:sent]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            pass

    def out_pending(self) -> bool:
        return bool(self._outbuf)


class UpstreamClient:
    def __init__(
        self, client_id: str, context: ssl.SSLContext, connect_address: str = "", max_inflight: int = 100
    ) -> None:
        if PAHO2:
            self.client = _Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=paho.MQTTv311
            )
        else:
            self.client = _Client(client_id=client_id, clean_session=True, protocol=paho.MQTTv311)
        self.client.connect_address = connect_address or None
        self.client.tls_set_context(context)
        self.client.max_inflight_messages_set(max_inflight)  # upstream.quota.max_inflight (AWS IoT: 100)
        self.client.max_queued_messages_set(0)
        self.events: deque[Event] = deque()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    # callbacks: both API versions, positional arguments normalised
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
        code = _code(rc)
        self.events.append(Event("connack", code=code, detail=paho.connack_string(code)))

    def _on_disconnect(self, client: Any, userdata: Any, *args: Any) -> None:
        rc = args[1] if PAHO2 else args[0]
        self.events.append(Event("disconnect", code=_code(rc)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        self.events.append(Event("puback", mid=mid))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, granted: Any, *rest: Any) -> None:
        self.events.append(Event("suback", mid=mid, codes=tuple(_code(g) for g in granted)))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.events.append(Event("message", message=msg))

    # operations
    def connect(self, host: str, port: int, keepalive: int) -> None:
        """TCP + TLS handshake + CONNECT sent (blocking). CONNACK arrives later as an event."""
        self.client.connect(host, port, keepalive)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> tuple[int, int]:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc, info.mid

    def subscribe(self, filters: list[tuple[str, int]]) -> tuple[int, int]:
        rc, mid = self.client.subscribe(filters)
        return rc, mid if mid is not None else 0

    def unsubscribe(self, filters: list[str]) -> tuple[int, int]:
        rc, mid = self.client.unsubscribe(filters)
        return rc, mid if mid is not None else 0

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.flush_out()

    # the external loop's hooks
    def socket(self) -> Any:
        return self.client.socket()

    def want_write(self) -> bool:
        return bool(self.client.want_write()) or self.client.out_pending()

    def pending(self) -> int:
        sock = self.client.socket()
        return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0

    def loop_read(self, max_packets: int = 1) -> int:
        return int(self.client.loop_read(max_packets))

    def loop_write(self) -> int:
        rc = int(self.client.loop_write())
        self.client.flush_out()
        return rc

    def loop_misc(self) -> int:
        """paho's timers (keepalive), then everything gathered in this pass goes out in one write."""
        rc = int(self.client.loop_misc())
        self.client.flush_out()
        return rc
