"""Between the broker and the uplink: every message a sensor publishes for AWS IoT goes through the durable
spool (stores/spool.py).

In: `forward()` queues a message; the committer writes everything queued in one transaction (group commit:
one fsync for many messages) and only then lets the broker send the sensor its PUBACK/PUBREC. QoS 0 messages
are spooled the same way without an acknowledgement; those still queued for the next commit are the loss
window of a crash (milliseconds). When the spool is full the oldest QoS 0 messages are dropped first; QoS 1
messages that still do not fit are held, unacknowledged, at the head of the queue until AWS IoT's
acknowledgements free room: the sensors' in-flight windows fill and they stop sending (MQTT flow control).

Out: while the uplink is connected, the feeder reads the spool sensor by sensor and serves the sensors round
robin (a sensor flooding the gateway gets its share, not the whole uplink), keeping at most FEED_WAIT
seconds' worth of the publish quota waiting in the uplink besides what is in flight (at most 2 x
max_inflight and a second's worth of bytes in all); the uplink shapes them to the per-connection quotas.
A message leaves the spool when AWS IoT acknowledged it; after a reconnect the uplink sends its unacknowledged
messages again, after a restart the feed starts again from the spool: at least once, in order per sensor.
Readings on topics of a [[forwarding.batch]] rule are combined into batch messages (core/batching.py); a batch
is acknowledged, and leaves the spool, as a whole.

Every spool call runs in one worker thread, in order; the event loop never waits for an fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gatewayd.core import messages
from gatewayd.core.batching import Batch, Batcher, basic_ingest
from gatewayd.core.config import BatchSection, Config
from gatewayd.core.mqtt.topics import TopicMap, matches
from gatewayd.core.renewal import parse_duration
from gatewayd.core.shaping import FairQueue
from gatewayd.service.broker import READ_SIZE
from gatewayd.service.uplink import Uplink, UplinkError, UplinkRefused
from gatewayd.stores.spool import Message, Spool, Spooled, SpoolFull

log = logging.getLogger("gatewayd.forwarder")

T = TypeVar("T")

QUOTA_EXCEEDED = 0x97
SUCCESS = 0x00
MAX_COMMIT = 5000  # messages per transaction
# Bytes waiting for a commit: above HIGH the broker stops reading sensors' sockets (TCP pushes back on every
# sensor, QoS 0 ones included) until the commits bring it under LOW; never while the spool is full (then QoS 1
# is held back by its acknowledgements and QoS 0 is dropped, and sensors' PINGREQs must still be answered).
QUEUE_HIGH = 4 << 20
QUEUE_LOW = 1 << 20
# Each connection may still deliver what it had read (broker.READ_SIZE) after the stop: the queue stays under
# QUEUE_HIGH + max_connections x READ_SIZE. Only beyond that (not reached while the disk works) are the oldest
# QoS 0 messages waiting dropped.
STOP_COMMIT_TIMEOUT = 5.0  # seconds the final commit may take at shutdown (within daemon.SHUTDOWN_BUDGET)
EXPIRE_EVERY = 60.0  # seconds; a quarter of spool.max_age when that is shorter
DROP_LOG_EVERY = 10.0
FEED_WAIT = 0.1  # seconds' worth of the publish quota handed to the uplink and not sent yet, at most
PER_SENSOR_READ = 20  # messages read per sensor per feed round (fewer when many sensors wait)

COUNTERS = (
    "accepted", "delivered", "heldBack", "droppedQos0", "droppedQos1", "droppedExpired", "refusedTooLarge",
    "batches", "readPauses",
)  # fmt: skip
Done = Callable[[int], None]  # called with the PUBACK/PUBREC reason code once the message is durable


@dataclass
class _Queued:
    message: Message
    done: Done | None


@dataclass
class _Rule:
    topic: str
    batcher: Batcher
    ingest: str


class Forwarder:
    def __init__(
        self, config: Config, spool: Spool, uplink: Uplink, now: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.uplink = uplink
        self.now = now
        self.topic_map = TopicMap.from_template(config.forwarding.upstream_topic, config.gateway.thing_name)
        self.max_message = config.upstream.quota.max_message_bytes
        self.max_queued_qos0 = QUEUE_HIGH + config.downstream.max_connections * READ_SIZE
        self.expire_every = min(EXPIRE_EVERY, max(parse_duration(config.spool.max_age) / 4, 0.5))
        self.ahead = 2 * config.upstream.quota.max_inflight
        self.backlog = max(10, int(config.upstream.quota.publishes_per_second * FEED_WAIT))
        self.ahead_bytes = config.upstream.quota.bytes_per_second  # beyond a second's worth: in the spool
        self.rules = [_rule(r) for r in config.forwarding.batch]
        self._pool = ThreadPoolExecutor(1, "spool")
        self._queue: deque[_Queued] = deque()
        self._queued_qos0 = 0  # bytes
        self._queued = 0  # bytes, all messages waiting for a commit
        self._accepting = asyncio.Event()
        self._accepting.set()
        self._acked: list[int] = []
        self._wake_commit = asyncio.Event()
        self._wake_feed = asyncio.Event()
        self._has_more: set[str] = set()  # sensors that may have messages not yet handed to the uplink
        self._commits: Counter[str] = Counter()  # per sensor: commits so far (to spot one during a read)
        self._cursor: dict[str, int] = {}  # per sensor: the last sequence number read for the feed
        self._ready: FairQueue[Spooled] = FairQueue()
        self._handed = 0  # messages (batches count once) with the uplink, not acknowledged yet
        self._handed_bytes = 0
        self._full = False
        self._stats = spool.stats()
        self.counters = Counter[str]()
        self._unlogged = Counter[str]()
        self._last_drop_log = -DROP_LOG_EVERY
        self._drop_log_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # ------------------------------------------------------------------ the broker's side

    def forward(
        self, sensor: str, topic: str, payload: bytes, qos: int, retain: bool, done: Done | None
    ) -> int | None:
        """Take a sensor's message for upstream. Returns a reason code now (a refusal, or QoS 0's success),
        or None: `done` is called once the message is durable."""
        if len(payload) > self.max_message:
            log.warning(
                "message from %s on %s refused: %d bytes is over upstream.quota.max_message_bytes (%d)",
                sensor, topic, len(payload), self.max_message,
            )  # fmt: skip
            self.counters["refusedTooLarge"] += 1
            return QUOTA_EXCEEDED
        message = Message(sensor, topic, payload, min(qos, 1), retain)
        self._queue.append(_Queued(message, done if qos else None))
        self._queued += len(payload)
        if qos == 0:
            self._queued_qos0 += len(payload)
            while self._queued_qos0 > self.max_queued_qos0:
                self._drop_queued_qos0()
        if self._queued > QUEUE_HIGH and not self._full and self._accepting.is_set():
            self._accepting.clear()
            self.counters["readPauses"] += 1
        self.counters["accepted"] += 1
        self._wake_commit.set()
        return None if qos else SUCCESS

    def _drop_queued_qos0(self) -> None:
        for i, q in enumerate(self._queue):
            if q.message.qos == 0:
                del self._queue[i]
                self._queued_qos0 -= len(q.message.payload)
                self._queued -= len(q.message.payload)
                self._dropped("droppedQos0", 1)
                return

    @property
    def accepting(self) -> bool:
        """False while sensors' input should wait (see room())."""
        return self._accepting.is_set()

    async def room(self) -> None:
        """Returns when sensors' sockets may be read (the commits keep up); see QUEUE_HIGH."""
        await self._accepting.wait()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.uplink.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.uplink.unsubscribe(topic_filter)

    # ------------------------------------------------------------------ running

    async def __aenter__(self) -> Forwarder:
        sensors = await self._run(self.spool.sensors)
        self._has_more.update(sensors)
        self._tasks = [
            asyncio.create_task(self._committer(), name="spool-commit"),
            asyncio.create_task(self._feeder(), name="spool-feed"),
            asyncio.create_task(self._expirer(), name="spool-expire"),
        ]
        self._wake_feed.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop: the committer commits what is queued (QoS 0 included; held QoS 1 messages stay
        unacknowledged, so their sensors send them again) and ends; a commit in progress is never cut short
        (it would be written again). Then the spool is closed."""
        self._stopping = True
        committer, *others = self._tasks
        for task in others:
            task.cancel()
        self._wake_commit.set()
        try:
            await asyncio.wait_for(asyncio.shield(committer), STOP_COMMIT_TIMEOUT)
        except TimeoutError:
            log.error("spool: the final commit took over %g s; stopping without it", STOP_COMMIT_TIMEOUT)
            committer.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._run(self.spool.close)
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ in: group commit

    async def _committer(self) -> None:
        while True:
            await self._wake_commit.wait()
            self._wake_commit.clear()
            if self._full and not self._acked and not self._stopping:
                # full: only AWS IoT's acknowledgements (or expiry) make room; retry on those, or every second
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_commit.wait(), 1.0)
            try:
                await self._commit_once()
            except Exception as exc:
                log.error("spool: commit failed, retrying in 1 s: %s", exc)
                if self._stopping:
                    return
                await asyncio.sleep(1.0)
            if self._stopping and not self._acked and (not self._queue or self._full):
                return  # all committed, or what is left is held for room that will not come now
            if (self._queue and not self._full) or self._stopping:
                self._wake_commit.set()

    async def _commit_once(self) -> None:
        batch = [self._queue[i] for i in range(min(len(self._queue), MAX_COMMIT))]
        acked, self._acked = self._acked, []
        try:
            consumed, dropped, refused_qos0 = await self._run(
                self._write, [q.message for q in batch], acked, self.now()
            )
        except BaseException:
            self._acked = acked + self._acked
            raise
        for _ in range(consumed):
            q = self._queue.popleft()
            self._queued -= len(q.message.payload)
            if q.message.qos == 0:
                self._queued_qos0 -= len(q.message.payload)
            if q.done is not None:  # QoS 1 in the consumed prefix: stored
                q.done(SUCCESS)
        qos1 = sum(d.message.qos for d in dropped)  # only with spool.when_full = drop-oldest
        if len(dropped) - qos1 + refused_qos0:
            self._dropped("droppedQos0", len(dropped) - qos1 + refused_qos0)
        if qos1:
            self._dropped("droppedQos1", qos1)
        for q in batch[:consumed]:
            self._commits[q.message.sensor] += 1
            self._has_more.add(q.message.sensor)
        held = len(batch) - consumed
        if not self._accepting.is_set() and (self._queued < QUEUE_LOW or held):
            self._accepting.set()
        if held and not self._full:
            self._full = True
            log.warning(
                "spool full (%d messages, %d bytes): holding back sensors' QoS 1 messages until AWS IoT "
                "acknowledges some", self._stats.messages, self._stats.bytes,
                extra=messages.extra(messages.SPOOL_FULL, spool_bytes=self._stats.bytes,
                                     spool_messages=self._stats.messages),
            )  # fmt: skip
        elif not held and self._full:
            self._full = False
            log.info("spool has room again: sensors' QoS 1 messages are accepted")
        self.counters["heldBack"] = held
        if consumed:
            self._wake_feed.set()

    def _write(self, batch: list[Message], acked: list[int], now: float) -> tuple[int, list[Spooled], int]:
        """In the worker thread: forget what AWS IoT acknowledged, then store as much of `batch` as fits.
        Returns (how many messages from the head are done with: stored, or QoS 0 dropped for room; messages
        the spool dropped for room (spool.when_full); QoS 0 messages of the batch dropped for room). A QoS 1
        message that does not fit ends the prefix: it and those after it stay queued, in order."""
        self.spool.ack(acked)
        consumed, refused = len(batch), 0
        dropped: list[Spooled] = []
        if batch:
            try:
                dropped = self.spool.append(batch, now)[1]
            except SpoolFull:
                budget = self.spool.room()
                fitting: list[Message] = []
                consumed = 0
                for m in batch:
                    if len(m.payload) <= budget:
                        fitting.append(m)
                        budget -= len(m.payload)
                    elif m.qos == 0:
                        refused += 1  # a QoS 0 message that does not fit is dropped, never held
                    else:
                        break
                    consumed += 1
                if fitting:
                    dropped = self.spool.append(fitting, now)[1]
        self._stats = self.spool.stats()
        return consumed, dropped, refused

    # ------------------------------------------------------------------ out: the fair feed

    async def _feeder(self) -> None:
        while True:
            self._wake_feed.clear()  # whatever wakes it from here on is seen by the work below or the wait
            if self.uplink.connected:  # offline, everything waits in the spool
                for rule in self.rules:
                    for b in rule.batcher.due(time.monotonic()):
                        self._send_batch(rule, b)
                while self._room() and not self._stopping:
                    if not len(self._ready):
                        if not self._has_more:
                            break
                        await self._refill()
                        if not len(self._ready):
                            break
                    item = self._ready.pop()
                    assert item is not None
                    self._hand(item[1])
            # woken by commits and acknowledgements; at the latest when a batch is due, or after a second
            # (the uplink's connection state is checked that often)
            due = self._next_batch_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_feed.wait(), 1.0 if due is None else min(due, 1.0))

    def _room(self) -> bool:
        """Hand more only while the uplink has little waiting to be sent: the order among sensors is decided
        here, as late as possible, so a calm sensor's message waits behind at most FEED_WAIT seconds of
        others' messages (10 at least)."""
        return (
            self.uplink.backlog < self.backlog
            and self._handed < self.ahead
            and self._handed_bytes < self.ahead_bytes
        )

    def _next_batch_due(self) -> float | None:
        due = [d for r in self.rules if (d := r.batcher.next_due()) is not None]
        return max(min(due) - time.monotonic(), 0.0) if due else None

    async def _refill(self) -> None:
        sensors = list(self._has_more)
        generation = {s: self._commits[s] for s in sensors}
        limit = max(1, min(PER_SENSOR_READ, 2000 // max(len(sensors), 1)))
        cursors = {s: self._cursor.get(s, 0) for s in sensors}
        rows = await self._run(self._read, cursors, limit)
        for sensor in sensors:
            got = rows.get(sensor, [])
            for item in got:
                self._ready.push(sensor, item)
            if got:
                self._cursor[sensor] = got[-1].seq
            if len(got) < limit and self._commits[sensor] == generation[sensor]:
                self._has_more.discard(sensor)

    def _read(self, cursors: dict[str, int], limit: int) -> dict[str, list[Spooled]]:
        return {s: self.spool.per_sensor(s, after, limit) for s, after in cursors.items()}

    def _hand(self, item: Spooled) -> None:
        m = item.message
        rule = self._rule_for(m.topic)
        if rule is not None:
            try:
                ready = rule.batcher.add(
                    m.topic, m.sensor, m.payload, time.monotonic(), item.seq, received=item.enqueued
                )
            except ValueError:  # one reading larger than a batch: it goes on its own
                pass
            else:
                for b in ready:
                    self._send_batch(rule, b)
                self._wake_feed.set()  # a new open batch may be due before anything else happens
                return
        self._send(m.topic, m.payload, m.qos, [item.seq])

    def _rule_for(self, upstream_topic: str) -> _Rule | None:
        if not self.rules:
            return None
        sensor_topic = self.topic_map.downstream(upstream_topic)
        if sensor_topic is None:
            return None
        return next((r for r in self.rules if matches(r.topic, sensor_topic)), None)

    def _send_batch(self, rule: _Rule, b: Batch) -> None:
        topic = basic_ingest(rule.ingest, b.topic) if rule.ingest else b.topic
        self.counters["batches"] += 1
        self._send(topic, b.encode(), 1, b.tags)

    def _send(self, topic: str, payload: bytes, qos: int, seqs: list[int]) -> None:
        def delivered(error: BaseException | None) -> None:
            self._handed -= 1
            self._handed_bytes -= len(payload)
            if error is None or isinstance(error, UplinkRefused):  # refused: it never will go; forget it
                self._acked.extend(seqs)
                self.counters["delivered" if error is None else "refusedTooLarge"] += len(seqs)
                self._wake_commit.set()
            self._wake_feed.set()

        try:
            self.uplink.send(topic, payload, qos, delivered)
        except UplinkError as exc:  # not expected: the uplink's queue is far larger than `ahead`
            log.error("spool: cannot hand messages %s to the uplink: %s (sent after a restart)", seqs, exc)
            return
        self._handed += 1
        self._handed_bytes += len(payload)

    # ------------------------------------------------------------------ bounds and status

    async def _expirer(self) -> None:
        while True:
            await asyncio.sleep(self.expire_every)
            old = await self._run(self._expire, self.now())
            if old:
                self._dropped("droppedExpired", old)

    def _expire(self, now: float) -> int:
        old = self.spool.expire(now)
        self._stats = self.spool.stats()
        return len(old)

    def _dropped(self, key: str, count: int) -> None:
        self.counters[key] += count
        self._unlogged[key] += count
        wait = self._last_drop_log + DROP_LOG_EVERY - time.monotonic()
        if wait <= 0:
            self._log_drops()
        elif not self._drop_log_scheduled:  # the rest of a burst is logged when the interval ends
            self._drop_log_scheduled = True
            asyncio.get_running_loop().call_later(wait, self._log_drops)

    def _log_drops(self) -> None:
        self._drop_log_scheduled = False
        q0, q1, old = (self._unlogged[k] for k in ("droppedQos0", "droppedQos1", "droppedExpired"))
        if not q0 and not q1 and not old:
            return
        self._last_drop_log = time.monotonic()
        self._unlogged.clear()
        reasons = [r for r, n in (("spool full", q0 + q1), ("older than spool.max_age", old)) if n]
        log.warning(
            "spool: dropped %d QoS 0 and %d QoS 1 message(s) for room (spool.when_full = %s) and %d "
            "message(s) older than spool.max_age",
            q0, q1, self.spool.when_full, old,
            extra=messages.extra(
                messages.SPOOL_DROPPED, reason=", ".join(reasons), dropped_qos0=q0, dropped_qos1=q1,
                dropped_expired=old,
            ),
        )  # fmt: skip

    def log_backlog(self) -> bool:
        """The spool's figures in the journal, when messages wait (True: logged)."""
        s = self._stats
        if not s.messages:
            return False
        age = round(self.now() - s.oldest) if s.oldest is not None else 0
        rate, throttled = round(self.uplink.publish_rate(), 1), self.uplink.status.throttled
        log.info(
            "spool: %d messages (%d bytes, the oldest %d s old) waiting; uplink publishing %g/s%s",
            s.messages, s.bytes, age, rate, ", throttled by the quota" if throttled else "",
            extra=messages.extra(
                messages.SPOOL_BACKLOG, spool_messages=s.messages, spool_bytes=s.bytes,
                oldest_age_seconds=age, publish_rate=rate, throttled=throttled,
            ),
        )  # fmt: skip
        return True

    def status_words(self) -> str:
        """For the STATUS= line: empty while nothing waits."""
        s = self._stats
        if not s.messages and not self._full:
            return ""
        words = f"; spool {s.messages} messages, {s.bytes} bytes"
        if s.oldest is not None:
            words += f", oldest {self.now() - s.oldest:.0f} s"
        if self._full:
            words += ", FULL (holding back QoS 1)"
        if self.uplink.status.throttled:
            words += "; throttled"
        return words

    def summary(self) -> dict[str, Any]:
        s = self._stats
        return {
            "messages": s.messages,
            "bytes": s.bytes,
            "maxBytes": self.spool.max_bytes,
            "oldestAgeSeconds": round(self.now() - s.oldest, 1) if s.oldest is not None else None,
            "full": self._full,
            "queuedForCommit": len(self._queue),
            "withUplink": self._handed,
            **{k: self.counters[k] for k in COUNTERS},
        }


def _rule(section: BatchSection) -> _Rule:
    return _Rule(
        section.topic,
        Batcher(section.max_bytes, parse_duration(section.max_delay)),
        section.basic_ingest_rule,
    )
