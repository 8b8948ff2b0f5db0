"""Sans-IO MQTT 3.1.1 / 5.0 codec: bytes in, packets out (Decoder); packets in, bytes out (encode).

Decoding any byte string yields packets, "need more data" (an empty list, with the partial packet kept), or a
ProtocolError carrying the reason code the specification prescribes - never another exception. Buffered
input is bounded: a packet whose announced size exceeds `max_packet_size` is refused from its header alone
(0x95, section 3.1.2.11.4), before its body is read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from gatewayd.core.errors import ProtocolError
from gatewayd.core.mqtt.packets import (
    BOOLEAN_PROPS,
    MQTT_5,
    MQTT_311,
    NONZERO_PROPS,
    PROPERTIES,
    VALID_REASONS,
    VALID_REASONS_311,
    WILL,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    PropType,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

DEFAULT_MAX_PACKET_SIZE = 128 * 1024  # AWS IoT Core's message size limit
MAX_VARINT = 268_435_455  # section 1.5.5


def malformed(message: str) -> ProtocolError:
    return ProtocolError(Reason.MALFORMED_PACKET, message)


def protocol_error(message: str) -> ProtocolError:
    return ProtocolError(Reason.PROTOCOL_ERROR, message)


# ---------------------------------------------------------------- primitives


class Reader:
    """Bounds-checked reads over one packet's body; running past the end is a malformed packet."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise malformed("packet shorter than its contents say")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def two(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def four(self) -> int:
        return int(struct.unpack("!I", self.take(4))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        for i in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if i and b == 0:
                    raise malformed("variable byte integer not in its shortest form")
                return value
            shift += 7
        raise malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.two())

    def utf8(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")  # strict: rejects surrogates and overlong forms (section 1.5.4)
        except UnicodeDecodeError as exc:
            raise malformed("invalid UTF-8 string") from exc
        if "\x00" in text:
            raise malformed("UTF-8 string contains U+0000")
        return text


def varint(value: int) -> bytes:
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    return binary(text.encode("utf-8"))


def binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("string or binary data longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


# ---------------------------------------------------------------- topics


def check_topic_name(topic: str) -> None:
    """A PUBLISH topic (section 4.7): no wildcards, no U+0000 (already checked)."""
    if "+" in topic or "#" in topic:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, f"wildcard in topic name {topic!r}")


def check_topic_filter(topic_filter: str, version: int) -> None:
    """A subscription's filter (section 4.7.1); `$share/name/filter` in 5.0 (section 4.8.2)."""
    if not topic_filter:
        raise malformed("empty topic filter")
    levels = topic_filter.split("/")
    if version == MQTT_5 and levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise protocol_error(f"invalid shared subscription {topic_filter!r}")
        levels = levels[2:]
        if levels == [""]:
            raise protocol_error(f"shared subscription without a filter {topic_filter!r}")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise malformed(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise malformed(f"'+' must be a whole level in {topic_filter!r}")


# ---------------------------------------------------------------- properties


def read_properties(r: Reader, packet: object) -> Properties:
    length = r.varint()
    body = Reader(r.take(length))
    items: list[tuple[int, Any]] = []
    seen: set[int] = set()
    while body.left():
        ident = body.varint()
        spec = PROPERTIES.get(ident)
        if spec is None:
            raise malformed(f"unknown property 0x{ident:02x}")
        kind, allowed = spec
        if packet not in allowed:
            raise protocol_error(f"property 0x{ident:02x} not allowed in {_name(packet)}")
        # Only User Property may repeat, and Subscription Identifier in a PUBLISH (section 2.2.2.2).
        repeatable = ident == 0x26 or (ident == 0x0B and packet is PacketType.PUBLISH)
        if ident in seen and not repeatable:
            raise protocol_error(f"property 0x{ident:02x} appears more than once")
        seen.add(ident)
        value = _read_value(body, kind)
        if ident in BOOLEAN_PROPS and value not in (0, 1):
            raise protocol_error(f"property 0x{ident:02x} must be 0 or 1")
        if ident in NONZERO_PROPS and value == 0:
            raise protocol_error(f"property 0x{ident:02x} must not be 0")
        items.append((ident, value))
    return Properties(tuple(items))


def _read_value(r: Reader, kind: PropType) -> Any:
    match kind:
        case PropType.BYTE:
            return r.byte()
        case PropType.TWO:
            return r.two()
        case PropType.FOUR:
            return r.four()
        case PropType.VARINT:
            return r.varint()
        case PropType.UTF8:
            return r.utf8()
        case PropType.BINARY:
            return r.binary()
        case PropType.PAIR:
            return (r.utf8(), r.utf8())


def write_properties(props: Properties, packet: object) -> bytes:
    body = bytearray()
    for ident, value in props.items:
        spec = PROPERTIES.get(ident)
        if spec is None or packet not in spec[1]:
            raise ValueError(f"property 0x{ident:02x} not allowed in {_name(packet)}")
        body += varint(ident)
        match spec[0]:
            case PropType.BYTE:
                body.append(value)
            case PropType.TWO:
                body += struct.pack("!H", value)
            case PropType.FOUR:
                body += struct.pack("!I", value)
            case PropType.VARINT:
                body += varint(value)
            case PropType.UTF8:
                body += utf8(value)
            case PropType.BINARY:
                body += binary(value)
            case PropType.PAIR:
                body += utf8(value[0]) + utf8(value[1])
    return varint(len(body)) + bytes(body)


def _name(packet: object) -> str:
    return packet.name if isinstance(packet, PacketType) else "Will Properties"


def _reason(code: int, packet: PacketType, version: int) -> int:
    valid = VALID_REASONS if version == MQTT_5 else VALID_REASONS_311
    if packet in valid and code not in valid[packet]:
        raise protocol_error(f"reason code 0x{code:02x} not valid in {packet.name}")
    return code


def _packet_id(r: Reader) -> int:
    pid = r.two()
    if pid == 0:
        raise protocol_error("packet identifier 0")  # section 2.2.1
    return pid


# ---------------------------------------------------------------- decoding, per packet


def _connect(r: Reader, flags: int, version: int | None) -> Connect:
    name, level = r.utf8(), r.byte()
    if (name, level) not in (("MQTT", MQTT_311), ("MQTT", MQTT_5)):
        # 3.1 ("MQIsdp", 3) and anything else: the server answers CONNACK 0x01 / 0x84 (section 3.1.2.2).
        raise ProtocolError(
            Reason.UNSUPPORTED_PROTOCOL_VERSION, f"unsupported protocol {name!r} level {level}"
        )
    cflags = r.byte()
    if cflags & 0x01:
        raise malformed("CONNECT reserved flag set")  # section 3.1.2.3
    will_flag, will_qos, will_retain = bool(cflags & 0x04), (cflags >> 3) & 0x03, bool(cflags & 0x20)
    has_password, has_username = bool(cflags & 0x40), bool(cflags & 0x80)
    if will_qos == 3:
        raise malformed("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise malformed("will QoS or retain set without a will")
    if level == MQTT_311 and has_password and not has_username:
        raise malformed("password without user name")  # 3.1.1 section 3.1.2.9
    keepalive = r.two()
    props = read_properties(r, PacketType.CONNECT) if level == MQTT_5 else Properties()
    client_id = r.utf8()
    will = None
    if will_flag:
        will_props = read_properties(r, WILL) if level == MQTT_5 else Properties()
        will_topic = r.utf8()
        check_topic_name(will_topic)
        will = Will(will_topic, r.binary(), will_qos, will_retain, will_props)
    username = r.utf8() if has_username else None
    password = r.binary() if has_password else None
    return Connect(client_id, level, bool(cflags & 0x02), keepalive, username, password, will, props)


def _connack(r: Reader, flags: int, version: int) -> Connack:
    ack_flags = r.byte()
    if ack_flags & 0xFE:
        raise malformed("CONNACK reserved flags set")
    code = _reason(r.byte(), PacketType.CONNACK, version)
    props = read_properties(r, PacketType.CONNACK) if version == MQTT_5 else Properties()
    return Connack(bool(ack_flags & 1), code, props)


def _publish(r: Reader, flags: int, version: int) -> Publish:
    qos, dup, retain = (flags >> 1) & 0x03, bool(flags & 0x08), bool(flags & 0x01)
    if qos == 3:
        raise malformed("PUBLISH QoS 3")  # section 3.3.1.2
    if qos == 0 and dup:
        raise malformed("DUP set on a QoS 0 PUBLISH")  # section 3.3.1.1
    topic = r.utf8()
    check_topic_name(topic)
    packet_id = _packet_id(r) if qos else None
    props = read_properties(r, PacketType.PUBLISH) if version == MQTT_5 else Properties()
    if not topic and props.get(0x23) is None:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, "empty topic name without a topic alias")
    return Publish(topic, r.take(r.left()), qos, retain, dup, packet_id, props)


def _ack(cls: Callable[..., Any], packet: PacketType) -> Callable[[Reader, int, int], Any]:
    def decode(r: Reader, flags: int, version: int) -> Any:
        pid = _packet_id(r)
        if version != MQTT_5 or not r.left():  # 5.0 short form: success, no properties (section 3.4.2.1)
            return cls(pid)
        code = _reason(r.byte(), packet, version)
        props = read_properties(r, packet) if r.left() else Properties()
        return cls(pid, code, props)

    return decode


def _subscribe(r: Reader, flags: int, version: int) -> Subscribe:
    pid = _packet_id(r)
    props = read_properties(r, PacketType.SUBSCRIBE) if version == MQTT_5 else Properties()
    subs = []
    while r.left():
        topic_filter = r.utf8()
        check_topic_filter(topic_filter, version)
        options = r.byte()
        qos = options & 0x03
        if qos == 3:
            raise malformed("subscription QoS 3")
        if version == MQTT_5:
            if options & 0xC0 or (options >> 4) & 0x03 == 3:
                raise malformed("subscription options reserved bits or retain handling 3")
            if options & 0x04 and topic_filter.startswith("$share/"):
                raise protocol_error("no local on a shared subscription")  # section 3.8.3.1
            subs.append(
                Subscription(
                    topic_filter, qos, bool(options & 0x04), bool(options & 0x08), (options >> 4) & 0x03
                )
            )
        else:
            if options & 0xFC:
                raise malformed("subscription options reserved bits")  # 3.1.1 section 3.8.3.1
            subs.append(Subscription(topic_filter, qos))
    if not subs:
        raise protocol_error("SUBSCRIBE without a subscription")  # section 3.8.3
    return Subscribe(pid, tuple(subs), props)


def _suback(r: Reader, flags: int, version: int) -> Suback:
    pid = _packet_id(r)
    props = read_properties(r, PacketType.SUBACK) if version == MQTT_5 else Properties()
    codes = tuple(_reason(b, PacketType.SUBACK, version) for b in r.take(r.left()))
    return Suback(pid, codes, props)


def _unsubscribe(r: Reader, flags: int, version: int) -> Unsubscribe:
    pid = _packet_id(r)
    props = read_properties(r, PacketType.UNSUBSCRIBE) if version == MQTT_5 else Properties()
    filters = []
    while r.left():
        topic_filter = r.utf8()
        check_topic_filter(topic_filter, version)
        filters.append(topic_filter)
    if not filters:
        raise protocol_error("UNSUBSCRIBE without a topic filter")  # section 3.10.3
    return Unsubscribe(pid, tuple(filters), props)


def _unsuback(r: Reader, flags: int, version: int) -> Unsuback:
    pid = _packet_id(r)
    if version != MQTT_5:
        return Unsuback(pid)
    props = read_properties(r, PacketType.UNSUBACK)
    codes = tuple(_reason(b, PacketType.UNSUBACK, version) for b in r.take(r.left()))
    return Unsuback(pid, codes, props)


def _reason_only(cls: Callable[..., Any], packet: PacketType) -> Callable[[Reader, int, int], Any]:
    def decode(r: Reader, flags: int, version: int) -> Any:
        if packet is PacketType.AUTH and version != MQTT_5:
            raise malformed("AUTH is an MQTT 5.0 packet")
        if version != MQTT_5 or not r.left():
            return cls()
        code = _reason(r.byte(), packet, version)
        props = read_properties(r, packet) if r.left() else Properties()
        return cls(code, props)

    return decode


def _empty(cls: Callable[[], Any]) -> Callable[[Reader, int, int], Any]:
    return lambda r, flags, version: cls()


_DECODERS: dict[PacketType, Callable[[Reader, int, int], Any]] = {
    PacketType.CONNACK: _connack,
    PacketType.PUBLISH: _publish,
    PacketType.PUBACK: _ack(Puback, PacketType.PUBACK),
    PacketType.PUBREC: _ack(Pubrec, PacketType.PUBREC),
    PacketType.PUBREL: _ack(Pubrel, PacketType.PUBREL),
    PacketType.PUBCOMP: _ack(Pubcomp, PacketType.PUBCOMP),
    PacketType.SUBSCRIBE: _subscribe,
    PacketType.SUBACK: _suback,
    PacketType.UNSUBSCRIBE: _unsubscribe,
    PacketType.UNSUBACK: _unsuback,
    PacketType.PINGREQ: _empty(Pingreq),
    PacketType.PINGRESP: _empty(Pingresp),
    PacketType.DISCONNECT: _reason_only(Disconnect, PacketType.DISCONNECT),
    PacketType.AUTH: _reason_only(Auth, PacketType.AUTH),
}
# Fixed-header flags every packet but PUBLISH must carry (section 2.1.3).
_FLAGS = {PacketType.PUBREL: 2, PacketType.SUBSCRIBE: 2, PacketType.UNSUBSCRIBE: 2}


def decode_packet(first: int, body: bytes, version: int | None) -> Packet:
    """One packet from its first byte and body; `version` is None until CONNECT said it."""
    try:
        ptype = PacketType(first >> 4)
    except ValueError:
        raise malformed("reserved packet type 0") from None
    flags = first & 0x0F
    if ptype is not PacketType.PUBLISH and flags != _FLAGS.get(ptype, 0):
        raise malformed(f"{ptype.name} with fixed-header flags {flags:#x}")
    r = Reader(body)
    if ptype is PacketType.CONNECT:
        packet: Packet = _connect(r, flags, version)
    else:
        if version is None:
            raise protocol_error(f"{ptype.name} before CONNECT")  # section 3.1
        packet = _DECODERS[ptype](r, flags, version)
    if r.left():
        raise malformed(f"{r.left()} unexpected bytes at the end of {ptype.name}")
    return packet


class Decoder:
    """Incremental decoder for one connection. `version` is learnt from CONNECT (server side) or given."""

    def __init__(self, version: int | None = None, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        """Buffer `data` and decode every complete packet in the buffer."""
        self.push(data)
        packets: list[Packet] = []
        while (packet := self.next()) is not None:
            packets.append(packet)
        return packets

    def push(self, data: bytes) -> None:
        """Buffer `data` without decoding it (see next())."""
        self._buf += data

    def next(self) -> Packet | None:
        """Decode one packet from the buffer, or None while it holds no complete packet. A caller that is not
        ready for more leaves the rest in the buffer, in order (the server's flow control, session.py)."""
        header = self._header()
        if header is None:
            return None
        header_len, remaining = header
        total = header_len + remaining
        if total > self.max_packet_size:
            raise ProtocolError(
                Reason.PACKET_TOO_LARGE, f"packet of {total} bytes exceeds {self.max_packet_size}"
            )
        if len(self._buf) < total:
            return None
        first = self._buf[0]
        body = bytes(self._buf[header_len:total])
        del self._buf[:total]
        packet = decode_packet(first, body, self.version)
        if isinstance(packet, Connect) and self.version is None:
            self.version = packet.protocol_level
        return packet

    def _header(self) -> tuple[int, int] | None:
        """(fixed header length, remaining length), or None while incomplete (at most 5 bytes wait)."""
        buf = self._buf
        value, shift = 0, 0
        for i in range(1, 5):
            if len(buf) <= i:
                return None
            b = buf[i]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if i > 1 and b == 0:
                    raise malformed("remaining length not in its shortest form")
                return i + 1, value
            shift += 7
        raise malformed("remaining length longer than 4 bytes")


# ---------------------------------------------------------------- encoding


def _fixed(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def _props(props: Properties, packet: object, version: int) -> bytes:
    if version != MQTT_5:
        if props:
            raise ValueError("properties exist only in MQTT 5.0")
        return b""
    return write_properties(props, packet)


def encode(packet: Packet, version: int) -> bytes:
    """The wire form of `packet` for a connection of `version` (4 = 3.1.1, 5 = 5.0)."""
    match packet:
        case Connect():
            return _encode_connect(packet)
        case Connack():
            body = bytes([int(packet.session_present), packet.reason_code])
            return _fixed(0x20, body + _props(packet.properties, PacketType.CONNACK, version))
        case Publish():
            return _encode_publish(packet, version)
        case Puback() | Pubrec() | Pubrel() | Pubcomp():
            first = packet.type << 4 | _FLAGS.get(packet.type, 0)
            body = struct.pack("!H", packet.packet_id)
            if version == MQTT_5 and (packet.reason_code or packet.properties):
                body += bytes([packet.reason_code])
                if packet.properties:
                    body += write_properties(packet.properties, packet.type)
            return _fixed(first, body)
        case Subscribe():
            body = struct.pack("!H", packet.packet_id) + _props(
                packet.properties, PacketType.SUBSCRIBE, version
            )
            for s in packet.subscriptions:
                options = s.qos
                if version == MQTT_5:
                    options |= s.no_local << 2 | s.retain_as_published << 3 | s.retain_handling << 4
                body += utf8(s.topic_filter) + bytes([options])
            return _fixed(0x82, body)
        case Suback():
            body = struct.pack("!H", packet.packet_id) + _props(packet.properties, PacketType.SUBACK, version)
            return _fixed(0x90, body + bytes(packet.reason_codes))
        case Unsubscribe():
            body = struct.pack("!H", packet.packet_id) + _props(
                packet.properties, PacketType.UNSUBSCRIBE, version
            )
            return _fixed(0xA2, body + b"".join(utf8(f) for f in packet.topic_filters))
        case Unsuback():
            body = struct.pack("!H", packet.packet_id)
            if version == MQTT_5:
                body += write_properties(packet.properties, PacketType.UNSUBACK) + bytes(packet.reason_codes)
            return _fixed(0xB0, body)
        case Pingreq():
            return b"\xc0\x00"
        case Pingresp():
            return b"\xd0\x00"
        case Disconnect() | Auth():
            body = b""
            if version == MQTT_5 and (packet.reason_code or packet.properties):
                body = bytes([packet.reason_code]) + write_properties(packet.properties, packet.type)
            return _fixed(packet.type << 4, body)
    raise TypeError(f"not an MQTT packet: {packet!r}")


def _encode_connect(p: Connect) -> bytes:
    flags = p.clean_start << 1
    if p.will is not None:
        flags |= 0x04 | p.will.qos << 3 | p.will.retain << 5
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    body = utf8("MQTT") + bytes([p.protocol_level, flags]) + struct.pack("!H", p.keepalive)
    body += _props(p.properties, PacketType.CONNECT, p.protocol_level) + utf8(p.client_id)
    if p.will is not None:
        body += (
            _props(p.will.properties, WILL, p.protocol_level) + utf8(p.will.topic) + binary(p.will.payload)
        )
    if p.username is not None:
        body += utf8(p.username)
    if p.password is not None:
        body += binary(p.password)
    return _fixed(0x10, body)


def _encode_publish(p: Publish, version: int) -> bytes:
    if (p.qos > 0) != (p.packet_id is not None):
        raise ValueError("a PUBLISH has a packet id exactly when its QoS is above 0")
    first = 0x30 | p.dup << 3 | p.qos << 1 | int(p.retain)
    body = utf8(p.topic)
    if p.packet_id is not None:
        body += struct.pack("!H", p.packet_id)
    return _fixed(first, body + _props(p.properties, PacketType.PUBLISH, version) + p.payload)
