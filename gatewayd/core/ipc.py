"""Frames between the daemon and its uplink child process (over a socketpair), sans-IO.

Frame: 4-byte big-endian length of what follows, 1-byte type, body. Data frames (PUBLISH, MESSAGE) are binary
so payloads pass untouched and cheaply; control frames carry a JSON object. Frames are bounded (MAX_FRAME):
an oversized length is a protocol error, never an allocation.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from gatewayd.core.errors import FrameError

MAX_FRAME = 1024 * 1024  # > AWS IoT Core's 128 KiB message limit plus topic and header


class Kind(IntEnum):
    CONFIG = 1  # daemon -> child: JSON connection parameters (first frame)
    PUBLISH = 2  # daemon -> child: id, qos, retain, topic, payload
    ACK = 3  # child -> daemon: id, ok, detail (PUBACK for QoS 1; accepted-for-sending for QoS 0)
    SUBSCRIBE = 4  # daemon -> child: JSON {"filters": [[filter, qos], ...]}
    SUBACK = 5  # child -> daemon: JSON {"filters": [...], "codes": [...]}
    MESSAGE = 6  # child -> daemon: qos, retain, topic, payload (inbound)
    STATE = 7  # child -> daemon: JSON {"state": ..., "error": ..., ...}
    STOP = 8  # daemon -> child: disconnect cleanly and exit
    UNSUBSCRIBE = 9  # daemon -> child: JSON {"filters": [...]}
    NETWORK = 10  # daemon -> child: JSON {"addresses": [...] or null}: the network changed, try again now


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Publish:
    id: int
    qos: int
    retain: bool
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Ack:
    id: int
    ok: bool
    detail: str


@dataclass(frozen=True)
class Message:
    qos: int
    retain: bool
    topic: str
    payload: bytes


_HEAD = struct.Struct("!IB")
_PUB = struct.Struct("!QBBH")
_ACK = struct.Struct("!QB")
_MSG = struct.Struct("!BBH")


def frame(kind: Kind, body: bytes) -> bytes:
    if len(body) + 1 > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(len(body) + 1, kind) + body


def json_frame(kind: Kind, obj: Any) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def encode_publish(p: Publish) -> bytes:
    topic = p.topic.encode()
    return frame(Kind.PUBLISH, _PUB.pack(p.id, p.qos, p.retain, len(topic)) + topic + p.payload)


def decode_publish(body: bytes) -> Publish:
    pid, qos, retain, tlen = _PUB.unpack_from(body)
    start = _PUB.size
    return Publish(pid, qos, bool(retain), body[start : start + tlen].decode(), body[start + tlen :])


def encode_ack(a: Ack) -> bytes:
    return frame(Kind.ACK, _ACK.pack(a.id, a.ok) + a.detail.encode())


def decode_ack(body: bytes) -> Ack:
    aid, ok = _ACK.unpack_from(body)
    return Ack(aid, bool(ok), body[_ACK.size :].decode())


def encode_message(m: Message) -> bytes:
    topic = m.topic.encode()
    return frame(Kind.MESSAGE, _MSG.pack(m.qos, m.retain, len(topic)) + topic + m.payload)


def decode_message(body: bytes) -> Message:
    qos, retain, tlen = _MSG.unpack_from(body)
    start = _MSG.size
    return Message(qos, bool(retain), body[start : start + tlen].decode(), body[start + tlen :])


class Decoder:
    """Bytes in, frames out. Keeps at most one partial frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= _HEAD.size:
            size, kind = _HEAD.unpack_from(self._buf)
            if size < 1 or size > MAX_FRAME:
                raise FrameError(f"bad frame length {size}")
            if len(self._buf) < 4 + size:
                break
            try:
                frames.append(Frame(Kind(kind), bytes(self._buf[_HEAD.size : 4 + size])))
            except ValueError as exc:
                raise FrameError(f"unknown frame type {kind}") from exc
            del self._buf[: 4 + size]
        return frames
