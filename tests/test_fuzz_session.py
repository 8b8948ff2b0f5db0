"""Issue 17: a fuzz target for the codec and the session together. A client's bytes (valid packets, their
mutations, junk, arbitrary splits) go into a ServerConnection driven the way the broker drives it, and the
server side must hold its invariants: only ProtocolError-class outcomes (a Closed event), never an exception;
what it sends decodes as packets a server may send; once closed it stays closed and silent; it never holds
more unacknowledged messages than receive_window.

Bounded in `make test` (GATEWAYD_FUZZ_EXAMPLES, default 100 per case); longer on demand:
`GATEWAYD_FUZZ_EXAMPLES=100000 make test-venv PYTEST_ARGS='-k fuzz'` (docs/development.md)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import MQTT_5, MQTT_311, Packet, PacketType, Properties
from gatewayd.core.mqtt.session import (
    Closed,
    ConnectRequest,
    Limits,
    MessageReceived,
    ServerConnection,
    SessionState,
    SubscribeRequest,
    UnsubscribeRequest,
)

from .test_mqtt_codec import packets

FUZZ_EXAMPLES = int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "100"))
SERVER_SENDS = {
    PacketType.CONNACK, PacketType.PUBLISH, PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL,
    PacketType.PUBCOMP, PacketType.SUBACK, PacketType.UNSUBACK, PacketType.PINGRESP, PacketType.DISCONNECT,
}  # fmt: skip


@st.composite
def client_bytes(draw: st.DrawFn, version: int) -> list[bytes]:
    """A stream a client might send: mostly packets (a CONNECT first, usually), some mutated, some junk,
    cut at arbitrary places."""
    stream = b""
    items = draw(st.lists(packets(version), min_size=1, max_size=12))
    for packet in items:
        data = encode(packet, version)
        kind = draw(st.integers(0, 9))
        if kind == 0 and data:  # flip a byte
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif kind == 1:  # junk
            data = draw(st.binary(max_size=40))
        elif kind == 2 and len(data) > 2:  # truncated
            data = data[: draw(st.integers(1, len(data) - 1))]
        stream += data
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def _server_side(version: int, chunks: list[bytes], accept: bool) -> None:
    limits = Limits(receive_window=4, max_inflight=4, max_packet_size=4096, connect_timeout=10)
    conn = ServerConnection(0.0, limits)
    now = 0.0
    sent: list[Packet] = []

    def answer(events: list[object]) -> None:
        for event in events:
            if isinstance(event, ConnectRequest):
                if accept:
                    conn.accept_connect(SessionState(event.connect.client_id or "x"), False, None, now)
                else:
                    assert isinstance(conn.reject_connect(0x87, "fuzz"), Closed)
            elif isinstance(event, MessageReceived):
                if event.publish.qos:
                    conn.ack_message(event.token, 0)
            elif isinstance(event, SubscribeRequest):
                conn.suback(event.packet_id, [s.qos for s in event.subscriptions])
                topic = event.subscriptions[0].topic_filter.replace("+", "a").replace("#", "b")
                conn.deliver(topic, b"cmd", 1, False, Properties(), now)
            elif isinstance(event, UnsubscribeRequest):
                conn.unsuback(event.packet_id, [0] * len(event.topic_filters))
            else:
                assert isinstance(event, Closed), event

    for chunk in chunks:
        now += 0.01
        if conn.closed:
            assert conn.receive(chunk, now) == [] and not conn.data_to_send()  # closed stays closed, silent
            continue
        events = conn.receive(chunk, now)
        while events:
            answer(events)
            events = conn.resume(now) if not conn.closed else []
        for packet in _decode(version, conn.data_to_send()):
            assert packet.type in SERVER_SENDS, packet
            sent.append(packet)
        assert len(conn._unacked_in) <= limits.receive_window
    answer(conn.tick(now + 100.0))
    answer(conn.connection_lost())
    assert conn.closed
    assert conn.data_to_send() in (b"", None) or not _decode(version, conn.data_to_send())


def _decode(version: int, data: bytes) -> list[Packet]:
    """Server packets as a client decodes them (every one must decode: the server never sends junk)."""
    return list(Decoder(version, max_packet_size=1 << 28).feed(data)) if data else []


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
@pytest.mark.parametrize("accept", [True, False])
def test_fuzz_the_session_with_client_streams(version: int, accept: bool) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(client_bytes(version))
    def run(chunks: list[bytes]) -> None:
        _server_side(version, chunks, accept)

    run()
