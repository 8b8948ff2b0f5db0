"""MQTT control packets (3.1.1 and 5.0) as frozen values, the 5.0 property table and reason codes.

References: MQTT Version 3.1.1 (OASIS, 2014) and MQTT Version 5.0 (OASIS, 2019); section numbers below are
the 5.0 specification's unless noted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

MQTT_311 = 4  # protocol level (3.1.1: section 3.1.2.2)
MQTT_5 = 5


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class Reason(IntEnum):
    """5.0 reason codes used by the codec and the session layer (section 2.4)."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# Which reason codes each 5.0 packet may carry (sections 3.2.2.2, 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1,
# 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1).
_ACK = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
VALID_REASONS: dict[PacketType, frozenset[int]] = {
    PacketType.CONNACK: frozenset(
        {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99}
        | {0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
    ),
    PacketType.PUBACK: _ACK,
    PacketType.PUBREC: _ACK,
    PacketType.PUBREL: frozenset({0x00, 0x92}),
    PacketType.PUBCOMP: frozenset({0x00, 0x92}),
    PacketType.SUBACK: frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    PacketType.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    PacketType.DISCONNECT: frozenset(
        {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96}
        | {0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
    ),
    PacketType.AUTH: frozenset({0x00, 0x18, 0x19}),
}
VALID_REASONS_311 = {
    PacketType.CONNACK: frozenset(range(6)),  # 3.1.1 section 3.2.2.3
    PacketType.SUBACK: frozenset({0x00, 0x01, 0x02, 0x80}),  # 3.1.1 section 3.9.3
}


class PropType(IntEnum):
    BYTE = 1
    TWO = 2
    FOUR = 3
    VARINT = 4
    UTF8 = 5
    BINARY = 6
    PAIR = 7


class Prop(IntEnum):
    """5.0 property identifiers (section 2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


WILL = "will"  # the Will Properties of a CONNECT, a "packet" of their own for the property table
_T = PacketType
_ACKS = (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP)
_ALL = (
    _T.CONNECT,
    _T.CONNACK,
    _T.PUBLISH,
    WILL,
    *_ACKS,
    _T.SUBSCRIBE,
    _T.SUBACK,
    _T.UNSUBSCRIBE,
    _T.UNSUBACK,
)
PROPERTIES: dict[int, tuple[PropType, tuple[object, ...]]] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: (PropType.BYTE, (_T.PUBLISH, WILL)),
    Prop.MESSAGE_EXPIRY_INTERVAL: (PropType.FOUR, (_T.PUBLISH, WILL)),
    Prop.CONTENT_TYPE: (PropType.UTF8, (_T.PUBLISH, WILL)),
    Prop.RESPONSE_TOPIC: (PropType.UTF8, (_T.PUBLISH, WILL)),
    Prop.CORRELATION_DATA: (PropType.BINARY, (_T.PUBLISH, WILL)),
    Prop.SUBSCRIPTION_IDENTIFIER: (PropType.VARINT, (_T.PUBLISH, _T.SUBSCRIBE)),
    Prop.SESSION_EXPIRY_INTERVAL: (PropType.FOUR, (_T.CONNECT, _T.CONNACK, _T.DISCONNECT)),
    Prop.ASSIGNED_CLIENT_IDENTIFIER: (PropType.UTF8, (_T.CONNACK,)),
    Prop.SERVER_KEEP_ALIVE: (PropType.TWO, (_T.CONNACK,)),
    Prop.AUTHENTICATION_METHOD: (PropType.UTF8, (_T.CONNECT, _T.CONNACK, _T.AUTH)),
    Prop.AUTHENTICATION_DATA: (PropType.BINARY, (_T.CONNECT, _T.CONNACK, _T.AUTH)),
    Prop.REQUEST_PROBLEM_INFORMATION: (PropType.BYTE, (_T.CONNECT,)),
    Prop.WILL_DELAY_INTERVAL: (PropType.FOUR, (WILL,)),
    Prop.REQUEST_RESPONSE_INFORMATION: (PropType.BYTE, (_T.CONNECT,)),
    Prop.RESPONSE_INFORMATION: (PropType.UTF8, (_T.CONNACK,)),
    Prop.SERVER_REFERENCE: (PropType.UTF8, (_T.CONNACK, _T.DISCONNECT)),
    Prop.REASON_STRING: (
        PropType.UTF8,
        (_T.CONNACK, *_ACKS, _T.SUBACK, _T.UNSUBACK, _T.DISCONNECT, _T.AUTH),
    ),
    Prop.RECEIVE_MAXIMUM: (PropType.TWO, (_T.CONNECT, _T.CONNACK)),
    Prop.TOPIC_ALIAS_MAXIMUM: (PropType.TWO, (_T.CONNECT, _T.CONNACK)),
    Prop.TOPIC_ALIAS: (PropType.TWO, (_T.PUBLISH,)),
    Prop.MAXIMUM_QOS: (PropType.BYTE, (_T.CONNACK,)),
    Prop.RETAIN_AVAILABLE: (PropType.BYTE, (_T.CONNACK,)),
    Prop.USER_PROPERTY: (PropType.PAIR, (*_ALL, _T.DISCONNECT, _T.AUTH)),
    Prop.MAXIMUM_PACKET_SIZE: (PropType.FOUR, (_T.CONNECT, _T.CONNACK)),
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: (PropType.BYTE, (_T.CONNACK,)),
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (PropType.BYTE, (_T.CONNACK,)),
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: (PropType.BYTE, (_T.CONNACK,)),
}
# Byte properties that are booleans (0 or 1), and properties that must not be 0 (sections 3.1.2.11, 3.2.2.3).
BOOLEAN_PROPS = frozenset(
    {
        Prop.PAYLOAD_FORMAT_INDICATOR,
        Prop.REQUEST_PROBLEM_INFORMATION,
        Prop.REQUEST_RESPONSE_INFORMATION,
        Prop.MAXIMUM_QOS,
        Prop.RETAIN_AVAILABLE,
        Prop.WILDCARD_SUBSCRIPTION_AVAILABLE,
        Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        Prop.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)
NONZERO_PROPS = frozenset(
    {Prop.RECEIVE_MAXIMUM, Prop.MAXIMUM_PACKET_SIZE, Prop.TOPIC_ALIAS, Prop.SUBSCRIPTION_IDENTIFIER}
)


@dataclass(frozen=True)
class Properties:
    """5.0 properties in wire order: (identifier, value) pairs; values are int, str, bytes or (str, str)."""

    items: tuple[tuple[int, Any], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, Any]] = ()) -> Properties:
        return cls(tuple((int(k), v) for k, v in pairs))

    def get(self, prop: int, default: Any = None) -> Any:
        return next((v for k, v in self.items if k == prop), default)

    def get_all(self, prop: int) -> list[Any]:
        return [v for k, v in self.items if k == prop]

    def without(self, prop: int) -> Properties:
        """These properties but `prop` (a property that does not travel on: Will Delay, a topic alias)."""
        return Properties(tuple((k, v) for k, v in self.items if k != prop))

    def replaced(self, prop: int, value: Any) -> Properties:
        """These properties with `prop` set to `value` (first, in place of any it had)."""
        return Properties(((prop, value), *self.without(prop).items))

    def __bool__(self) -> bool:
        return bool(self.items)


NO_PROPERTIES = Properties()


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_311
    clean_start: bool = True  # 3.1.1: Clean Session
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.CONNECT, init=False, repr=False)


@dataclass(frozen=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0  # 3.1.1: the Connect Return code
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.CONNACK, init=False, repr=False)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present exactly when qos > 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.PUBLISH, init=False, repr=False)


@dataclass(frozen=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.PUBACK, init=False, repr=False)


@dataclass(frozen=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.PUBREC, init=False, repr=False)


@dataclass(frozen=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.PUBREL, init=False, repr=False)


@dataclass(frozen=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.PUBCOMP, init=False, repr=False)


@dataclass(frozen=True)
class Subscription:
    topic_filter: str
    qos: int = 0
    no_local: bool = False  # 5.0 only, like the two below
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.SUBSCRIBE, init=False, repr=False)


@dataclass(frozen=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.SUBACK, init=False, repr=False)


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.UNSUBSCRIBE, init=False, repr=False)


@dataclass(frozen=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only; empty in 3.1.1
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.UNSUBACK, init=False, repr=False)


@dataclass(frozen=True)
class Pingreq:
    type: PacketType = field(default=PacketType.PINGREQ, init=False, repr=False)


@dataclass(frozen=True)
class Pingresp:
    type: PacketType = field(default=PacketType.PINGRESP, init=False, repr=False)


@dataclass(frozen=True)
class Disconnect:
    reason_code: int = 0  # 5.0 only
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.DISCONNECT, init=False, repr=False)


@dataclass(frozen=True)
class Auth:  # 5.0 only
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES
    type: PacketType = field(default=PacketType.AUTH, init=False, repr=False)


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
