"""A failure of ours while handling one sensor's connection closes that connection only, with a reason code
and a SENSOR_CONNECTION_FAILED journal line, and never leaves the stored session half-made (issue 14).

The broker runs in process on real sockets (127.0.0.1); the sensors are raw MQTT byte streams, so each test
controls exactly what arrives when. Faults are injected through data the broker really holds (a stored
message it cannot encode) and through the forwarder's place (a stand-in for the forwarder that raises): the
broker's own code is never replaced.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.core.config import Config, validate
from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Prop,
    Properties,
    Puback,
    Publish,
    Subscription,
    Will,
)
from gatewayd.core.mqtt.session import Outbound, SessionState
from gatewayd.service.downstream.broker import Broker, StoredSession


def _config(tmp_path: Path) -> Config:
    doc = {
        "gateway": {"thing_name": "gw-failures", "state_dir": str(tmp_path / "state")},
        "upstream": {"endpoint": "standin-ats.iot.local.gatewayd.test"},
        "downstream": {
            "listener": [{"address": "127.0.0.1", "port": 1, "tls": False, "require_client_cert": False}],
            "policy": {"publish": ["sensors/${iot:ClientId}/#"], "subscribe": ["commands/#"]},
        },
    }
    return validate(doc, {}, str(tmp_path / "gatewayd.toml"))


class RaisingForwarder:
    """In the forwarder's place: takes QoS 1 messages like the forwarder, but raises for one topic."""

    def __init__(self, bad_topic: str) -> None:
        self.bad_topic = bad_topic
        self.forwarded: list[str] = []

    def forward(
        self,
        sensor: str,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        done: Callable[[int], None] | None,
    ) -> int | None:
        if topic.endswith(self.bad_topic):
            raise RuntimeError("injected fault")
        self.forwarded.append(topic)
        return 0

    async def room(self) -> None:
        return None

    accepting = True

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def unsubscribe(self, topic_filter: str) -> None:
        pass


class RawSensor:
    """A sensor as a byte stream on a real socket (blocking calls run in a thread)."""

    def __init__(self, port: int, version: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.version = version
        self.decoder = Decoder(version)
        self.packets: list[Packet] = []
        self.closed = False

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, self.version) for p in packets))

    def read_until(self, count: int) -> list[Packet]:
        """Packets received until `count` in all, or the server closed the connection."""
        while len(self.packets) < count and not self.closed:
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
            self.packets += self.decoder.feed(data)
        return self.packets

    def close(self) -> None:
        self.sock.close()


async def _serve(broker: Broker, body: Callable[[int], Any]) -> None:
    server = await asyncio.start_server(lambda r, w: broker.serve(r, w, "test"), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await body(port)
    finally:
        server.close()
        for client_id in list(broker.clients):
            broker.disconnect(client_id)
        await asyncio.sleep(0.1)


def _failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if getattr(r, "message_id", None) == logevents.SENSOR_CONNECTION_FAILED.id
    ]


def test_a_failed_connect_leaves_the_stored_session_exactly_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """s1's persistent session holds a message the broker cannot encode (the fault): its CONNECT is refused
    with 3.1.1 return code 3 (server unavailable: try again), the stored session is the same object with
    the same contents and expiry, s1 is not connected, and s2, connected before, goes on publishing."""
    broker = Broker(_config(tmp_path), None)
    state = SessionState("s1", expiry_interval=600)
    state.subscriptions["commands/s1/#"] = Subscription("commands/s1/#", 1)
    poison = Outbound("commands/s1/\ud800", b"cannot be encoded", 1, False, Properties())
    state.queued.append(poison)
    state.queued_bytes = len(poison.payload)
    expires = time.monotonic() + 3600
    stored = StoredSession(state, expires_at=expires)
    broker.sessions["s1"] = stored
    snapshot = (dict(state.subscriptions), list(state.queued), dict(state.inflight), state.next_id)
    caplog.set_level(logging.INFO, logger="gatewayd.broker")

    async def body(port: int) -> None:
        s2 = await asyncio.to_thread(RawSensor, port, MQTT_5)
        s2.send(Connect("s2", MQTT_5))
        assert isinstance((await asyncio.to_thread(s2.read_until, 1))[0], Connack)
        s1 = await asyncio.to_thread(RawSensor, port, MQTT_311)
        s1.send(
            Connect("s1", MQTT_311, clean_start=False), Publish("sensors/s1/t", b"behind", 1, packet_id=1)
        )
        answers = await asyncio.to_thread(s1.read_until, 5)
        assert answers == [Connack(False, 3)] and s1.closed
        s2.send(Publish("sensors/s2/t", b"still here", 1, packet_id=7))
        assert (await asyncio.to_thread(s2.read_until, 2))[1] == Puback(7)
        s1.close()
        s2.close()

    asyncio.run(_serve(broker, body))
    assert broker.sessions["s1"] is stored and stored.state is state and stored.expires_at == expires
    assert (dict(state.subscriptions), list(state.queued), dict(state.inflight), state.next_id) == snapshot
    assert "s1" not in broker.clients
    (failure,) = _failures(caplog)
    assert failure.fields["client_id"] == "s1" and failure.fields["reason"] == "0x80"  # type: ignore[attr-defined]
    assert failure.exc_info is not None  # the journal entry carries the traceback
    assert "Task exception was never retrieved" not in caplog.text


def test_a_failure_while_handling_a_publish_closes_that_connection_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Handling one of s3's publishes fails: s3 gets DISCONNECT 0x80 and its will is published; its
    persistent session is kept and set to expire (never left connected or immortal); s4 is unaffected."""
    forwarder = RaisingForwarder("/boom")
    broker = Broker(_config(tmp_path), forwarder)
    caplog.set_level(logging.INFO, logger="gatewayd.broker")

    async def body(port: int) -> None:
        s4 = await asyncio.to_thread(RawSensor, port, MQTT_311)
        s4.send(Connect("s4", MQTT_311))
        await asyncio.to_thread(s4.read_until, 1)
        s3 = await asyncio.to_thread(RawSensor, port, MQTT_5)
        expiry = Properties.of([(Prop.SESSION_EXPIRY_INTERVAL, 300)])
        s3.send(
            Connect(
                "s3", MQTT_5, clean_start=False, properties=expiry, will=Will("sensors/s3/status", b"gone", 1)
            ),
            Publish("sensors/s3/ok", b"1", 1, packet_id=1),
            Publish("sensors/s3/boom", b"2", 1, packet_id=2),
        )
        answers = await asyncio.to_thread(s3.read_until, 4)
        assert answers[:2] == [Connack(False, 0, answers[0].properties), Puback(1)]  # type: ignore[union-attr]
        assert answers[2:] == [Disconnect(0x80)] and s3.closed
        s4.send(Publish("sensors/s4/t", b"x", 1, packet_id=3))
        assert (await asyncio.to_thread(s4.read_until, 2))[1] == Puback(3)
        s3.close()
        s4.close()

    asyncio.run(_serve(broker, body))
    assert "s3" not in broker.clients
    assert broker.sessions["s3"].expires_at is not None  # it will expire like any disconnected session
    assert "gw-failures/sensors/s3/status" in forwarder.forwarded  # the will went upstream
    (failure,) = _failures(caplog)
    assert failure.fields["client_id"] == "s3"  # type: ignore[attr-defined]


def test_a_will_that_cannot_be_published_is_logged_and_the_session_still_expires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing s5's will fails when its connection is lost: logged with SENSOR_CONNECTION_FAILED, and the
    persistent session is set to expire all the same (it was settled before the will)."""
    broker = Broker(_config(tmp_path), RaisingForwarder("/boom"))
    caplog.set_level(logging.INFO, logger="gatewayd.broker")

    async def body(port: int) -> None:
        s5 = await asyncio.to_thread(RawSensor, port, MQTT_311)
        s5.send(Connect("s5", MQTT_311, clean_start=False, will=Will("sensors/s5/boom", b"gone", 1)))
        await asyncio.to_thread(s5.read_until, 1)
        s5.close()  # no DISCONNECT: the will is due
        for _ in range(100):
            if "s5" not in broker.clients:
                break
            await asyncio.sleep(0.02)

    asyncio.run(_serve(broker, body))
    assert "s5" not in broker.clients and broker.sessions["s5"].expires_at is not None
    (failure,) = _failures(caplog)
    assert failure.fields["client_id"] == "s5" and "injected fault" in failure.fields["error"]  # type: ignore[attr-defined]
