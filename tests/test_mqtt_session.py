"""The server-side connection state machine, driven with real encoded packets; time is passed in."""

from __future__ import annotations

import pytest

from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Prop,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Will,
)
from gatewayd.core.mqtt.session import (
    Closed,
    ConnectRequest,
    Limits,
    MessageReceived,
    ServerConnection,
    SessionState,
)


class Client:
    """The sensor side: encodes what it sends, decodes what the server answered."""

    def __init__(self, version: int, limits: Limits | None = None, **connect: object) -> None:
        self.version = version
        self.conn = ServerConnection(0.0, limits or Limits())
        self.decoder = Decoder(version, max_packet_size=1 << 20)
        self.events = self.send(Connect("s1", version, **connect))  # type: ignore[arg-type]

    def send(self, packet: Packet, now: float = 1.0) -> list[object]:
        return list(self.conn.receive(encode(packet, self.version), now))

    def received(self) -> list[Packet]:
        return self.decoder.feed(self.conn.data_to_send())

    def accept(self, session: SessionState | None = None, present: bool = False) -> list[Packet]:
        self.conn.accept_connect(session or SessionState("s1"), present)
        return self.received()


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_connect_and_ping(version: int) -> None:
    c = Client(version)
    assert isinstance(c.events[0], ConnectRequest)
    (connack,) = c.accept()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    if version == MQTT_5:
        assert connack.properties.get(Prop.RECEIVE_MAXIMUM) == 100
        assert connack.properties.get(Prop.TOPIC_ALIAS_MAXIMUM) == 16
        assert connack.properties.get(Prop.MAXIMUM_PACKET_SIZE) == 128 * 1024
    c.send(Pingreq())
    assert c.received() == [Pingresp()]


@pytest.mark.parametrize(("version", "code"), [(MQTT_311, 5), (MQTT_5, 0x87)])
def test_refused_connect(version: int, code: int) -> None:
    c = Client(version)
    closed = c.conn.reject_connect(0x87, "not in the registry")
    assert c.received() == [Connack(False, code)]
    assert closed.reason == 0x87 and closed.will is None and c.conn.closed


def test_first_packet_must_be_connect() -> None:
    conn = ServerConnection(0.0)
    (closed,) = conn.receive(encode(Pingreq(), MQTT_311), 0.1)
    assert isinstance(closed, Closed) and closed.reason == 0x82


@pytest.mark.parametrize(("version", "wire"), [(MQTT_311, 0), (MQTT_5, 0x87)])
def test_qos1_in_acked_with_reason(version: int, wire: int) -> None:
    c = Client(version)
    c.accept()
    (event,) = c.send(Publish("sensors/s1/t", b"1", 1, packet_id=7))
    assert isinstance(event, MessageReceived) and event.publish.topic == "sensors/s1/t"
    c.conn.ack_message(event.token, 0x87)  # denied by policy
    assert c.received() == [Puback(7, wire)]


def test_qos2_in_exactly_once() -> None:
    c = Client(MQTT_5)
    c.accept()
    (event,) = c.send(Publish("t", b"x", 2, packet_id=9))
    c.conn.ack_message(event.token)  # type: ignore[attr-defined]
    assert c.received() == [Pubrec(9)]
    assert c.send(Publish("t", b"x", 2, dup=True, packet_id=9)) == []  # a resend is not delivered again
    assert c.received() == [Pubrec(9)]
    c.send(Pubrel(9))
    assert c.received() == [Pubcomp(9)]
    assert isinstance(c.send(Publish("t", b"y", 2, packet_id=9))[0], MessageReceived)  # the id is free again


def test_receive_maximum_is_enforced() -> None:
    c = Client(MQTT_5, Limits(receive_maximum=2))
    c.accept()
    c.send(Publish("t", b"", 1, packet_id=1))
    c.send(Publish("t", b"", 1, packet_id=2))
    (closed,) = c.send(Publish("t", b"", 1, packet_id=3))
    assert isinstance(closed, Closed) and closed.reason == 0x93
    assert c.received() == [Disconnect(0x93)]


def test_topic_aliases() -> None:
    c = Client(MQTT_5)
    c.accept()
    alias = Properties.of([(Prop.TOPIC_ALIAS, 3)])
    c.send(Publish("sensors/s1/long/topic", b"1", properties=alias))
    (second,) = c.send(Publish("", b"2", properties=alias))
    assert isinstance(second, MessageReceived) and second.publish.topic == "sensors/s1/long/topic"
    assert not second.publish.properties  # the alias is resolved, not passed on
    (closed,) = c.send(Publish("", b"3", properties=Properties.of([(Prop.TOPIC_ALIAS, 4)])))
    assert isinstance(closed, Closed) and closed.reason == 0x82
    c2 = Client(MQTT_5)
    c2.accept()
    (closed,) = c2.send(Publish("t", b"", properties=Properties.of([(Prop.TOPIC_ALIAS, 17)])))
    assert isinstance(closed, Closed) and closed.reason == 0x94


def test_outbound_window_and_qos2_flow() -> None:
    c = Client(MQTT_5, properties=Properties.of([(Prop.RECEIVE_MAXIMUM, 2)]))  # the sensor's window: 2
    c.accept()
    session = c.conn.session
    assert session is not None
    for i in range(3):
        assert c.conn.deliver("commands/s1/x", f"m{i}".encode(), 1, False, Properties(), 1.0)
    sent = c.received()
    assert [p.payload for p in sent if isinstance(p, Publish)] == [b"m0", b"m1"]  # the third waits
    c.send(Puback(sent[0].packet_id))  # type: ignore[union-attr]
    (third,) = c.received()
    assert isinstance(third, Publish) and third.payload == b"m2"
    assert c.conn.deliver("commands/s1/y", b"q2", 2, False, Properties(), 1.0) is True
    c.send(Puback(sent[1].packet_id))  # type: ignore[union-attr]
    q2 = next(p for p in c.received() if isinstance(p, Publish))
    c.send(Pubrec(q2.packet_id))  # type: ignore[arg-type]
    assert c.received() == [Pubrel(q2.packet_id)]  # type: ignore[arg-type]
    c.send(Pubcomp(q2.packet_id))  # type: ignore[arg-type]
    assert q2.packet_id not in session.inflight


def test_message_expiry_while_queued() -> None:
    c = Client(MQTT_5, properties=Properties.of([(Prop.RECEIVE_MAXIMUM, 1)]))
    c.accept()
    expiring = Properties.of([(Prop.MESSAGE_EXPIRY_INTERVAL, 10)])
    c.conn.deliver("t", b"first", 1, False, Properties(), 0.0)
    c.conn.deliver("t", b"expires", 1, False, expiring, 0.0)
    c.conn.deliver("t", b"keeps", 1, False, Properties.of([(Prop.MESSAGE_EXPIRY_INTERVAL, 100)]), 0.0)
    (first,) = c.received()
    c.send(Puback(first.packet_id), now=50.0)  # type: ignore[union-attr]
    (nxt,) = c.received()
    assert isinstance(nxt, Publish) and nxt.payload == b"keeps"
    assert nxt.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL) == 50  # what is left of it


def test_persistent_session_resends_unacknowledged_with_dup() -> None:
    c = Client(MQTT_311, clean_start=False)
    session = SessionState("s1")
    c.accept(session)
    c.conn.deliver("commands/s1/x", b"important", 1, False, Properties(), 1.0)
    (sent,) = c.received()
    c.conn.connection_lost()
    again = Client(MQTT_311, clean_start=False)
    packets = again.accept(session, present=True)
    assert packets[0] == Connack(True, 0)
    assert packets[1] == Publish("commands/s1/x", b"important", 1, dup=True, packet_id=sent.packet_id)  # type: ignore[union-attr]


def test_will_only_on_abnormal_end() -> None:
    will = Will("sensors/s1/status", b"offline", 1)
    lost = Client(MQTT_5, will=will)
    lost.accept()
    assert lost.conn.connection_lost()[0].will == will  # type: ignore[union-attr]
    clean = Client(MQTT_5, will=will)
    clean.accept()
    (closed,) = clean.send(Disconnect())
    assert isinstance(closed, Closed) and closed.will is None
    asked = Client(MQTT_5, will=will)
    asked.accept()
    (closed,) = asked.send(Disconnect(0x04))
    assert isinstance(closed, Closed) and closed.will == will


def test_keepalive_and_connect_timeouts() -> None:
    will = Will("sensors/s1/status", b"offline")
    c = Client(MQTT_311, keepalive=10, will=will)
    c.accept()
    assert c.conn.tick(15.9) == []
    (closed,) = c.conn.tick(16.1)  # 1.5 x keepalive after the last packet at t=1
    assert isinstance(closed, Closed) and closed.reason == 0x8D and closed.will == will
    silent = ServerConnection(0.0, Limits(connect_timeout=5))
    assert silent.tick(4.9) == []
    (closed,) = silent.tick(5.1)
    assert isinstance(closed, Closed) and closed.will is None


def test_outbound_queue_is_bounded() -> None:
    c = Client(MQTT_311, Limits(max_queued=3, max_inflight=1))  # a sensor that never acknowledges
    c.accept()
    accepted = [c.conn.deliver("t", b"x", 1, False, Properties(), 1.0) for _ in range(6)]
    assert accepted == [True, True, True, True, False, False]  # one in flight, three queued
    assert c.conn.session is not None and c.conn.session.dropped == 2


def test_sensor_maximum_packet_size_is_respected() -> None:
    c = Client(MQTT_5, properties=Properties.of([(Prop.MAXIMUM_PACKET_SIZE, 64)]))
    c.accept()
    c.conn.deliver("t", b"x" * 100, 0, False, Properties(), 1.0)
    c.conn.deliver("t", b"small", 0, False, Properties(), 1.0)
    assert [p.payload for p in c.received() if isinstance(p, Publish)] == [b"small"]
