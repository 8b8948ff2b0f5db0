"""The server-side connection state machine, driven with real encoded packets; time is passed in."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    Reason,
    Subscribe,
    Subscription,
    Will,
)
from gatewayd.core.mqtt.session import (
    Closed,
    ConnectRequest,
    Limits,
    MessageReceived,
    Outbound,
    ServerConnection,
    SessionState,
    SubscribeRequest,
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
        assert connack.properties.get(Prop.RECEIVE_MAXIMUM) == 65535
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


def test_receive_maximum_is_announced_and_exceeding_it_is_0x93_in_5() -> None:
    """MQTT 5.0 section 3.3.4: "If it receives more than Receive Maximum QoS 1 and QoS 2 PUBLISH packets
    where it has not sent a PUBACK or PUBCOMP in response, the Server uses a DISCONNECT packet with Reason
    Code 0x93 (Receive Maximum exceeded)". QoS 2 counts until PUBCOMP, not only until PUBREC."""
    c = Client(MQTT_5, Limits(receive_maximum=2))
    (connack,) = c.accept()
    assert isinstance(connack, Connack) and connack.properties.get(Prop.RECEIVE_MAXIMUM) == 2
    (first,) = c.send(Publish("t", b"", 2, packet_id=1))
    c.conn.ack_message(first.token)  # type: ignore[attr-defined]  # PUBREC: still counted until PUBCOMP
    c.send(Publish("t", b"", 1, packet_id=2))
    assert c.send(Publish("t", b"", 1, packet_id=2, dup=True)) == []  # a resend takes no new place
    (closed,) = c.send(Publish("t", b"", 1, packet_id=3))
    assert isinstance(closed, Closed) and closed.reason == Reason.RECEIVE_MAXIMUM_EXCEEDED
    assert c.received()[-1] == Disconnect(Reason.RECEIVE_MAXIMUM_EXCEEDED)
    again = Client(MQTT_5, Limits(receive_maximum=2))
    again.accept()
    (q2,) = again.send(Publish("t", b"", 2, packet_id=1))
    again.conn.ack_message(q2.token)  # type: ignore[attr-defined]
    again.send(Pubrel(1))  # PUBCOMP: its place is free again
    again.send(Publish("t", b"", 1, packet_id=2))
    assert isinstance(again.send(Publish("t", b"", 1, packet_id=3))[0], MessageReceived)  # not yet over


def test_a_burst_under_the_announced_maximum_waits_for_the_window_in_5() -> None:
    """paho re-sends its whole backlog after CONNACK on every reconnect: below the announced Receive Maximum
    that is allowed, and what is beyond the gateway's own window waits, undecoded, until there is room."""
    c = Client(MQTT_5, Limits(receive_maximum=65535, receive_window=2))
    c.accept()
    c.send(Publish("t", b"", 1, packet_id=1))
    c.send(Publish("t", b"", 1, packet_id=2))
    assert c.send(Publish("t", b"", 1, packet_id=3)) == [] and c.conn.waiting and not c.conn.closed
    c.conn.ack_message(1)
    (third,) = c.conn.resume(1.0)
    assert isinstance(third, MessageReceived) and third.token == 3
    assert c.received() == [Puback(1)]


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


# ---------------------------------------------------------------- packets behind CONNECT, and flow control
# A client may send packets before CONNACK (3.1.1 and 5.0 section 3.1.4): paho-mqtt 1.6 sends its first
# PUBLISHes in the same write as CONNECT, and re-sends its in-flight messages so on every reconnect.


def _stream(version: int, n: int, first_id: int = 1, **connect: object) -> bytes:
    out = encode(Connect("s1", version, **connect), version)  # type: ignore[arg-type]
    for i in range(n):
        out += encode(Publish("sensors/s1/t", str(i).encode(), 1, packet_id=first_id + i), version)
    return out


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_packets_behind_connect_wait_for_the_decision_then_go_in_order(version: int) -> None:
    conn = ServerConnection(0.0)
    events = conn.receive(_stream(version, 5, clean_start=False), 1.0)
    assert [type(e) for e in events] == [ConnectRequest]  # nothing else is decoded before the decision
    assert conn.waiting
    conn.accept_connect(SessionState("s1"), False)
    received = conn.resume(1.0)
    assert [e.publish.payload for e in received] == [b"0", b"1", b"2", b"3", b"4"]  # type: ignore[attr-defined]
    assert not conn.waiting
    for e in received:
        conn.ack_message(e.token)  # type: ignore[attr-defined]
    answers = Decoder(version).feed(conn.data_to_send())
    assert isinstance(answers[0], Connack) and answers[0].reason_code == 0  # CONNACK first, then PUBACKs
    assert [a.packet_id for a in answers[1:]] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]


@pytest.mark.parametrize(("version", "wire"), [(MQTT_311, 5), (MQTT_5, 0x87)])
def test_packets_behind_a_refused_connect_are_dropped_with_it(version: int, wire: int) -> None:
    conn = ServerConnection(0.0)
    conn.receive(_stream(version, 3), 1.0)
    closed = conn.reject_connect(0x87, "not in the registry")
    assert closed.reason == 0x87 and conn.closed and not conn.waiting
    assert conn.resume(1.0) == [] and conn.receive(_stream(version, 1)[-12:], 2.0) == []
    assert Decoder(version).feed(conn.data_to_send()) == [Connack(False, wire)]


def test_a_second_connect_behind_the_first_is_a_protocol_error_once_the_first_is_accepted() -> None:
    conn = ServerConnection(0.0)
    data = encode(Connect("s1", MQTT_5), MQTT_5) * 2
    assert [type(e) for e in conn.receive(data, 1.0)] == [ConnectRequest]
    conn.accept_connect(SessionState("s1"), False)
    (closed,) = conn.resume(1.0)
    assert isinstance(closed, Closed) and closed.reason == 0x82 and closed.message == "second CONNECT"


def test_packets_before_a_malformed_one_are_handled_in_order() -> None:
    conn = ServerConnection(0.0)
    conn.receive(_stream(MQTT_311, 2), 1.0)
    conn.accept_connect(SessionState("s1"), False)
    conn.decoder.push(b"\xf0\x00")  # reserved packet type 15 (3.1.1): malformed
    events = conn.resume(1.0)
    assert [type(e) for e in events] == [MessageReceived, MessageReceived, Closed]


def test_mqtt311_client_over_the_window_is_paused_not_disconnected() -> None:
    """3.1.1 has no Receive Maximum: a client with more unacknowledged QoS 1 messages than the gateway's
    window is never disconnected for it; the rest waits undecoded (the caller stops reading the socket)."""
    conn = ServerConnection(0.0, Limits(receive_window=3))
    conn.receive(_stream(MQTT_311, 8, clean_start=False), 1.0)
    conn.accept_connect(SessionState("s1"), False)
    first = conn.resume(1.0)
    assert [e.token for e in first] == [1, 2, 3] and conn.waiting  # type: ignore[attr-defined]
    assert conn.tick(500.0) == [] and not conn.closed  # held back by us: no keepalive timeout meanwhile
    assert conn.resume(500.0) == []  # no room yet
    conn.ack_message(2)
    assert [e.token for e in conn.resume(500.0)] == [4]  # type: ignore[attr-defined]
    for token in (1, 3, 4):
        conn.ack_message(token)
    assert [e.token for e in conn.resume(500.0)] == [5, 6, 7]  # type: ignore[attr-defined]
    conn.ack_message(5)
    assert [e.token for e in conn.resume(500.0)] == [8] and not conn.waiting  # type: ignore[attr-defined]
    assert conn.decoder.buffered == 0


def test_resend_of_a_message_being_decided_takes_no_place_in_the_window() -> None:
    conn = ServerConnection(0.0, Limits(receive_window=1))
    conn.receive(_stream(MQTT_311, 1), 1.0)
    conn.accept_connect(SessionState("s1"), False)
    assert len(conn.resume(1.0)) == 1
    dup = encode(Publish("sensors/s1/t", b"0", 1, dup=True, packet_id=1), MQTT_311)
    assert conn.receive(dup, 2.0) == [] and not conn.waiting


def test_unacknowledged_inbound_ids_are_not_carried_into_a_resumed_session() -> None:
    """Only QoS 2 ids already answered with PUBREC belong to the session (section 4.3.3); QoS 1 ids the
    broker had not acknowledged when the connection ended are new messages on the next connection."""
    session = SessionState("s1")
    first = ServerConnection(0.0, Limits(receive_window=2))
    first.receive(_stream(MQTT_311, 2, clean_start=False), 1.0)
    first.accept_connect(session, False)
    assert len(first.resume(1.0)) == 2
    first.receive(encode(Publish("t", b"q2", 2, packet_id=9), MQTT_311), 1.0)  # waits: window full
    first.ack_message(1)
    (q2,) = first.resume(1.0)
    first.ack_message(q2.token)  # type: ignore[attr-defined]  # PUBREC sent: id 9 kept until PUBREL
    first.connection_lost()
    again = ServerConnection(2.0, Limits(receive_window=2))
    data = _stream(MQTT_311, 1, first_id=2, clean_start=False)  # id 2 again, never acknowledged
    data += encode(Publish("t", b"q2", 2, dup=True, packet_id=9), MQTT_311)
    again.receive(data, 3.0)
    again.accept_connect(session, True)
    (resent,) = again.resume(3.0)
    assert isinstance(resent, MessageReceived) and resent.token == 2  # not ignored, not counted twice
    answers = Decoder(MQTT_311).feed(again.data_to_send())
    assert answers[-1] == Pubrec(9)  # the QoS 2 resend is answered, not delivered again
    assert session.qos2_received == {9}


def test_accept_and_reject_out_of_turn_raise_and_change_nothing() -> None:
    from gatewayd.core.errors import ConnectionStateError

    fresh = ServerConnection(0.0)
    with pytest.raises(ConnectionStateError):
        fresh.accept_connect(SessionState("s1"), False)
    assert fresh.state.value == "await-connect" and fresh.data_to_send() == b""
    c = Client(MQTT_311)
    c.accept()
    with pytest.raises(ConnectionStateError):
        c.conn.reject_connect(0x87)
    assert c.conn.state.value == "connected" and c.received() == []


def test_a_failed_accept_leaves_the_connection_deciding_and_sends_nothing() -> None:
    session = SessionState("s1", expiry_interval=60)
    session.queued.append(Outbound("bad\ud800topic", b"x", 1, False, Properties()))  # cannot be encoded
    c = Client(MQTT_311, clean_start=False)
    with pytest.raises(UnicodeEncodeError):
        c.conn.accept_connect(session, True)
    assert c.conn.waiting and c.conn.data_to_send() == b""
    c.conn.reject_connect(0x80)
    assert c.received() == [Connack(False, 3)]  # "server unavailable": the client tries again later


def _drive(conn: ServerConnection, window: int, ack_order: Any, got: list[int], pending: list[int]) -> None:
    """Acknowledge one pending message (in the order `ack_order` picks) and handle what that lets go on."""
    if pending:
        conn.ack_message(pending.pop(ack_order.randrange(len(pending))))
    _handle(conn, conn.resume(1.0), window, got, pending)


def _handle(
    conn: ServerConnection, events: list[Any], window: int, got: list[int], pending: list[int]
) -> None:
    while events:  # as the broker does: handle the events, then whatever they let go on
        for e in events:
            if isinstance(e, ConnectRequest):
                conn.accept_connect(SessionState("s1"), False)
            else:
                assert isinstance(e, MessageReceived), e
                got.append(e.token)
                pending.append(e.token)
        assert len(pending) <= window
        events = conn.resume(1.0)


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from([MQTT_311, MQTT_5]),
    n=st.integers(1, 40),
    window=st.integers(1, 6),
    cuts=st.lists(st.integers(1, 2000), max_size=12),
    ack_order=st.randoms(use_true_random=False),
)
def test_any_split_any_ack_order_every_message_once_in_order(
    version: int, n: int, window: int, cuts: list[int], ack_order: Any
) -> None:
    """A client that sends everything at once, ignoring any window (as paho does after a reconnect), however
    the bytes arrive and whenever the broker acknowledges: every message is handed over exactly once, in
    order, the window is never exceeded, and the client is never cut off."""
    data = _stream(version, n, clean_start=False)
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    conn = ServerConnection(0.0, Limits(receive_window=window))
    got: list[int] = []
    pending: list[int] = []
    for chunk in chunks:
        while conn.waiting:  # the caller reads no more until what is held has been handled
            _drive(conn, window, ack_order, got, pending)
        _handle(conn, conn.receive(chunk, 1.0), window, got, pending)
    while conn.waiting or pending:
        _drive(conn, window, ack_order, got, pending)
    assert got == list(range(1, n + 1)) and not conn.closed


@settings(max_examples=200, deadline=None)
@given(
    early=st.integers(0, 20),
    later=st.integers(0, 20),
    window=st.integers(1, 6),
    ack_order=st.randoms(use_true_random=False),
)
def test_mqtt5_conforming_client_pipelining_before_connack_is_never_cut(
    early: int, later: int, window: int, ack_order: Any
) -> None:
    """A 5.0 client sends `early` publishes with its CONNECT (it knows no limit yet), then, having read the
    CONNACK, keeps to the Receive Maximum it announced: never cut, every message once, in order."""
    conn = ServerConnection(0.0, Limits(receive_window=window))
    client = Decoder(MQTT_5)
    got: list[int] = []
    pending: list[int] = []
    _handle(conn, conn.receive(_stream(MQTT_5, early, clean_start=False), 1.0), window, got, pending)
    outstanding = set(range(1, early + 1))
    next_id = early + 1
    while next_id <= early + later or outstanding:
        for packet in client.feed(conn.data_to_send()):
            if isinstance(packet, Puback):
                outstanding.discard(packet.packet_id)
        if next_id <= early + later and len(outstanding) < window and not conn.waiting:
            publish = Publish("sensors/s1/t", b"x", 1, packet_id=next_id)
            _handle(conn, conn.receive(encode(publish, MQTT_5), 1.0), window, got, pending)
            outstanding.add(next_id)
            next_id += 1
        else:
            _drive(conn, window, ack_order, got, pending)
        assert not conn.closed
    assert got == list(range(1, early + later + 1))


def test_subscription_identifier_and_no_local_on_a_shared_subscription_are_protocol_errors() -> None:
    """5.0: the CONNACK says Subscription Identifiers Available = 0, so a SUBSCRIBE carrying one ends the
    connection with 0xA1 (section 3.2.2.3.12); "It is a Protocol Error to set the No Local bit to 1 on a
    Shared Subscription" [MQTT-3.8.3-4]."""
    c = Client(MQTT_5)
    c.accept()
    with_id = Subscribe(1, (Subscription("t", 1),), Properties.of([(Prop.SUBSCRIPTION_IDENTIFIER, 7)]))
    (closed,) = c.send(with_id)
    assert isinstance(closed, Closed) and closed.reason == Reason.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED
    c = Client(MQTT_5)
    c.accept()
    (closed,) = c.send(Subscribe(1, (Subscription("$share/g/t", 1, no_local=True),)))
    assert isinstance(closed, Closed) and closed.reason == Reason.PROTOCOL_ERROR
    c = Client(MQTT_5)
    c.accept()
    assert [type(e) for e in c.send(Subscribe(1, (Subscription("$share/g/t", 1),)))] == [SubscribeRequest]
