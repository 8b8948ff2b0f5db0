"""The downstream broker: sensors' connections, their sessions, policy, local delivery and forwarding.

Each connection runs through a sans-IO ServerConnection (core/mqtt/session.py); this module decides:
who may connect (client id rules, the admission check the registry fills in, limits, takeover), what a
sensor may publish and subscribe to (its bound policy), where messages go (local subscribers, and upstream
through the uplink under the mapped topic), and what happens at the end of a connection (will, session).

Bounds and what happens when they are hit (documented in docs/sensors.md):
- connections: max_connections; one more is refused at CONNECT with Server busy (5.0 0x89 / 3.1.1 3).
- per connection: packets over max_packet_size close it (0x95); with receive_maximum unacknowledged QoS 1/2
  publishes, its socket is not read until one is acknowledged (never a disconnect: session.py says why);
  packets behind a CONNECT wait for its decision; messages for it beyond max_queued_messages /
  max_queued_bytes are dropped and counted; a sensor that stops reading while its socket buffer holds more
  than max_queued_bytes is disconnected.
- retained messages: max_retained_messages, max_retained_bytes in all and max_retained_bytes_per_sensor; a
  message beyond them is not retained (it is still delivered; RETAINED_LIMITED, at most every 10 s), and a
  retained message's Message Expiry Interval (5.0) is honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.mqtt.packets import (
    MQTT_5,
    NO_PROPERTIES,
    Prop,
    Properties,
    Publish,
    Reason,
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
    State,
    SubscribeRequest,
    UnsubscribeRequest,
)
from gatewayd.core.mqtt.topics import BoundPolicy, Policy, TopicMap, aws_topic_problem
from gatewayd.core.mqtt.topics import policy_variables as variables
from gatewayd.service.downstream.admission import Admit, EarlyCloses, Peer, connect_refusal, peer_of
from gatewayd.service.downstream.retained import RetainedMessages
from gatewayd.service.downstream.sessions import StoredSession, queue_offline, session_expiry
from gatewayd.service.downstream.subscriptions import SharedGroup, Subscriptions, shared_parts
from gatewayd.service.downstream.wills import WillDelays
from gatewayd.service.downstream.writes import Writes

__all__ = ["Admit", "Broker", "Client", "Outbound", "Peer", "SharedGroup", "StoredSession", "shared_parts"]

log = logging.getLogger("gatewayd.broker")

RECEIVE_WINDOW = 100  # QoS 1/2 messages of one sensor being decided at once (gatewayd.core.mqtt.session)

READ_SIZE = 16384  # per read from a sensor: what may still arrive from each one after the spool says stop
MAX_ROUTES = 256  # cached publish decisions per sensor


@dataclass
class Client:
    conn: ServerConnection
    writer: asyncio.StreamWriter
    peer: Peer
    client_id: str
    policy: BoundPolicy
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # its serve loop: an answer is ready
    since: float = field(default_factory=time.time)
    # per topic this sensor published to: (None, the upstream topic) or (refusal reason, why); cleared when
    # the policy changes. Sensors publish to few topics; bounded all the same.
    routes: dict[str, tuple[int | None, str]] = field(default_factory=dict)


class Forwarding(Protocol):
    """What the broker needs of the way upstream (gatewayd.service.forwarder.Forwarder provides it)."""

    def forward(
        self,
        sensor: str,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        done: Callable[[int], None] | None,
    ) -> int | None:
        """A reason code now, or None: `done(reason)` follows once the message is stored durably."""
        ...

    async def room(self) -> None:
        """Returns when more may be read from sensors (flow control while the disk catches up)."""
        ...

    @property
    def accepting(self) -> bool:
        """False while room() would wait."""
        ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


class Broker:
    def __init__(self, config: Config, upstream: Forwarding | None, admit: Admit | None = None) -> None:
        self.upstream = upstream
        self.writes = Writes()
        self.admit: Admit = admit or (lambda peer, cid: None)
        self.clients: dict[str, Client] = {}
        self.sessions: dict[str, StoredSession] = {}
        self.early = EarlyCloses()  # connections ended before their CONNECT was accepted
        self.retained = RetainedMessages(config.downstream)
        topic_map = TopicMap.from_template(config.forwarding.upstream_topic, config.gateway.thing_name)
        self.subscriptions = Subscriptions(config, topic_map, upstream)
        self.upstream_refs = self.subscriptions.upstream_refs  # mapped upstream filter -> sessions holding it
        self.wills = WillDelays()
        self.dropped = 0
        # publish_as(): (client id, common name, topic) -> route, as Client.routes; cleared on reconfigure
        self._local_routes: dict[tuple[str, str, str], tuple[int | None, str]] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        d = config.downstream
        self.limits = Limits(
            max_packet_size=d.max_packet_size,
            receive_maximum=d.receive_maximum,
            receive_window=min(RECEIVE_WINDOW, d.receive_maximum),
            min_keepalive=d.keepalive_min,
            max_keepalive=d.keepalive_max,
            max_session_expiry=d.session_expiry_max,
            max_inflight=d.max_inflight,
            max_queued=d.max_queued_messages,
            max_queued_bytes=d.max_queued_bytes,
            connect_timeout=d.connect_timeout,
        )
        p = d.policy
        self.policy = Policy(p.publish, p.subscribe, p.deny_publish, p.deny_subscribe)
        self.topic_map = TopicMap.from_template(config.forwarding.upstream_topic, config.gateway.thing_name)
        self.retained.settings = d
        self.subscriptions.configure(config, self.topic_map)
        self._local_routes.clear()
        for client in self.clients.values():
            client.policy = self._bind(client.client_id, client.peer)
            client.routes.clear()
        thing = self.config.gateway.thing_name
        for client_id, stored in self.sessions.items():
            if stored.policy is not None:
                stored.policy = self.policy.bind(variables(client_id, stored.common_name, thing))

    def _bind(self, client_id: str, peer: Peer) -> BoundPolicy:
        return self.policy.bind(variables(client_id, peer.common_name, self.config.gateway.thing_name))

    # ------------------------------------------------------------------ one connection

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: str,
        accepted_at: float | None = None,
        connected: Callable[[], None] = lambda: None,
    ) -> None:
        """Run one sensor connection to its end. Nothing escapes but cancellation: a failure of ours (a bug)
        closes this connection only (SENSOR_CONNECTION_FAILED), never the listener or another sensor.
        `accepted_at` (monotonic): when the connection was accepted, from which connect_timeout counts;
        `connected` is called once its CONNECT is accepted."""
        try:
            peer = peer_of(writer, listener)
        except Exception as exc:  # nothing else can be said of this connection: log it and close it
            log.error(
                "sensor connection on %s failed before its first packet: %r", listener, exc, exc_info=exc,
                extra=logevents.extra(logevents.SENSOR_CONNECTION_FAILED, client_id="", reason="0x80",
                                     error=repr(exc)),
            )  # fmt: skip
            writer.close()
            return
        conn = ServerConnection(time.monotonic() if accepted_at is None else accepted_at, self.limits)
        wake = asyncio.Event()  # set when an acknowledgement lets held packets go on (conn.waiting)
        client: Client | None = None
        try:
            while not conn.closed:
                events = await self._next_events(conn, reader, wake)
                while events:  # then what waited behind them (packets after a CONNECT, a full window)
                    for event in events:
                        client = self._on_event(conn, writer, peer, client, event, wake) or client
                    if client is not None:
                        connected()
                    events = conn.resume(time.monotonic())
                self.writes.now(conn, writer)
                if (
                    client is not None
                    and writer.transport.get_write_buffer_size() > self.limits.max_queued_bytes
                ):
                    self._end(
                        client, conn.disconnect(Reason.QUOTA_EXCEEDED, "sensor does not read its socket")
                    )
                    self.writes.now(conn, writer)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("connection from %s: %s", peer.address, exc)
        except Exception as exc:
            self._failed(conn, writer, peer, client, exc)
        finally:
            try:
                if client is not None and not conn.closed:
                    lost = conn.connection_lost()
                    self._end(client, lost[0] if lost and isinstance(lost[0], Closed) else None)
            except Exception as exc:
                self._failed(conn, writer, peer, client, exc)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next_events(
        self, conn: ServerConnection, reader: asyncio.StreamReader, wake: asyncio.Event
    ) -> list[Any]:
        """The connection's next events: from held packets once an acknowledgement made room, else from the
        socket, else (every second) its timers. While packets are held, the socket is not read."""
        try:
            # asyncio.timeout, not wait_for: no task per read (measured: wait_for's tasks were 10% of the
            # daemon's CPU per message)
            async with asyncio.timeout(1.0):
                if conn.waiting:
                    await wake.wait()
                    wake.clear()
                    return conn.resume(time.monotonic())
                if self.upstream is not None and not self.upstream.accepting:  # TCP pushes back meanwhile
                    await self.upstream.room()
                data = await reader.read(READ_SIZE)
        except TimeoutError:
            return conn.tick(time.monotonic())
        return conn.receive(data, time.monotonic()) if data else conn.connection_lost()

    def _failed(
        self,
        conn: ServerConnection,
        writer: asyncio.StreamWriter,
        peer: Peer,
        client: Client | None,
        exc: BaseException,
    ) -> None:
        """One connection's handling failed (a bug): log it with its traceback and close that connection with
        0x80; a CONNECT being decided is refused (the stored session was not changed, see _connect)."""
        who = client.client_id if client is not None else (conn.connect.client_id if conn.connect else "")
        log.error(
            "sensor connection %s from %s failed: %r; closing it", who or "(before CONNECT)", peer.address,
            exc, exc_info=exc,
            extra=logevents.extra(logevents.SENSOR_CONNECTION_FAILED, client_id=who, reason="0x80",
                                 error=repr(exc)),
        )  # fmt: skip
        with contextlib.suppress(Exception):
            if conn.state is State.AWAIT_CONNECT and conn.connect is not None:
                conn.reject_connect(Reason.UNSPECIFIED_ERROR, f"internal error: {exc!r}")
            elif client is not None and not conn.closed:
                self._end(client, conn.disconnect(Reason.UNSPECIFIED_ERROR, f"internal error: {exc!r}"))
            elif not conn.closed:
                conn.disconnect(Reason.UNSPECIFIED_ERROR, f"internal error: {exc!r}")
            self.writes.now(conn, writer)
        writer.close()

    def _on_event(
        self,
        conn: ServerConnection,
        writer: asyncio.StreamWriter,
        peer: Peer,
        client: Client | None,
        event: object,
        wake: asyncio.Event,
    ) -> Client | None:
        match event:
            case ConnectRequest(connect=connect):
                return self._connect(conn, writer, peer, connect, wake)
            case MessageReceived(token=token, publish=publish) if client is not None:
                done = self._acknowledger(conn, writer, peer, client, token) if publish.qos else None
                reason = self._inbound(client, publish, done)
                if publish.qos and reason is not None:
                    conn.ack_message(token, reason)
            case SubscribeRequest(packet_id=pid, subscriptions=subs) if client is not None:
                conn.suback(pid, [self._subscribe(client, s) for s in subs])
            case UnsubscribeRequest(packet_id=pid, topic_filters=filters) if client is not None:
                conn.unsuback(pid, [self._unsubscribe(client.client_id, f) for f in filters])
            case Closed() as closed:
                if client is not None:
                    self._end(client, closed)
                elif closed.reason >= 0x80:
                    self.early.closed(peer.address, closed.message)
        return None

    def _acknowledger(
        self, conn: ServerConnection, writer: asyncio.StreamWriter, peer: Peer, client: Client, token: int
    ) -> Callable[[int], None]:
        """The callback that acknowledges one QoS 1/2 message once it is stored (called by the forwarder,
        possibly after the connection ended: then it is a no-op). It wakes the connection's loop, which may
        hold packets for the room this acknowledgement makes. A failure here is this connection's, never
        the forwarder's."""

        def durable(reason: int) -> None:
            try:
                conn.ack_message(token, reason)
                self.writes.soon(conn, writer)
            except Exception as exc:
                self._failed(conn, writer, peer, client, exc)
            finally:
                client.wake.set()

        return durable

    # ------------------------------------------------------------------ connect

    def _connect(
        self, conn: ServerConnection, writer: asyncio.StreamWriter, peer: Peer, c: Any, wake: asyncio.Event
    ) -> Client | None:
        """Decide a CONNECT. The stored session changes only once the connection is accepted: the CONNECT is
        answered on a copy of the stored session, which replaces it only then, so a failure on the way
        (a bug, see serve) leaves the stored session exactly as it was before this CONNECT."""
        client_id = c.client_id or peer.common_name
        if not client_id and (c.protocol_level == MQTT_5 or c.clean_start):
            # no client id and no certificate to name the sensor (a plain or unix listener): the server
            # assigns one (3.1.1 and 5.0 [MQTT-3.1.3-6]; 5.0 tells it in CONNACK [MQTT-3.1.3-7])
            client_id = self._assigned_id()
        refusal = connect_refusal(self.config, peer, client_id, self.clients, len(self.clients), self.admit)
        if refusal is not None:
            log.warning(
                "refused %s from %s: %s", client_id or "(no client id)", peer.address, refusal[1],
                extra=logevents.extra(logevents.SENSOR_REFUSED, client_id=client_id, reason=refusal[1],
                                     certificate_id=peer.certificate_id or ""),
            )  # fmt: skip
            conn.reject_connect(refusal[0], refusal[1])
            return None
        policy = self._bind(client_id, peer)
        expiry = session_expiry(c, self.config.downstream.session_expiry_max)
        old = self.clients.get(client_id)
        if old is not None:  # session takeover (section 3.1.4): the newer connection wins; the old one's end
            # settles the session as any end does (5.0: an expiry of 0 ends it with that connection)
            self._end(old, old.conn.disconnect(Reason.SESSION_TAKEN_OVER, "session taken over"))
            self.writes.now(old.conn, old.writer)
            old.writer.close()
        stored = self.sessions.get(client_id)
        now = time.monotonic()
        if stored is not None and stored.expires_at is not None and stored.expires_at <= now:
            self._session_ended(client_id)  # expired since (the sweep runs every few seconds)
            stored = None
        present = stored is not None and not c.clean_start
        state = stored.state.copy() if stored is not None and present else SessionState(client_id)
        state.expiry_interval = expiry
        conn.accept_connect(state, present, client_id if not c.client_id else None, time.monotonic())
        # accepted: from here on the new session is the stored one
        self.wills.reconnected(client_id, present)
        if stored is not None and present:
            stored.state, stored.expires_at = state, None
        else:
            if stored is not None:
                self._drop_session(client_id)
            self.sessions[client_id] = StoredSession(state)
        self.sessions[client_id].policy, self.sessions[client_id].common_name = policy, peer.common_name
        self.subscriptions.reindex(client_id, self.sessions[client_id].state.subscriptions)
        client = Client(conn, writer, peer, client_id, policy, wake)
        self.clients[client_id] = client
        log.info(
            "sensor %s connected from %s (MQTT %s, %s session)", client_id, peer.address,
            "5.0" if c.protocol_level == MQTT_5 else "3.1.1", "resumed" if present else "new",
            extra=logevents.extra(
                logevents.SENSOR_CONNECTED, client_id=client_id, certificate_id=peer.certificate_id or ""
            ),
        )  # fmt: skip
        return client

    def _assigned_id(self) -> str:
        while True:
            candidate = f"auto-{secrets.token_hex(8)}"
            if candidate not in self.sessions:
                return candidate

    # ------------------------------------------------------------------ messages

    def _inbound(self, client: Client, p: Publish, durable: Callable[[int], None] | None) -> int | None:
        """Route one publish from a sensor; returns the reason code for its PUBACK/PUBREC, or None when the
        acknowledgement waits until the upstream copy is stored (`durable` sends it)."""
        route = client.routes.get(p.topic)
        if route is None:
            route = self._route(client, p.topic)
            if len(client.routes) >= MAX_ROUTES:
                client.routes.clear()
            client.routes[p.topic] = route
        refusal, upstream_topic = route  # when refused: why, instead of the topic
        if refusal is not None:
            log.warning("sensor %s %s", client.client_id, upstream_topic)
            return refusal
        reason: int | None = Reason.SUCCESS
        if self.upstream is not None:  # AWS IoT has no QoS 2: upstream it is QoS 1
            reason = self.upstream.forward(client.client_id, upstream_topic, p.payload, p.qos, False, durable)
            if reason is not None and reason >= 0x80:
                return reason  # refused (too large for AWS IoT): not delivered locally either
        self.retained.keep(p, client.client_id)
        self._fan_out(p.topic, p.payload, p.qos, p.retain, p.properties, sender=client.client_id)
        return reason

    def publish_as(
        self, client_id: str, common_name: str, topic: str, payload: bytes, qos: int
    ) -> int | None:
        """A message from a sensor that is not an MQTT connection (a serial sensor): the same policy, topic
        mapping, spool and quotas, and local subscribers get it too. Returns a reason code >= 0x80 when it
        is refused; nothing acknowledges it (the spool stores it durably before the uplink sends it)."""
        key = (client_id, common_name, topic)
        route = self._local_routes.get(key)
        if route is None:  # decided once per sensor and topic, like a connection's routes
            policy = self.policy.bind(variables(client_id, common_name, self.config.gateway.thing_name))
            route = self._route_with(policy, topic)
            if len(self._local_routes) >= MAX_ROUTES:
                self._local_routes.clear()
            self._local_routes[key] = route
        refusal, upstream_topic = route
        if refusal is not None:
            log.warning("serial sensor %s %s", client_id, upstream_topic)
            return refusal
        if self.upstream is not None:

            def stored(reason: int) -> None:
                if reason >= 0x80:
                    log.warning("serial sensor %s: a record was not stored (0x%02x)", client_id, reason)

            reason = self.upstream.forward(
                client_id, upstream_topic, payload, qos, False, stored if qos else None
            )
            if reason is not None and reason >= 0x80:
                return reason
        self._fan_out(topic, payload, qos, False, NO_PROPERTIES, sender=client_id)
        return None

    def _route(self, client: Client, topic: str) -> tuple[int | None, str]:
        return self._route_with(client.policy, topic)

    def _route_with(self, policy: BoundPolicy, topic: str) -> tuple[int | None, str]:
        if not policy.may_publish(topic):
            return Reason.NOT_AUTHORIZED, f"may not publish to {topic}: dropped"
        upstream_topic = self.topic_map.upstream(topic)
        problem = aws_topic_problem(upstream_topic)
        if problem:
            return Reason.TOPIC_NAME_INVALID, f"published to {topic}: {problem}; dropped"
        return None, upstream_topic

    def expire_retained(self, now: float) -> None:
        self.retained.expire(now)

    def _fan_out(
        self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties, sender: str | None
    ) -> None:
        now = time.monotonic()
        for client_id, sub in self.subscriptions.match(topic).items():
            stored = self.sessions.get(client_id)
            if stored is None or (sub.no_local and client_id == sender):
                continue
            client = self.clients.get(client_id)
            policy = client.policy if client is not None else stored.policy
            if policy is not None and not (
                policy.may_subscribe(sub.topic_filter) and policy.may_receive(topic)
            ):
                continue  # a denied topic under a broad subscription, or the policy changed on reload
            out_qos = min(qos, sub.qos)
            keep_retain = retain and sub.retain_as_published
            if client is not None:
                if not client.conn.deliver(topic, payload, out_qos, keep_retain, props, now):
                    self.dropped += 1
                self.writes.soon(client.conn, client.writer)
            elif out_qos and not queue_offline(
                stored.state, topic, payload, out_qos, props, now, self.limits
            ):
                self.dropped += 1
        if self.subscriptions.shared:
            self._share_out(topic, payload, qos, props, now)

    def publish_event(self, topic: str, payload: bytes) -> None:
        """An event of the gateway's own (AWS IoT's $aws/events/... topics) to the local subscribers, QoS 1;
        never forwarded."""
        self._fan_out(topic, payload, 1, False, NO_PROPERTIES, sender=None)

    def on_upstream_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A message from AWS IoT: to the sensors that subscribed to its mapped topic."""
        local = self.topic_map.downstream(topic)
        if local is None:
            log.debug("upstream message on %s is not under the forwarding prefix", topic)
            return
        self._fan_out(local, payload, qos, False, Properties(), sender=None)

    # ------------------------------------------------------------------ subscriptions

    def _subscribe(self, client: Client, s: Subscription) -> int:
        share = shared_parts(s.topic_filter)
        if share is not None and not share[1]:
            return Reason.TOPIC_FILTER_INVALID  # $share/<name>/<filter>, the name without / + # (4.8.2)
        inner = share[1] if share is not None else s.topic_filter
        if not client.policy.may_subscribe(inner):  # a shared subscription: judged on its filter
            log.warning("sensor %s may not subscribe to %s", client.client_id, s.topic_filter)
            return Reason.NOT_AUTHORIZED
        stored = self.sessions[client.client_id]
        existed = s.topic_filter in stored.state.subscriptions
        forwarded = self.subscriptions.forwarded(s.topic_filter)
        refusal = (
            None
            if existed
            else self.subscriptions.refusal(stored.state.subscriptions, s.topic_filter, forwarded)
        )
        if refusal is not None:
            log.warning(
                "sensor %s may not subscribe to %s: %s", client.client_id, s.topic_filter, refusal[1],
                extra=logevents.extra(logevents.SUBSCRIPTION_REFUSED, client_id=client.client_id,
                                     topic_filter=s.topic_filter, reason=refusal[1]),
            )  # fmt: skip
            return refusal[0]
        if not existed and forwarded and not self.subscriptions.ref_upstream(s.topic_filter):
            return Reason.QUOTA_EXCEEDED
        stored.state.subscriptions[s.topic_filter] = s
        self.subscriptions.add(client.client_id, s)
        if share is not None:  # no retained messages for a shared subscription (5.0 section 4.8.2)
            return s.qos
        if s.retain_handling == 0 or (s.retain_handling == 1 and not existed):  # section 3.3.1.3
            now = time.monotonic()
            for topic, p in self.retained.matching(s.topic_filter, now):
                if client.policy.may_receive(topic):
                    client.conn.deliver(topic, p.payload, min(p.qos, s.qos), True, p.properties, now)
        return s.qos

    def _unsubscribe(self, client_id: str, topic_filter: str) -> int:
        stored = self.sessions.get(client_id)
        self.subscriptions.remove(client_id, topic_filter)
        if stored is None or stored.state.subscriptions.pop(topic_filter, None) is None:
            return Reason.NO_SUBSCRIPTION_EXISTED
        if self.subscriptions.forwarded(topic_filter):
            self.subscriptions.unref_upstream(topic_filter)
        return Reason.SUCCESS

    # shared subscriptions ($share/<group>/<filter>): each message to one member of the group

    def _share_out(self, topic: str, payload: bytes, qos: int, props: Properties, now: float) -> None:
        """One delivery per shared subscription matching the topic: the next connected member in turn that
        may receive it (round robin), else, for QoS 1/2, the next member's session kept while it is away."""
        for key, group in self.subscriptions.groups_matching(topic):
            members = list(group.members.items())
            turn = group.turn
            group.turn += 1
            candidates = members[turn % len(members) :] + members[: turn % len(members)]
            target = next(
                ((cid, sub) for cid, sub in candidates
                 if cid in self.clients and self.clients[cid].policy.may_receive(topic)),
                None,
            )  # fmt: skip
            if target is not None:
                cid, sub = target
                self._deliver_shared(self.clients[cid], topic, payload, min(qos, sub.qos), props, now, key)
                continue
            for cid, sub in candidates:
                stored = self.sessions.get(cid)
                allowed = stored is not None and (stored.policy is None or stored.policy.may_receive(topic))
                out_qos = min(qos, sub.qos)
                if allowed and out_qos and stored is not None:
                    if not queue_offline(stored.state, topic, payload, out_qos, props, now, self.limits, key):
                        self.dropped += 1
                    break

    def _hand_over_shared(self, client_id: str) -> None:
        """A member of shared subscriptions disconnected: the messages it had from them and had not
        acknowledged (in flight or queued) go to another connected member of the same group (5.0 section
        4.8.2), so a stopped worker does not hold the group's messages back."""
        stored = self.sessions.get(client_id)
        if stored is None or not self.subscriptions.shared:
            return
        state, now = stored.state, time.monotonic()
        for pid, msg in list(state.inflight.items()):
            if msg.share is not None and not msg.released and self._redeliver(client_id, msg, now):
                del state.inflight[pid]
        kept = deque(m for m in state.queued if m.share is None or not self._redeliver(client_id, m, now))
        state.queued_bytes = sum(len(m.payload) for m in kept)
        state.queued = kept

    def _redeliver(self, leaving: str, msg: Outbound, now: float) -> bool:
        group = self.subscriptions.shared.get(msg.share or "")
        if group is None:
            return False
        for cid, sub in group.members.items():
            client = self.clients.get(cid)
            if cid != leaving and client is not None and client.policy.may_receive(msg.topic):
                qos = min(msg.qos, sub.qos)
                self._deliver_shared(client, msg.topic, msg.payload, qos, msg.properties, now, msg.share)
                return True
        return False

    def _deliver_shared(
        self,
        client: Client,
        topic: str,
        payload: bytes,
        qos: int,
        props: Properties,
        now: float,
        key: str | None,
    ) -> None:
        """One shared subscription's message to the member chosen for it; counted in `dropped` when the
        member's queue is full."""
        if not client.conn.deliver(topic, payload, qos, False, props, now, share=key):
            self.dropped += 1
        self.writes.soon(client.conn, client.writer)

    # ------------------------------------------------------------------ the end of a connection

    def _end(self, client: Client, closed: Closed | None, detail: str = "") -> None:
        """A connection ended: the client and its session's expiry are settled first, so that nothing after
        (the log, the will) can leave a session that never expires."""
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        stored = self.sessions.get(client.client_id)
        if stored is not None and client.client_id not in self.clients:
            self._hand_over_shared(client.client_id)
            if stored.state.expiry_interval == 0:
                self._drop_session(client.client_id)
            else:
                stored.expires_at = time.monotonic() + stored.state.expiry_interval
        client.wake.set()
        reason = closed.reason if closed is not None else Reason.UNSPECIFIED_ERROR
        log.info(
            "sensor %s disconnected (0x%02x%s)", client.client_id, reason,
            f": {closed.message}" if closed and closed.message else f": {detail}" if detail else "",
            extra=logevents.extra(
                logevents.SENSOR_DISCONNECTED, client_id=client.client_id, reason=f"0x{reason:02x}"
            ),
        )  # fmt: skip
        if closed is not None and closed.will is not None:
            delay = closed.will.properties.get(Prop.WILL_DELAY_INTERVAL) or 0
            stored = self.sessions.get(client.client_id)
            if delay and stored is not None and stored.expires_at is not None:
                # 5.0 section 3.1.3.2.2: after the Will Delay Interval or when the session ends, whichever
                # comes first; a new connection to the session before then cancels it [MQTT-3.1.3-9]
                will = closed.will
                due = min(delay, stored.state.expiry_interval)
                self.wills.wait(client.client_id, due, lambda: self._publish_will(client, will))
            else:
                self._publish_will(client, closed.will)

    def _publish_will(self, client: Client, will: Will) -> None:
        """Publish a will as its sensor's message (its policy, mapping and spool). Never raises: a failure of
        ours is logged, the connection has ended and its session is settled."""
        try:
            self._publish_will_now(client, will)
        except Exception as exc:
            log.error(
                "will of %s not published: %r", client.client_id, exc, exc_info=exc,
                extra=logevents.extra(logevents.SENSOR_CONNECTION_FAILED, client_id=client.client_id,
                                     reason="0x80", error=repr(exc)),
            )  # fmt: skip

    def _publish_will_now(self, client: Client, will: Will) -> None:
        props = will.properties.without(Prop.WILL_DELAY_INTERVAL)
        reason = self._inbound(
            client,
            Publish(will.topic, will.payload, will.qos, will.retain, properties=props),
            lambda reason: None,  # a will has nobody to acknowledge
        )
        if reason is not None and reason >= 0x80:
            log.warning("will of %s on %s not published (0x%02x)", client.client_id, will.topic, reason)

    def _drop_session(self, client_id: str) -> None:
        stored = self.sessions.pop(client_id, None)
        self.subscriptions.drop(client_id, list(stored.state.subscriptions) if stored is not None else [])

    def _session_ended(self, client_id: str) -> None:
        """A disconnected session's expiry passed: a will still waiting for its delay goes now."""
        self._drop_session(client_id)
        self.wills.session_ended(client_id)

    def expire_sessions(self, now: float) -> None:
        """Sessions whose expiry passed, and retained messages whose Message Expiry Interval did."""
        for client_id, stored in list(self.sessions.items()):
            if client_id not in self.clients and stored.expires_at is not None and stored.expires_at <= now:
                self._session_ended(client_id)
        self.retained.expire(now)

    # ------------------------------------------------------------------ administration

    def list_connections(self) -> list[dict[str, Any]]:
        return [
            {
                "clientId": c.client_id,
                "transport": "mqtt",
                "certificateId": c.peer.certificate_id,
                "commonName": c.peer.common_name,
                "address": c.peer.address,
                "listener": c.peer.listener,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.since)),
                "bytesIn": c.conn.bytes_in,
                "bytesOut": c.conn.bytes_out,
                "messagesIn": c.conn.messages_in,
                "messagesOut": c.conn.messages_out,
                "subscriptions": sorted(self.sessions[c.client_id].state.subscriptions),
            }
            for c in sorted(self.clients.values(), key=lambda c: c.client_id)
        ]

    def enforce_admission(self) -> int:
        """Disconnect every connected sensor the admission check would refuse now (after a registry change:
        a certificate or its CA no longer ACTIVE). Returns how many were disconnected."""
        closed = 0
        for client in list(self.clients.values()):
            if client.peer.certificate_id is None:
                continue
            refusal = self.admit(client.peer, client.client_id)
            if refusal is None:
                continue
            log.warning(
                "disconnecting sensor %s: %s", client.client_id, refusal[1],
                extra=logevents.extra(logevents.SENSOR_ADMISSION_REVOKED, client_id=client.client_id,
                                     certificate_id=client.peer.certificate_id, reason=refusal[1]),
            )  # fmt: skip
            # its will is not published: the certificate no longer speaks for anyone (issue 17, item 11)
            self.disconnect(client.client_id, refusal[0], refusal[1], with_will=False)
            closed += 1
        return closed

    def disconnect(
        self,
        client_id: str,
        reason: int = Reason.ADMINISTRATIVE_ACTION,
        why: str = "disconnected by the administrator",
        with_will: bool = True,
    ) -> bool:
        client = self.clients.get(client_id)
        if client is None:
            return False
        closed = client.conn.disconnect(reason, why)
        if not with_will and closed is not None and closed.will is not None:
            closed = dataclasses.replace(closed, will=None)
        self._end(client, closed)
        self.writes.now(client.conn, client.writer)
        client.writer.close()
        return True
