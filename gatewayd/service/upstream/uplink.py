"""The uplink as the daemon sees it: a publish API with per-message acknowledgement, subscriptions, and a
supervised child process (gatewayd.service.upstream.uplink_child) that holds the TLS connection.

The daemon owns every message: `publish()` queues it, at most `window` (AWS IoT Core: 100) are in flight to
the child at once, and a message is done only when the child reports its PUBACK. A message the child reports
as not delivered (connection lost, child died) goes back to the head of the queue and is sent again: delivery
is at-least-once. Subscriptions are kept here and sent again after every reconnect.

Before each child start, `prepare()` (given by the daemon) checks the identity and returns the connection
parameters, or the reason the gateway cannot connect yet (no certificate, expired, TPM unavailable...); the
uplink then waits, retrying every `blocked_retry` seconds or at once on `kick()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from gatewayd.core import ipc, logevents
from gatewayd.core.backoff import Backoff
from gatewayd.core.errors import IllegalTransition, UplinkError, UplinkRefused
from gatewayd.core.shaping import Quota, Shaper
from gatewayd.core.uplinkstate import UplinkEvent, UplinkMachine

log = logging.getLogger("gatewayd.uplink")

EXIT_BAD_SETUP = 3  # uplink_child: certificate/key/bundle unusable


@dataclass(frozen=True)
class Blocked:
    """The gateway cannot connect yet, and why (shown in status and logged)."""

    reason: str
    state: str = "blocked"  # or "waiting-for-tpm"


@dataclass(frozen=True)
class ChildSpec:
    config: dict[str, Any]  # the CONFIG frame: endpoint, port, client_id, files, alpn, keepalive...
    env: dict[str, str]  # extra environment (OPENSSL_CONF, TPM2OPENSSL_TCTI)


Done = Callable[[BaseException | None], None]  # called with None once acknowledged, else with the error


@dataclass
class _Outgoing:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    done: asyncio.Future[None] | None = None  # enqueue()
    callback: Done | None = None  # send(): no future, for the forwarder's many messages
    finished: bool = False

    def finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.done is not None and not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
        if self.callback is not None:
            self.callback(error)

    def abandoned(self) -> bool:
        """Finished, or its future was cancelled by whoever awaited it: not to be sent."""
        return self.finished or (self.done is not None and self.done.cancelled())


@dataclass
class UplinkStatus:
    state: str = "starting"
    since: float = field(default_factory=time.time)
    last_error: str = ""
    connected_since: float | None = None
    child_pid: int | None = None
    queued: int = 0
    inflight: int = 0
    published: int = 0  # publishes sent since start
    throttled: bool = False  # the quota held a publish back within the last two seconds
    throttled_seconds: float = 0.0  # total time publishes waited for the quota
    connect_attempts: int = 0  # CONNECT attempts since start (trial connections included)
    next_attempt_at: float | None = None  # wall-clock time of the next attempt while waiting on the backoff


class _Rate:
    """Publishes per second over the last `span` seconds, from per-second counts."""

    def __init__(self, span: int = 10) -> None:
        self.span = span
        self._counts: deque[list[int]] = deque()  # [second, count]

    def add(self, now: float) -> None:
        second = int(now)
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1][1] += 1
        else:
            self._counts.append([second, 1])
        while self._counts[0][0] <= second - self.span:
            self._counts.popleft()

    def rate(self, now: float) -> float:
        first = int(now) - self.span
        return sum(c for s, c in self._counts if s > first) / self.span


MessageHandler = Callable[[str, bytes, int, bool], None]
_FAILURE_EVENTS = {
    "failed": UplinkEvent.CONNECT_FAILED,
    "refused": UplinkEvent.CONNACK_REFUSED,
    "setup-failed": UplinkEvent.SETUP_FAILED,
}


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a message future's exception as seen: nobody may be awaiting an enqueued message."""
    if not future.cancelled():
        future.exception()


class Uplink:
    def __init__(
        self,
        prepare: Callable[[], Awaitable[ChildSpec | Blocked]],
        on_message: MessageHandler,
        on_state: Callable[[UplinkStatus], None] = lambda s: None,
        window: int = 100,
        max_queued: int = 10000,
        blocked_retry: float = 30.0,
        reconnect_max_delay: float = 120.0,
        trial: bool = False,
        quota: Quota | None = None,
    ) -> None:
        self.prepare = prepare
        self.trial = (
            trial  # a renewal's trial connection: logs at debug level, without the uplink's MESSAGE_IDs
        )
        self.on_message = on_message
        self.on_state = on_state
        self.window = quota.max_inflight if quota is not None else window
        self.filters_per_subscribe = quota.filters_per_subscribe if quota is not None else 8
        self._shaper = Shaper(quota) if quota is not None else None
        self._rate = _Rate()
        self._throttled_at = -100.0
        self._held_since: float | None = None
        self.max_queued = max_queued
        self.blocked_retry = blocked_retry
        self.status = UplinkStatus()
        self._machine = UplinkMachine(self.status.since)
        self._queue: deque[_Outgoing] = deque()
        self._inflight: dict[int, _Outgoing] = {}
        self._ids = 0
        self._subscriptions: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._restart = Backoff(cap=reconnect_max_delay)
        self._generation = 0  # bumped by restart(): a child of an older generation was stopped on purpose
        self._restart_why = "switch or prove the identity"
        self._running = asyncio.Event()  # cleared while suspended
        self._running.set()
        self._in_child = False
        self._child_generation = 0
        self._suback_waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._last_connect_attempt: float | None = None

    # ------------------------------------------------------------------ public API

    def enqueue(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> asyncio.Future[None]:
        """Accept a message for upstream now (UplinkError when the queue is full); the future resolves once
        AWS IoT acknowledged it (QoS 1) or it was handed to the socket (QoS 0)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._add(topic, payload, qos, retain, future, None)
        return future

    def send(self, topic: str, payload: bytes, qos: int, callback: Done) -> None:
        """enqueue() without a future: `callback(None)` once acknowledged, `callback(error)` if it never
        will be (UplinkRefused: never sendable; UplinkError: gatewayd is stopping)."""
        self._add(topic, payload, qos, False, None, callback)

    def _add(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
        callback: Done | None,
    ) -> None:
        if len(self._queue) >= self.max_queued:
            raise UplinkError(f"uplink queue full ({self.max_queued} messages)")
        self._ids += 1
        self._queue.append(_Outgoing(self._ids, topic, payload, qos, retain, future, callback))
        self._wake_sender.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """enqueue() and wait for the acknowledgement."""
        await asyncio.shield(self.enqueue(topic, payload, qos, retain))

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = qos
        if self._connected:
            self._send(ipc.json_frame(ipc.Kind.SUBSCRIBE, {"filters": [[topic_filter, qos]]}))

    async def subscribed(self, topic_filters: list[str], timeout: float, qos: int = 1) -> None:
        """Subscribe and wait until AWS IoT acknowledged every filter (SUBACK), also across a reconnect;
        UplinkError when it refused one or did not answer in time."""
        loop = asyncio.get_running_loop()
        waiters = {f: loop.create_future() for f in topic_filters}
        for f, fut in waiters.items():
            self._suback_waiters.setdefault(f, []).append(fut)
        try:
            for f in topic_filters:
                self.subscribe(f, qos)
            async with asyncio.timeout(timeout):
                for f, fut in waiters.items():
                    if not await fut:
                        raise UplinkError(f"AWS IoT refused the subscription to {f}")
        except TimeoutError:
            raise UplinkError(f"no SUBACK for {', '.join(topic_filters)} within {timeout:g} s") from None
        finally:
            for f, fut in waiters.items():
                pending = self._suback_waiters.get(f, [])
                if fut in pending:
                    pending.remove(fut)
                if not pending:
                    self._suback_waiters.pop(f, None)

    def unsubscribe(self, topic_filter: str) -> None:
        if self._subscriptions.pop(topic_filter, None) is not None and self._connected:
            self._send(ipc.json_frame(ipc.Kind.UNSUBSCRIBE, {"filters": [topic_filter]}))

    def kick(self) -> None:
        """Try again now (identity installed, TPM appeared, network changed)."""
        self._restart.reset_now()
        self._kick.set()

    def network_changed(self, addresses: list[str] | None) -> None:
        """The network changed (interface, link or address): one attempt now instead of after the backoff;
        the child drops a connection whose local address is not among `addresses` (None: unknown, so none
        is dropped). Never more than one CONNECT a second."""
        self._restart.reset_now()
        if self._writer is not None:
            self._send(ipc.json_frame(ipc.Kind.NETWORK, {"addresses": addresses}))
        self._kick.set()  # blocked, or between two children: prepare again now

    def restart(self, why: str = "switch or prove the identity") -> None:
        """Reconnect now with whatever identity is live (after a renewal or a rollback; or the TPM went and
        preparing blocks): the child is told to stop (MQTT DISCONNECT); what it had in flight goes back to
        the head of the queue (at-least-once). `why` completes the log line "disconnected from AWS IoT to"."""
        self._restart_why = why
        self._restart.reset_now()
        self._generation += 1
        if self._writer is not None:
            self._send(ipc.frame(ipc.Kind.STOP, b""))
        self._kick.set()

    async def suspend(self, timeout: float = 10.0) -> None:
        """Disconnect and stay disconnected until resume(); messages wait in the queue. For a trial
        connection that must use the same client id (AWS IoT allows one connection per client id)."""
        self._running.clear()
        self.restart()
        deadline = time.monotonic() + timeout
        while self._in_child:  # a child running or being started: it is told to stop as soon as it can hear
            if time.monotonic() > deadline and self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
            await asyncio.sleep(0.02)

    def resume(self) -> None:
        self._running.set()
        self.kick()

    def closing(self) -> bool:
        return self._closing  # a method, so type narrowing of the attribute does not outlive an await

    @property
    def inflight(self) -> int:
        """Messages sent and not acknowledged yet."""
        return len(self._inflight)

    @property
    def backlog(self) -> int:
        """Messages queued and not sent yet (waiting for the window, the quota or the connection)."""
        return len(self._queue)

    @property
    def connected(self) -> bool:
        return self._connected

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Uplink:
        self._task = asyncio.create_task(self._supervise(), name="uplink")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        self._kick.set()
        if self._writer is not None:
            self._send(ipc.frame(ipc.Kind.STOP, b""))
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for msg in [*self._inflight.values(), *self._queue]:
            msg.finish(UplinkError("gatewayd is stopping"))

    # ------------------------------------------------------------------ supervision

    def _set(self, event: UplinkEvent, error: str | None = None) -> None:
        """Feed the state machine (core/uplinkstate.py) and publish its state in `status`. A report the
        machine refuses is logged and changes nothing."""
        try:
            self._machine.fire(event, time.time(), error)
        except IllegalTransition as exc:
            log.error("%s; ignored", exc)
            return
        m = self._machine
        self._connected = m.connected
        self.status.state, self.status.since, self.status.last_error = m.state.value, m.since, m.last_error
        self.status.connected_since, self.status.connect_attempts = m.connected_since, m.connect_attempts
        self.status.queued, self.status.inflight = len(self._queue), len(self._inflight)
        self.on_state(self.status)

    async def _wait_kick(self, seconds: float) -> None:
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), seconds)

    async def _supervise(self) -> None:
        while not self._closing:
            try:
                await self._attempt()
            except Exception:  # nothing a child process does may end supervision
                log.exception("uplink supervision failed; retrying")
                self._restart.failed()
                await self._wait_kick(self._restart.delay(time.monotonic(), random.random()))

    async def _attempt(self) -> None:
        """Prepare, run one child until it exits, and wait as long as the outcome says."""
        if not self._running.is_set():
            self._set(UplinkEvent.SUSPEND, "")
            await self._running.wait()
            return
        generation = self._generation
        spec = await self.prepare()
        if generation != self._generation or not self._running.is_set():
            return  # restarted or suspended while preparing: prepare again with what is live now
        if isinstance(spec, Blocked):
            if self.status.state != spec.state or self.status.last_error != spec.reason:
                log.warning(
                    "cannot connect: %s",
                    spec.reason,
                    extra=logevents.extra(logevents.UPLINK_BLOCKED, reason=spec.reason),
                )
            self._set(
                UplinkEvent.TPM_ABSENT if spec.state == "waiting-for-tpm" else UplinkEvent.BLOCKED,
                spec.reason,
            )
            await self._wait_kick(self.blocked_retry)
            return
        exit_code = await self._run_child(spec, generation)
        if self.closing():
            return
        if generation != self._generation:  # stopped on purpose: connect again at once (or stay suspended)
            return
        if exit_code == EXIT_BAD_SETUP:
            await self._wait_kick(self.blocked_retry)
            return
        self._restart.failed()
        delay = self._restart.delay(time.monotonic(), random.random())
        log.warning("uplink process exited with %s; restarting in %.1f s", exit_code, delay)
        await self._wait_kick(delay)

    async def _run_child(self, spec: ChildSpec, generation: int) -> int:
        self._in_child = True
        try:
            return await self._child(spec, generation)
        finally:
            self._in_child = False

    async def _child(self, spec: ChildSpec, generation: int) -> int:
        self._child_generation = generation
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env.update(spec.env)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gatewayd.service.upstream.uplink_child",
                str(child_sock.fileno()),
                pass_fds=(child_sock.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        self.status.child_pid = self._proc.pid
        await self.converse(parent_sock, spec, generation)
        code = await self._proc.wait()
        self.status.child_pid = None
        return code

    async def converse(self, sock: socket.socket, spec: ChildSpec, generation: int) -> None:
        """Talk to one uplink process over `sock` until it goes: the CONFIG frame, then publishes out and
        acknowledgements, messages and state reports in. Everything still in flight when it ends goes back
        to the head of the queue. (The uplink's bookkeeping, apart from spawning the process: tests play the
        process's side of `sock`.)"""
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        config = dict(spec.config)
        if self._last_connect_attempt is not None:
            config["seconds_since_last_attempt"] = time.monotonic() - self._last_connect_attempt
        self._send(ipc.json_frame(ipc.Kind.CONFIG, config))
        if generation != self._generation or not self._running.is_set():
            self._send(ipc.frame(ipc.Kind.STOP, b""))  # restarted while this child was starting
        sender = asyncio.create_task(self._sender(), name="uplink-sender")
        try:
            await self._pump(reader)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)  # whatever ended it, the child is gone
            self._lost_child()
            self._writer.close()
            self._writer = None

    def _lost_child(self) -> None:
        """Everything in flight goes back to the head of the queue, in order."""
        self._connected = False
        for msg in sorted(self._inflight.values(), key=lambda m: m.id, reverse=True):
            self._queue.appendleft(msg)
        self._inflight.clear()
        self._set(UplinkEvent.PROCESS_ENDED, "uplink process ended")  # changes nothing unless it was live

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        decoder = ipc.Decoder()
        while True:
            try:
                data = await reader.read(262144)
            except (ConnectionError, OSError):
                return  # the child died: the same as end of stream
            if not data:
                return
            for f in decoder.feed(data):
                self._on_frame(f)

    def _on_frame(self, f: ipc.Frame) -> None:
        match f.kind:
            case ipc.Kind.ACK:
                self._on_ack(ipc.decode_ack(f.body))
            case ipc.Kind.MESSAGE:
                m = ipc.decode_message(f.body)
                try:
                    self.on_message(m.topic, m.payload, m.qos, m.retain)
                except Exception:
                    log.exception("handler for inbound message on %s failed", m.topic)
            case ipc.Kind.STATE:
                self._on_state(f.json())
            case ipc.Kind.SUBACK:
                body = f.json()
                if body.get("error") or any(code == 0x80 for code in body.get("codes", [])):
                    log.warning("subscription refused upstream: %s %s", body.get("filters"), body)
                codes = body.get("codes", [])
                for i, entry in enumerate(body.get("filters", [])):
                    name = entry[0] if isinstance(entry, list) else entry
                    if body.get("error"):
                        continue  # not sent (not connected): it is sent again on connect
                    ok = i < len(codes) and codes[i] != 0x80
                    for fut in self._suback_waiters.get(name, []):
                        if not fut.done():
                            fut.set_result(ok)

    def _on_ack(self, ack: ipc.Ack) -> None:
        msg = self._inflight.pop(ack.id, None)
        if msg is None:
            return
        if ack.ok:
            msg.finish()
        else:
            self._queue.appendleft(msg)  # not delivered: send again after reconnect
        self._wake_sender.set()

    def _on_state(self, body: dict[str, Any]) -> None:
        state, error = body["state"], body.get("error", "")
        match state:
            case "connecting":
                self._last_connect_attempt = time.monotonic()
                self.status.next_attempt_at = None
                self._set(UplinkEvent.CONNECTING)
            case "connected":
                self._set(UplinkEvent.CONNACK_OK, "")
                if not self._connected:
                    return  # refused by the state machine (logged)
                self._restart.succeeded()
                if self.trial:
                    log.debug("trial connection: connected")
                    return
                log.info(
                    "connected to AWS IoT",
                    extra=logevents.extra(logevents.UPLINK_CONNECTED, child_pid=self.status.child_pid),
                )
                n = self.filters_per_subscribe  # AWS IoT: 8 filters per SUBSCRIBE
                for start in range(0, len(self._subscriptions), n):
                    batch = [[t, q] for t, q in list(self._subscriptions.items())[start : start + n]]
                    self._send(ipc.json_frame(ipc.Kind.SUBSCRIBE, {"filters": batch}))
                self._wake_sender.set()
            case "disconnected":
                was = self._connected
                self._set(UplinkEvent.CONNECTION_LOST, error)
                if self.trial:
                    log.debug("trial connection: disconnected %s", error)
                elif was and self.closing():
                    log.info("disconnected from AWS IoT (stopping)")
                elif was and (not self._running.is_set() or self._child_generation != self._generation):
                    log.info("disconnected from AWS IoT to %s", self._restart_why)
                elif was:
                    log.warning(
                        "connection to AWS IoT lost: %s",
                        error or "closed",
                        extra=logevents.extra(logevents.UPLINK_DISCONNECTED, reason=error),
                    )
            case "failed" | "refused" | "setup-failed":
                self._set(_FAILURE_EVENTS[state], error)
                if self.trial:
                    log.debug("trial connection: %s: %s", state, error)
                    return
                log.error(
                    "connection to AWS IoT failed: %s",
                    error,
                    extra=logevents.extra(logevents.UPLINK_CONNECT_FAILED, reason=error),
                )
            case "waiting":
                self.status.next_attempt_at = time.time() + float(body.get("retry_in", 0.0))
                self._set(UplinkEvent.BACKOFF)

    async def _sender(self) -> None:
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            frames: list[bytes] = []  # one write to the child for all that may go now
            while self._connected and self._queue and len(self._inflight) < self.window:
                msg = self._queue[0]
                if msg.abandoned():
                    self._queue.popleft()
                    continue
                if self._shaper is not None and self._held_back(msg):
                    break
                self._queue.popleft()
                self._rate.add(time.monotonic())
                self.status.published += 1
                self._inflight[msg.id] = msg
                frames.append(
                    ipc.encode_publish(ipc.Publish(msg.id, msg.qos, msg.retain, msg.topic, msg.payload))
                )
            if frames:
                self._send(b"".join(frames))
            if self._writer is not None:
                try:
                    await self._writer.drain()
                except (ConnectionError, OSError):
                    return  # the child died; _pump sees it and the supervisor restarts it

    def _held_back(self, msg: _Outgoing) -> bool:
        """Shaping: True when the quota holds `msg` back now (the sender is woken when it may go)."""
        assert self._shaper is not None
        now = time.monotonic()
        try:
            wait = self._shaper.delay(now, len(msg.payload))
        except ValueError as exc:
            self._queue.popleft()
            msg.finish(UplinkRefused(str(exc)))
            log.error("message on %s not sent: %s", msg.topic, exc)
            return False
        if not wait:
            self.status.throttled = now - self._throttled_at < 2.0
            if self._held_since is not None:
                self.status.throttled_seconds += now - self._held_since
                self._held_since = None
            return False
        if not self.status.throttled and now - self._throttled_at > 60.0 and not self.trial:
            rate = round(self._rate.rate(now), 1)
            log.info(
                "uplink throttled: holding publishes back to stay within upstream.quota (%g publishes/s now)",
                rate,
                extra=logevents.extra(logevents.UPLINK_THROTTLED, publish_rate=rate),
            )
        self._throttled_at = now
        self.status.throttled = True
        if self._held_since is None:
            self._held_since = now
        asyncio.get_running_loop().call_later(wait, self._wake_sender.set)
        return True

    def publish_rate(self) -> float:
        return self._rate.rate(time.monotonic())

    def _send(self, data: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
