"""The sans-IO MQTT codec: property tests over every packet type of 3.1.1 and 5.0, spec violations with their
reason codes, bounded buffering, and the bytes real third-party clients send."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.core.errors import ProtocolError
from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    PROPERTIES,
    VALID_REASONS,
    WILL,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Prop,
    Properties,
    PropType,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
topic = (
    st.lists(text.filter(lambda s: "+" not in s and "#" not in s and "/" not in s), min_size=1, max_size=4)
    .map("/".join)
    .filter(bool)
)
level = st.sampled_from(["a", "b", "sensors", "+", "x y", "é"])
topic_filter = st.builds(
    lambda levels, hash_: "/".join(levels + (["#"] if hash_ else [])),
    st.lists(level, min_size=1, max_size=4),
    st.booleans(),
) | st.just("#")
packet_id = st.integers(1, 0xFFFF)
u16 = st.integers(0, 0xFFFF)


def values(ident: int) -> st.SearchStrategy[Any]:
    kind = PROPERTIES[ident][0]
    if ident in (Prop.RECEIVE_MAXIMUM, Prop.TOPIC_ALIAS):
        return st.integers(1, 0xFFFF)
    if ident == Prop.MAXIMUM_PACKET_SIZE:
        return st.integers(1, 0xFFFFFFFF)
    if ident == Prop.SUBSCRIPTION_IDENTIFIER:
        return st.integers(1, 268_435_455)
    match kind:
        case PropType.BYTE:
            return st.integers(0, 1)
        case PropType.TWO:
            return u16
        case PropType.FOUR:
            return st.integers(0, 0xFFFFFFFF)
        case PropType.VARINT:
            return st.integers(0, 268_435_455)
        case PropType.UTF8:
            return text
        case PropType.BINARY:
            return st.binary(max_size=12)
        case PropType.PAIR:
            return st.tuples(text, text)
    raise AssertionError(kind)


def props(packet: object, version: int) -> st.SearchStrategy[Properties]:
    if version != MQTT_5:
        return st.just(Properties())
    allowed = sorted(i for i, (_, where) in PROPERTIES.items() if packet in where)

    @st.composite
    def build(draw: st.DrawFn) -> Properties:
        chosen = draw(st.lists(st.sampled_from(allowed), max_size=5))
        items, seen = [], set()
        for ident in chosen:
            repeatable = ident == Prop.USER_PROPERTY or (
                ident == Prop.SUBSCRIPTION_IDENTIFIER and packet is PacketType.PUBLISH
            )
            if ident in seen and not repeatable:
                continue
            seen.add(ident)
            items.append((ident, draw(values(ident))))
        return Properties(tuple(items))

    return build()


def reason(ptype: PacketType, version: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted(VALID_REASONS[ptype])) if version == MQTT_5 else st.just(0)


def packets(version: int) -> st.SearchStrategy[Packet]:
    v5 = version == MQTT_5
    will = st.builds(
        Will, topic, st.binary(max_size=20), st.integers(0, 2), st.booleans(), props(WILL, version)
    )

    def make_connect(
        cid: str, clean: bool, ka: int, user: str | None, pw: bytes | None, w: Will | None, p: Properties
    ) -> Connect:
        # 3.1.1 allows a password only with a user name (3.1.1 section 3.1.2.9)
        return Connect(cid, version, clean, ka, user, pw if (user is not None or v5) else None, w, p)

    connect = st.builds(
        make_connect, text, st.booleans(), u16, st.none() | text, st.none() | st.binary(max_size=10),
        st.none() | will, props(PacketType.CONNECT, version),
    )  # fmt: skip
    connack = st.builds(
        Connack,
        st.booleans(),
        reason(PacketType.CONNACK, version) if v5 else st.integers(0, 5),
        props(PacketType.CONNACK, version),
    )

    @st.composite
    def publish(draw: st.DrawFn) -> Publish:
        qos = draw(st.integers(0, 2))
        pid = draw(packet_id) if qos else None
        properties = draw(props(PacketType.PUBLISH, version))
        dup = qos > 0 and draw(st.booleans())
        return Publish(
            draw(topic), draw(st.binary(max_size=64)), qos, draw(st.booleans()), dup, pid, properties
        )

    def ack(cls: Any, ptype: PacketType) -> st.SearchStrategy[Packet]:
        return st.builds(cls, packet_id, reason(ptype, version), props(ptype, version))

    @st.composite
    def subscription(draw: st.DrawFn) -> Subscription:
        f = draw(
            topic_filter
            | (
                st.builds(lambda n, f: f"$share/{n}/{f}", st.sampled_from(["g1", "grp"]), topic_filter)
                if v5
                else topic_filter
            )
        )
        if not v5:
            return Subscription(f, draw(st.integers(0, 2)))
        no_local = not f.startswith("$share/") and draw(st.booleans())
        return Subscription(
            f, draw(st.integers(0, 2)), no_local, draw(st.booleans()), draw(st.integers(0, 2))
        )

    subscribe = st.builds(
        Subscribe,
        packet_id,
        st.lists(subscription(), min_size=1, max_size=4).map(tuple),
        props(PacketType.SUBSCRIBE, version),
    )
    suback = st.builds(
        Suback,
        packet_id,
        st.lists(
            reason(PacketType.SUBACK, version) if v5 else st.sampled_from([0, 1, 2, 0x80]), max_size=4
        ).map(tuple),
        props(PacketType.SUBACK, version),
    )
    unsubscribe = st.builds(
        Unsubscribe,
        packet_id,
        st.lists(topic_filter, min_size=1, max_size=4).map(tuple),
        props(PacketType.UNSUBSCRIBE, version),
    )
    unsuback = (
        st.builds(
            Unsuback,
            packet_id,
            st.lists(reason(PacketType.UNSUBACK, version), max_size=4).map(tuple),
            props(PacketType.UNSUBACK, version),
        )
        if v5
        else st.builds(Unsuback, packet_id)
    )
    simple = [st.just(Pingreq()), st.just(Pingresp())]
    if v5:
        simple += [
            st.builds(
                Disconnect, reason(PacketType.DISCONNECT, version), props(PacketType.DISCONNECT, version)
            ),
            st.builds(Auth, reason(PacketType.AUTH, version), props(PacketType.AUTH, version)),
        ]
    else:
        simple.append(st.just(Disconnect()))
    return st.one_of(
        connect, connack, publish(), ack(Puback, PacketType.PUBACK), ack(Pubrec, PacketType.PUBREC),
        ack(Pubrel, PacketType.PUBREL), ack(Pubcomp, PacketType.PUBCOMP), subscribe, suback, unsubscribe,
        unsuback, *simple,
    )  # fmt: skip


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_every_packet_type_round_trips(version: int) -> None:
    @SETTINGS
    @given(packets(version))
    def check(packet: Packet) -> None:
        assert Decoder(version, max_packet_size=1 << 20).feed(encode(packet, version)) == [packet]

    check()


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_any_split_of_a_stream_gives_the_same_packets(version: int) -> None:
    @SETTINGS
    @given(st.lists(packets(version), min_size=1, max_size=6), st.data())
    def check(sequence: list[Packet], data: st.DataObject) -> None:
        stream = b"".join(encode(p, version) for p in sequence)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        decoder, got, last = Decoder(version, max_packet_size=1 << 20), [], 0
        for cut in [*cuts, len(stream)]:
            got += decoder.feed(stream[last:cut])
            last = cut
        assert got == sequence
        assert decoder.buffered == 0

    check()


@pytest.mark.parametrize("version", [None, MQTT_311, MQTT_5])
def test_arbitrary_bytes_give_packets_need_more_or_a_protocol_error(version: int | None) -> None:
    @SETTINGS
    @given(st.binary(max_size=300))
    def check(data: bytes) -> None:
        decoder = Decoder(version, max_packet_size=256)
        try:
            decoder.feed(data)
        except ProtocolError as exc:
            assert 0x80 <= exc.reason <= 0xA2
        assert decoder.buffered <= 256 + 5

    check()


@pytest.mark.parametrize(
    ("version", "data", "reason"),
    [
        (None, b"\x30\x00", 0x82),  # PUBLISH before CONNECT
        (4, b"\x00\x00", 0x81),  # reserved packet type 0
        (4, b"\x36\x05\x00\x01a\x00\x01", 0x81),  # QoS 3
        (4, b"\x38\x03\x00\x01a", 0x81),  # DUP on QoS 0
        (4, b"\x30\x03\x00\x01+", 0x90),  # wildcard in a topic name
        (4, b"\x62\x02\x00\x00", 0x82),  # PUBREL with packet id 0
        (4, b"\x60\x02\x00\x01", 0x81),  # PUBREL with the wrong fixed-header flags
        (4, b"\x82\x02\x00\x01", 0x82),  # SUBSCRIBE without a subscription
        (4, b"\x82\x07\x00\x01\x00\x02a#\x00", 0x81),  # '#' not a whole level
        (4, b"\x82\x06\x00\x01\x00\x01a\x04", 0x81),  # 3.1.1 reserved subscription option bits
        (5, b"\x82\x07\x00\x01\x00\x00\x01a\x30", 0x81),  # 5.0 retain handling 3
        (4, b"\xa2\x02\x00\x01", 0x82),  # UNSUBSCRIBE without a filter
        (4, b"\x30\x04\x00\x02\xc0\x80", 0x81),  # invalid UTF-8 in the topic
        (4, b"\x30\x04\x00\x02a\x00", 0x81),  # U+0000 in the topic
        (4, b"\xc0\x01\x00", 0x81),  # PINGREQ with a body
        (4, b"\x30\xff\xff\xff\xff\x7f", 0x81),  # remaining length of 5 bytes
        (4, b"\x30\x80\x00", 0x81),  # remaining length not in its shortest form
        (5, b"\x40\x04\x00\x01\x05\x00", 0x82),  # PUBACK with a reason code PUBACK may not carry
        (5, b"\x40\x06\x00\x01\x00\x02\x21\x00", 0x82),  # Receive Maximum in a PUBACK
        (5, b"\x30\x07\x00\x01a\x03\x23\x00\x00", 0x82),  # topic alias 0
        (5, b"\x30\x08\x00\x01a\x04\x01\x00\x01\x01", 0x82),  # payload format indicator twice
        (5, b"\x30\x06\x00\x01a\x02\x7f\x00", 0x81),  # unknown property
        (5, b"\x30\x03\x00\x00\x00", 0x90),  # empty topic without a topic alias
        (5, b"\xf0\x01\x05", 0x82),  # AUTH reason 0x05
        (4, b"\xf0\x00", 0x81),  # AUTH in 3.1.1
    ],
)
def test_violations_carry_the_specs_reason_code(version: int | None, data: bytes, reason: int) -> None:
    with pytest.raises(ProtocolError) as err:
        Decoder(version).feed(data)
    assert err.value.reason == reason, err.value


def _connect(level_name: bytes, level: int, flags: int, rest: bytes = b"\x00\x00") -> bytes:
    body = b"\x00" + bytes([len(level_name)]) + level_name + bytes([level, flags]) + b"\x00\x3c"
    body += (b"\x00" if level == 5 else b"") + rest
    return bytes([0x10, len(body)]) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_connect(b"MQIsdp", 3, 0x02), 0x84),  # MQTT 3.1: unsupported, answered with CONNACK 0x01 / 0x84
        (_connect(b"MQTT", 6, 0x02), 0x84),
        (_connect(b"MQTT", 4, 0x03), 0x81),  # reserved flag
        (_connect(b"MQTT", 4, 0x18), 0x81),  # will QoS without a will
        (_connect(b"MQTT", 4, 0x1E), 0x81),  # will QoS 3
        (_connect(b"MQTT", 4, 0x42, b"\x00\x00\x00\x01p"), 0x81),  # 3.1.1: password without user name
    ],
)
def test_connect_violations(data: bytes, reason: int) -> None:
    with pytest.raises(ProtocolError) as err:
        Decoder().feed(data)
    assert err.value.reason == reason


def test_password_without_user_name_is_fine_in_5() -> None:
    (packet,) = Decoder().feed(_connect(b"MQTT", 5, 0x42, b"\x00\x00\x00\x01p"))
    assert isinstance(packet, Connect) and packet.password == b"p" and packet.username is None


def test_oversized_packet_is_refused_from_its_header_alone() -> None:
    decoder = Decoder(MQTT_311, max_packet_size=1024)
    with pytest.raises(ProtocolError) as err:
        decoder.feed(b"\x30\x80\x80\x04")  # announces 65536 bytes; none of them sent
    assert err.value.reason == 0x95
    ok = Decoder(MQTT_311, max_packet_size=1024)
    payload = encode(Publish("t", b"x" * 1000), MQTT_311)
    assert len(payload) <= 1024 and ok.feed(payload) == [Publish("t", b"x" * 1000)]


def test_short_forms_of_5_acks() -> None:
    d = Decoder(MQTT_5)
    assert d.feed(b"\x40\x02\x00\x07") == [Puback(7)]
    assert d.feed(b"\x40\x03\x00\x07\x10") == [Puback(7, 0x10)]
    assert d.feed(b"\xe0\x00") == [Disconnect()]
    assert d.feed(b"\xe0\x01\x04") == [Disconnect(0x04)]
    assert encode(Puback(7), MQTT_5) == b"\x40\x02\x00\x07"


# ---------------------------------------------------------------- real clients' bytes


def _capture(argv: list[str], count: int = 2) -> list[Packet]:
    """Accept one connection from a real client, answer CONNACK/SUBACK/PUBACK as a broker would, decode."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: list[Packet] = []

    def serve() -> None:
        conn, _ = server.accept()
        decoder = Decoder()
        conn.settimeout(10)
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for p in decoder.feed(data):
                got.append(p)
                assert decoder.version is not None
                match p:
                    case Connect():
                        conn.sendall(encode(Connack(), decoder.version))
                    case Publish(qos=1, packet_id=pid):
                        conn.sendall(encode(Puback(pid), decoder.version))  # type: ignore[arg-type]
                    case Subscribe(packet_id=pid, subscriptions=subs):
                        conn.sendall(encode(Suback(pid, tuple(s.qos for s in subs)), decoder.version))
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    subprocess.run([part.replace("PORT", str(port)) for part in argv], timeout=20, capture_output=True)
    thread.join(15)
    server.close()
    return got


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_bytes(version: str) -> None:
    argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", "PORT", "-V", version, "-i", "sensor-1", "-q", "1"]
    argv += ["-t", "sensors/sensor-1/t", "-m", "21.5"]
    if version == "mqttv5":
        argv += ["-D", "publish", "user-property", "unit", "C"]
    got = _capture(argv)
    connect, publish, disconnect = got
    assert isinstance(connect, Connect) and connect.client_id == "sensor-1"
    assert connect.protocol_level == (MQTT_5 if version == "mqttv5" else MQTT_311)
    assert isinstance(publish, Publish) and (publish.topic, publish.payload, publish.qos) == (
        "sensors/sensor-1/t",
        b"21.5",
        1,
    )
    if version == "mqttv5":
        assert publish.properties.get_all(Prop.USER_PROPERTY) == [("unit", "C")]
    assert isinstance(disconnect, Disconnect)


@pytest.mark.parametrize("protocol", ["MQTTv311", "MQTTv5"])
def test_paho_bytes(protocol: str) -> None:
    script = (
        "import sys, time, paho.mqtt.client as m\n"
        "kw = {'protocol': getattr(m, sys.argv[2])}\n"
        "v2 = hasattr(m, 'CallbackAPIVersion')\n"
        "args = (m.CallbackAPIVersion.VERSION2,) if v2 else ()\n"
        "c = m.Client(*args, client_id='paho-1', **kw)\n"
        "c.will_set('sensors/paho-1/status', b'gone', qos=1, retain=True)\n"
        "c.connect('127.0.0.1', int(sys.argv[1]), 30)\n"
        "c.loop_start()\n"
        "c.subscribe([('commands/paho-1/#', 1), ('commands/all', 0)])\n"
        "c.publish('sensors/paho-1/t', b'\\x00\\x01', qos=1).wait_for_publish(5)\n"
        "time.sleep(0.2); c.disconnect(); c.loop_stop()\n"
    )
    got = _capture([sys.executable, "-c", script, "PORT", protocol])
    kinds = [type(p).__name__ for p in got]
    assert kinds == ["Connect", "Subscribe", "Publish", "Disconnect"], kinds
    connect = got[0]
    assert isinstance(connect, Connect) and connect.will == Will("sensors/paho-1/status", b"gone", 1, True)
    sub = got[1]
    assert isinstance(sub, Subscribe) and [s.topic_filter for s in sub.subscriptions] == [
        "commands/paho-1/#",
        "commands/all",
    ]
