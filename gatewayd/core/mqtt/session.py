"""One downstream MQTT connection, server side, as a sans-IO state machine (in the manner of h11).

`receive(data, now)` turns bytes from the sensor into events for the broker; the broker answers with
`accept_connect`, `ack_message`, `suback`, ... and `deliver`; `data_to_send()` returns the bytes to write.
Protocol errors never raise: they end in a `Closed` event (with the DISCONNECT to send, in 5.0).

Packets are decoded one at a time, only when the connection is ready for them, and handled strictly in order:
- behind a CONNECT (a client may send more before CONNACK, section 3.1.4 of 3.1.1 and of 5.0) nothing is
  decoded until the broker has decided the CONNECT; after accept_connect, `resume()` handles what waited;
- a QoS 1/2 PUBLISH that would take more than `receive_window` unacknowledged places waits, undecoded, until
  the broker acknowledges one (ack_message, then `resume()`).
While `waiting` is true the caller must not read the socket: TCP's flow control pushes back on the client,
and what is held here is bounded by one read. The window is the gateway's own pace, distinct from the Receive
Maximum announced to 5.0 clients (`receive_maximum`, 65535 by default): paho-mqtt 1.6 and 2.x re-send
everything they hold right after CONNACK on every reconnect, so a small announced maximum would cut them off
for good; with the window, the burst simply waits in the socket. A 5.0 client that really exceeds the
announced Receive Maximum (counting QoS 2 until PUBCOMP) is disconnected with 0x93 (section 3.3.4). 3.1.1 has
no Receive Maximum: its clients only ever wait.

`SessionState` is what outlives a connection for a persistent session (3.1.1 clean session 0, 5.0 session
expiry > 0): subscriptions, outbound messages not yet acknowledged, inbound QoS 2 packet ids awaiting PUBREL.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum

from gatewayd.core.errors import ConnectionStateError, ProtocolError
from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import (
    MQTT_5,
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
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

# 3.1.1 CONNACK return codes for the 5.0 reasons a server refuses a connection with (3.1.1 section 3.2.2.3).
CONNACK_311 = {
    Reason.UNSUPPORTED_PROTOCOL_VERSION: 0x01,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: 0x02,
    Reason.SERVER_UNAVAILABLE: 0x03,
    Reason.SERVER_BUSY: 0x03,
    Reason.BAD_USER_NAME_OR_PASSWORD: 0x04,
    Reason.NOT_AUTHORIZED: 0x05,
    Reason.BANNED: 0x05,
    Reason.UNSPECIFIED_ERROR: 0x03,  # our own failure: "server unavailable", the client may retry
    Reason.IMPLEMENTATION_SPECIFIC_ERROR: 0x03,
}


@dataclass(frozen=True)
class Limits:
    max_packet_size: int = 128 * 1024  # also announced in CONNACK (5.0)
    receive_maximum: int = 65535  # 5.0: announced; more unacknowledged QoS 1/2 from the client: 0x93
    receive_window: int = 100  # inbound QoS 1/2 messages being decided at once; more wait in the socket
    topic_alias_maximum: int = 16
    max_inflight: int = 20  # outbound QoS 1/2 not yet acknowledged by the sensor (and its receive maximum)
    max_queued: int = 1000  # outbound messages waiting for the window
    max_queued_bytes: int = 1024 * 1024
    connect_timeout: float = 10.0
    max_keepalive: int = 65535  # 5.0: a longer (or 0) keepalive is lowered to this, told by Server Keep Alive
    min_keepalive: int = 0  # 5.0: a shorter one is raised to this, told likewise; 0: no minimum
    max_session_expiry: int = 0xFFFFFFFF  # a Session Expiry Interval sent in DISCONNECT is capped to this


class State(Enum):
    AWAIT_CONNECT = "await-connect"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass
class Outbound:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    expires_at: float | None = None  # monotonic; from Message Expiry Interval (5.0)
    packet_id: int | None = None
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    share: str | None = None  # delivered through this shared subscription ($share/group/filter)


@dataclass
class SessionState:
    client_id: str
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    inflight: dict[int, Outbound] = field(
        default_factory=dict
    )  # packet id -> message (QoS 1/2, unacknowledged)
    queued: deque[Outbound] = field(default_factory=deque)
    queued_bytes: int = 0
    qos2_received: set[int] = field(default_factory=set)  # inbound packet ids awaiting PUBREL
    expiry_interval: int = 0  # seconds after disconnect (5.0); 0: ends with the connection
    next_id: int = 1
    dropped: int = 0

    def copy(self) -> SessionState:
        """A copy whose containers can change without changing this one (the messages in them are shared)."""
        return replace(
            self,
            subscriptions=dict(self.subscriptions),
            inflight=dict(self.inflight),
            queued=deque(self.queued),
            qos2_received=set(self.qos2_received),
        )


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ConnectRequest:
    connect: Connect


@dataclass(frozen=True)
class MessageReceived:
    """A PUBLISH from the sensor. For QoS 1/2 the broker must call ack_message(token, reason)."""

    token: int
    publish: Publish  # topic already resolved from a topic alias


@dataclass(frozen=True)
class SubscribeRequest:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties


@dataclass(frozen=True)
class UnsubscribeRequest:
    packet_id: int
    topic_filters: tuple[str, ...]


@dataclass(frozen=True)
class Closed:
    reason: int  # 5.0 reason code (0 for a normal DISCONNECT)
    message: str
    will: Will | None  # to publish now (abnormal end, or DISCONNECT 0x04)


Event = ConnectRequest | MessageReceived | SubscribeRequest | UnsubscribeRequest | Closed


class ServerConnection:
    def __init__(self, now: float, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.state = State.AWAIT_CONNECT
        self.decoder = Decoder(max_packet_size=limits.max_packet_size)
        self.version = 0
        self.connect: Connect | None = None
        self.session: SessionState | None = None
        self.keepalive = 0
        self.last_seen = now
        self.created = now
        self._out = bytearray()
        self._aliases: dict[int, str] = {}
        self._unacked_in: dict[int, int] = {}  # inbound packet id -> QoS, not yet acknowledged by the broker
        self._peer_receive_max = limits.max_inflight
        self._peer_max_packet = 0  # 0: no limit announced
        self._will: Will | None = None
        self._held: Packet | None = None  # decoded, waiting for room in the inbound window
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        if self._connect_overdue(now):  # a client sending slowly does not get more time (issue 17, item 2)
            return [
                self._close(Reason.MAXIMUM_CONNECT_TIME, "no CONNECT in time", with_will=False, send=False)
            ]
        self.last_seen = now
        self.bytes_in += len(data)
        self.decoder.push(data)
        return self._process(now)

    def resume(self, now: float) -> list[Event]:
        """Handle what waited (packets behind a CONNECT, or for the inbound window): call after the broker
        answered a ConnectRequest and after ack_message. Returns [] while there is nothing more to do."""
        if self.state is State.CLOSED:
            return []
        return self._process(now)

    @property
    def waiting(self) -> bool:
        """True while received packets wait for the broker (a CONNECT decision or an acknowledgement): the
        caller must not read more from the socket until resume() has handled them."""
        return not self.closed and (self._deciding or self._held is not None)

    @property
    def _deciding(self) -> bool:
        return self.state is State.AWAIT_CONNECT and self.connect is not None

    def _process(self, now: float) -> list[Event]:
        events: list[Event] = []
        while not self.closed and not self._deciding:
            packet, self._held = self._held, None
            if packet is None:
                try:
                    packet = self.decoder.next()
                except ProtocolError as exc:
                    events.append(self._close(exc.reason, str(exc), with_will=True))
                    break
                if packet is None:
                    break
            if self._exceeds_receive_maximum(packet):
                events.append(
                    self._close(Reason.RECEIVE_MAXIMUM_EXCEEDED, "more QoS 1/2 messages unacknowledged than "
                                "the Receive Maximum", with_will=True)
                )  # fmt: skip
                break
            if self._must_wait(packet):
                self._held = packet
                break
            try:
                events += self._handle(packet, now)
            except ProtocolError as exc:
                events.append(self._close(exc.reason, str(exc), with_will=True))
        return events

    def _exceeds_receive_maximum(self, packet: Packet) -> bool:
        """5.0, section 3.3.4: a client may have at most Receive Maximum QoS 1/2 PUBLISHes without a PUBACK or
        (QoS 2) a PUBCOMP from us; one more is a protocol violation answered with DISCONNECT 0x93
        [MQTT-3.3.4-7]. (3.1.1 has no such limit: there the socket is not read until there is room.)"""
        if self.version != MQTT_5 or not isinstance(packet, Publish) or not packet.qos:
            return False
        if self.state is not State.CONNECTED:
            return False
        session = self._session()
        if packet.packet_id in self._unacked_in or packet.packet_id in session.qos2_received:
            return False  # a resend takes no new place
        return len(self._unacked_in) + len(session.qos2_received) >= self.limits.receive_maximum

    def _must_wait(self, packet: Packet) -> bool:
        """A QoS 1/2 PUBLISH waits while the inbound window is full (see the module's docstring)."""
        if not isinstance(packet, Publish) or not packet.qos or self.state is not State.CONNECTED:
            return False
        if len(self._unacked_in) < self.limits.receive_window or packet.packet_id in self._unacked_in:
            return False  # room, or a resend of one the broker is deciding on (takes no new place)
        return not (packet.qos == 2 and packet.packet_id in self._session().qos2_received)  # resend: PUBREC

    def connection_lost(self) -> list[Event]:
        """The network connection ended without a DISCONNECT."""
        if self.state is State.CLOSED:
            return []
        return [self._close(Reason.UNSPECIFIED_ERROR, "connection lost", with_will=True, send=False)]

    def tick(self, now: float) -> list[Event]:
        """Timeouts: CONNECT within connect_timeout; a packet within 1.5 x keepalive (section 3.1.2.10)."""
        if self.waiting:
            self.last_seen = now  # the client is not silent: we hold back what it sent (flow control)
            return []
        if self._connect_overdue(now):
            return [
                self._close(Reason.MAXIMUM_CONNECT_TIME, "no CONNECT in time", with_will=False, send=False)
            ]
        if self.state is State.CONNECTED and self.keepalive and now - self.last_seen > 1.5 * self.keepalive:
            return [self._close(Reason.KEEP_ALIVE_TIMEOUT, "keepalive timeout", with_will=True)]
        return []

    def _connect_overdue(self, now: float) -> bool:
        """No CONNECT within connect_timeout of the connection's creation (its accept)."""
        return (
            self.state is State.AWAIT_CONNECT
            and not self._deciding
            and now - self.created > self.limits.connect_timeout
        )

    def _handle(self, packet: Packet, now: float) -> list[Event]:
        if self.state is State.AWAIT_CONNECT:
            if not isinstance(packet, Connect):
                raise ProtocolError(Reason.PROTOCOL_ERROR, "first packet was not CONNECT")
            self.connect, self.version = packet, packet.protocol_level
            return [ConnectRequest(packet)]
        match packet:
            case Connect():
                raise ProtocolError(Reason.PROTOCOL_ERROR, "second CONNECT")  # section 3.1
            case Publish():
                return self._on_publish(packet, now)
            case Puback(packet_id=pid) | Pubcomp(packet_id=pid):
                self._settle(pid, now)
            case Pubrec(packet_id=pid, reason_code=code):
                msg = self._inflight().get(pid)
                if msg is not None and code < 0x80:
                    msg.released = True
                    self._send(Pubrel(pid))
                else:
                    self._settle(pid, now)
            case Pubrel(packet_id=pid):
                known = pid in self._session().qos2_received
                self._session().qos2_received.discard(pid)
                self._send(
                    Pubcomp(pid, 0 if known or self.version != MQTT_5 else Reason.PACKET_IDENTIFIER_NOT_FOUND)
                )
            case Subscribe():
                if self.version == MQTT_5 and packet.properties.get(Prop.SUBSCRIPTION_IDENTIFIER) is not None:
                    raise ProtocolError(  # announced as unavailable in CONNACK (section 3.2.2.3.12)
                        Reason.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                        "subscription identifiers are not supported",
                    )
                for sub in packet.subscriptions:
                    if sub.no_local and sub.topic_filter.startswith("$share/"):  # [MQTT-3.8.3-4]
                        raise ProtocolError(Reason.PROTOCOL_ERROR, "No Local on a shared subscription")
                return [SubscribeRequest(packet.packet_id, packet.subscriptions, packet.properties)]
            case Unsubscribe():
                return [UnsubscribeRequest(packet.packet_id, packet.topic_filters)]
            case Pingreq():
                self._send(Pingresp())
            case Disconnect(reason_code=code, properties=props):
                expiry = props.get(Prop.SESSION_EXPIRY_INTERVAL) if self.version == MQTT_5 else None
                if expiry is not None:
                    session = self._session()
                    if session.expiry_interval == 0 and expiry != 0:  # [MQTT-3.14.2-2]
                        raise ProtocolError(
                            Reason.PROTOCOL_ERROR,
                            "a Session Expiry Interval in DISCONNECT after 0 in CONNECT",
                        )
                    session.expiry_interval = min(expiry, self.limits.max_session_expiry)
                with_will = code == Reason.DISCONNECT_WITH_WILL
                return [self._close(code, "client disconnected", with_will=with_will, send=False)]
            case _:
                raise ProtocolError(
                    Reason.PROTOCOL_ERROR, f"unexpected {type(packet).__name__} from a client"
                )
        return []

    def _on_publish(self, p: Publish, now: float) -> list[Event]:
        topic = p.topic
        alias = None
        if self.version == MQTT_5 and p.properties.items:
            alias = p.properties.get(Prop.TOPIC_ALIAS)
            if alias is not None:
                if alias > self.limits.topic_alias_maximum:
                    raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} above the maximum")
                if topic:
                    self._aliases[alias] = topic
                elif alias in self._aliases:
                    topic = self._aliases[alias]
                else:
                    raise ProtocolError(Reason.PROTOCOL_ERROR, f"unknown topic alias {alias}")
        resolved = p
        if alias is not None:  # the alias is resolved here: nobody downstream sees it
            props = p.properties.without(Prop.TOPIC_ALIAS)
            resolved = Publish(topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, props)
        self.messages_in += 1
        if p.qos == 0:
            return [MessageReceived(0, resolved)]
        assert p.packet_id is not None
        if p.qos == 2 and p.packet_id in self._session().qos2_received:
            self._send(Pubrec(p.packet_id))  # a resend of one we have: acknowledge, do not deliver again
            return []
        if p.packet_id in self._unacked_in:
            return []  # the broker is still deciding on this one
        self._unacked_in[p.packet_id] = p.qos  # never beyond receive_window: see _must_wait
        return [MessageReceived(p.packet_id, resolved)]

    # ------------------------------------------------------------------ the broker's answers

    def accept_connect(
        self,
        session: SessionState,
        session_present: bool,
        assigned_client_id: str | None = None,
        now: float = 0.0,
    ) -> None:
        """Accept the CONNECT: CONNACK, then the session's unacknowledged and queued messages. All or nothing:
        if it raises, the connection is as before (still deciding, nothing to send) and may be refused."""
        if not self._deciding:
            raise ConnectionStateError(f"accept_connect in state {self.state.value} without a CONNECT")
        mark = len(self._out)
        try:
            self._accept(session, session_present, assigned_client_id, now)
        except BaseException:
            del self._out[mark:]
            self.state, self.session, self._will, self.keepalive = State.AWAIT_CONNECT, None, None, 0
            raise

    def _accept(
        self, session: SessionState, session_present: bool, assigned_client_id: str | None, now: float
    ) -> None:
        c = self.connect
        assert c is not None  # _deciding says so; for mypy
        self.session = session
        self.state = State.CONNECTED
        self.keepalive = self._keepalive(c.keepalive)
        self._will = c.will
        props: list[tuple[int, object]] = []
        if self.version == MQTT_5:
            self._peer_receive_max = min(
                self.limits.max_inflight, c.properties.get(Prop.RECEIVE_MAXIMUM, self.limits.max_inflight)
            )
            self._peer_max_packet = c.properties.get(Prop.MAXIMUM_PACKET_SIZE, 0)
            props = [
                (Prop.RECEIVE_MAXIMUM, self.limits.receive_maximum),
                (Prop.TOPIC_ALIAS_MAXIMUM, self.limits.topic_alias_maximum),
                (Prop.MAXIMUM_PACKET_SIZE, self.limits.max_packet_size),
                (Prop.SHARED_SUBSCRIPTION_AVAILABLE, 1),
                (Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0),
            ]
            if assigned_client_id:
                props.append((Prop.ASSIGNED_CLIENT_IDENTIFIER, assigned_client_id))
            if self.keepalive != c.keepalive:  # [MQTT-3.2.2-21]: the client must use this one
                props.append((Prop.SERVER_KEEP_ALIVE, self.keepalive))
        self._send(Connack(session_present, 0, Properties.of(props)))
        if session_present:  # resend what the sensor has not acknowledged (section 4.4)
            for pid, msg in sorted(session.inflight.items()):
                self._send_outbound(msg, pid, dup=not msg.released)
        self._pump(now)  # and what was queued for it while it was away

    def _keepalive(self, asked: int) -> int:
        """The keepalive the server uses. 5.0: the client's, within [min_keepalive, max_keepalive] (0, no
        keepalive, counts as longer than any), announced by Server Keep Alive when it differs. 3.1.1: the
        client's, always: the server cannot tell a 3.1.1 client another value, and must close after 1.5
        times the one it sent (section 3.1.2.10)."""
        if self.version != MQTT_5:
            return asked
        lo, hi = self.limits.min_keepalive, self.limits.max_keepalive
        if asked == 0:  # no keepalive: only a configured maximum bounds it (as AWS IoT's 1200 s)
            return hi if hi < 65535 else 0
        return max(lo, min(asked, hi))

    def reject_connect(self, reason: int, message: str = "") -> Closed:
        """Refuse the CONNECT with a CONNACK carrying `reason`; packets sent behind it are discarded."""
        if self.state is not State.AWAIT_CONNECT:
            raise ConnectionStateError(f"reject_connect in state {self.state.value}")
        code = reason if self.version == MQTT_5 else CONNACK_311.get(Reason(reason), 0x05)
        self._send(Connack(False, code))
        return self._close(
            reason, message or f"connection refused (0x{reason:02x})", with_will=False, send=False
        )

    def ack_message(self, token: int, reason: int = 0) -> None:
        """Acknowledge an inbound QoS 1/2 PUBLISH (token = its packet id): PUBACK, or PUBREC for QoS 2.

        3.1.1 has no reason codes: a refused message is acknowledged all the same (and dropped by the broker).
        """
        qos = self._unacked_in.pop(token, None)
        if qos is None or self.state is not State.CONNECTED:
            return
        code = reason if self.version == MQTT_5 else 0
        if qos == 1:
            self._send(Puback(token, code))
            return
        self._send(Pubrec(token, code))
        if code < 0x80:  # keep the id until PUBREL; a refused one is released at once (section 4.3.3)
            self._session().qos2_received.add(token)

    def _session(self) -> SessionState:
        assert self.session is not None
        return self.session

    def _inflight(self) -> dict[int, Outbound]:
        return self._session().inflight

    def suback(self, packet_id: int, codes: list[int]) -> None:
        if self.version != MQTT_5:
            codes = [c if c < 0x80 else 0x80 for c in codes]
        self._send(Suback(packet_id, tuple(codes)))

    def unsuback(self, packet_id: int, codes: list[int]) -> None:
        self._send(Unsuback(packet_id, tuple(codes) if self.version == MQTT_5 else ()))

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties,
        now: float,
        share: str | None = None,
    ) -> bool:
        """Queue a message for the sensor. False when it was dropped (queue full, or too large for it)."""
        session = self._session()
        expiry = properties.get(Prop.MESSAGE_EXPIRY_INTERVAL)
        msg = Outbound(topic, payload, qos, retain, properties, now + expiry if expiry is not None else None)
        msg.share = share
        if qos == 0 and self.state is not State.CONNECTED:
            return False  # QoS 0 is not kept for a disconnected session (section 3.1.2.4)
        if len(session.queued) >= self.limits.max_queued or (
            session.queued_bytes + len(payload) > self.limits.max_queued_bytes
        ):
            session.dropped += 1
            return False
        session.queued.append(msg)
        session.queued_bytes += len(payload)
        self._pump(now)
        return True

    def disconnect(self, reason: int, message: str) -> Closed:
        """Server-initiated close (takeover, revocation, shutdown): DISCONNECT in 5.0, then close."""
        return self._close(reason, message, with_will=reason != Reason.SUCCESS)

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        self.bytes_out += len(data)
        return data

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _send(self, packet: Packet) -> None:
        self._out += encode(packet, self.version or 4)

    def _pump(self, now: float) -> None:
        """Move queued messages into flight while the sensor's window allows."""
        if self.state is not State.CONNECTED:
            return
        session = self._session()
        while session.queued and (
            session.queued[0].qos == 0 or len(session.inflight) < self._peer_receive_max
        ):
            msg = session.queued.popleft()
            session.queued_bytes -= len(msg.payload)
            if msg.expires_at is not None and msg.expires_at <= now:
                continue  # expired while waiting (section 3.3.2.3.3)
            if msg.expires_at is not None:
                remaining = int(msg.expires_at - now)
                msg.properties = msg.properties.replaced(Prop.MESSAGE_EXPIRY_INTERVAL, max(remaining, 0))
            pid = None
            if msg.qos:
                pid = self._next_id(session)
                session.inflight[pid] = msg
            if not self._send_outbound(msg, pid, dup=False) and pid is not None:
                del session.inflight[pid]

    def _send_outbound(self, msg: Outbound, pid: int | None, dup: bool) -> bool:
        if msg.released and pid is not None:
            self._send(Pubrel(pid))
            return True
        props = msg.properties if self.version == MQTT_5 else Properties()
        packet = Publish(msg.topic, msg.payload, msg.qos, msg.retain, dup, pid, props)
        data = encode(packet, self.version)
        if self._peer_max_packet and len(data) > self._peer_max_packet:
            self._session().dropped += 1  # larger than the sensor accepts: discarded (section 3.1.2.11.4)
            return False
        self._out += data
        self.messages_out += 1
        return True

    def _settle(self, pid: int, now: float) -> None:
        self._session().inflight.pop(pid, None)
        self._pump(now)

    @staticmethod
    def _next_id(session: SessionState) -> int:
        for _ in range(65535):
            pid = session.next_id
            session.next_id = pid % 65535 + 1
            if pid not in session.inflight:
                return pid
        raise RuntimeError("no free packet identifier")  # cannot happen: inflight is bounded far below

    def _close(self, reason: int, message: str, with_will: bool, send: bool = True) -> Closed:
        if send and self.version == MQTT_5 and self.state is State.CONNECTED:
            self._send(Disconnect(reason))
        will = self._will if with_will and self.state is State.CONNECTED else None
        self.state = State.CLOSED
        self._will = None
        return Closed(reason, message, will)
