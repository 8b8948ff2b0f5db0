"""Between the broker and the uplink: acknowledge through, spill only what has to wait (issue 15; the design
is in docs/architecture.md, "Data plane").

In: `forward()` keeps a sensor's message in memory and hands it to the uplink in the fair feed below. A QoS
1/2 message is acknowledged to its sensor (`done`, which sends the PUBACK/PUBREC) as soon as AWS IoT
acknowledged it or it is durably in the spill store (stores/spill.py), whichever comes first: nothing
acknowledged is ever only in memory. A message goes to the store only when it has to wait:
- the uplink is not connected (down, blocked, waiting for the TPM, suspended for a renewal): everything
  waiting goes, at once;
- it has waited `spool.spill_after` (default 500 ms) without AWS IoT's acknowledgement (a slow or throttled
  uplink, a batch or the publish quota holding it): it goes, with every older one, in one group;
- the messages waiting in memory exceed `spool.memory_bytes`: the oldest go until they fit.
A group is one write and one fdatasync; groups are at least GROUP_BYTES or GROUP_WAIT old, so that flash
pages are not rewritten for every reading. QoS 0 messages follow the same rule without an acknowledgement:
those only in memory are the loss window of a crash (at most spill_after + GROUP_WAIT, or memory_bytes).
When the store is full, `spool.when_full` decides (stores/spill.py); QoS 1 messages that still do not fit stay
in memory, unacknowledged, so their sensors' in-flight windows fill and they stop sending (MQTT flow control);
QoS 0 ones that do not fit are dropped and counted.

Out: the feed serves sensors round robin (a sensor flooding the gateway gets its share, not the whole
uplink): a sensor's messages in the store first (read back in batches), then those in memory, so each
sensor's order is kept. It keeps at most FEED_WAIT seconds' worth of the publish quota waiting in the uplink
besides what is in flight; the uplink shapes them to the per-connection quotas. After a reconnect the uplink
sends its unacknowledged messages again, after a restart the feed starts again from the store: at least
once, in order per sensor. Readings on topics of a [[forwarding.batch]] rule are combined into batch messages
(core/batching.py); a batch is acknowledged as a whole.

Every store call runs in one worker thread, in order; the event loop never waits for an fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gatewayd.core import logevents
from gatewayd.core.batching import Batch, Batcher, basic_ingest
from gatewayd.core.config import BatchSection, Config
from gatewayd.core.errors import SpillFull, UplinkError, UplinkRefused
from gatewayd.core.mqtt.topics import TopicMap, matches
from gatewayd.service.upstream.uplink import Uplink
from gatewayd.stores.spill import Reading, SpillStore, Stats, Stored

log = logging.getLogger("gatewayd.forwarder")

T = TypeVar("T")

QUOTA_EXCEEDED = 0x97
SUCCESS = 0x00
GROUP_BYTES = 16384  # a spill group waits for this many bytes...
GROUP_WAIT = 0.1  # ...or this many seconds (then it goes however small): at 500 readings/s, 4 pages for 50
MAX_GROUP = 5000  # messages per write
STOP_SPILL_TIMEOUT = 5.0  # seconds the final spill may take at shutdown (within daemon.SHUTDOWN_BUDGET)
EXPIRE_EVERY = 60.0  # seconds; a quarter of spool.max_age when that is shorter
FLUSH_EVERY = 0.2  # seconds: done records waiting that long are written (no fsync of their own: the page
# cache takes them; rewritten pages are counted once per writeback, so this costs little on the card)
DROP_LOG_EVERY = 10.0
FEED_WAIT = 0.1  # seconds' worth of the publish quota handed to the uplink and not sent yet, at most
PER_SENSOR_READ = 20  # messages read back per sensor at a time (fewer when many sensors wait)

COUNTERS = (
    "accepted", "delivered", "spilled", "heldBack", "droppedQos0", "droppedQos1", "droppedExpired",
    "refusedTooLarge", "batches", "readPauses",
)  # fmt: skip
Done = Callable[[int], None]  # called with the PUBACK/PUBREC reason code once AWS IoT has it or it is durable


class _Entry:
    """A message on its way: in memory until AWS IoT acknowledged it (and its payload while it is not in the
    store or is with the uplink)."""

    __slots__ = ("done", "payload", "qos", "received", "sensor", "seq", "since", "size", "state", "topic")

    def __init__(
        self,
        sensor: str,
        topic: str,
        payload: bytes,
        qos: int,
        received: float,
        since: float,
        done: Done | None,
    ) -> None:
        self.sensor = sensor
        self.topic = topic
        self.payload = payload
        self.size = len(payload)
        self.qos = qos
        self.received = received  # wall clock, for the record and batches
        self.since = since  # monotonic, for spill_after
        self.done = done  # the sensor's acknowledgement, until sent
        self.seq = 0  # in the store once non-zero
        self.state = 0  # bits below

    def acknowledge(self, reason: int) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(reason)


HANDED, SPILLING, FINISHED, STORED = 1, 2, 4, 8
GONE = FINISHED | STORED  # no longer waiting to be spilled


@dataclass
class _Rule:
    topic: str
    batcher: Batcher
    ingest: str


class Forwarder:
    def __init__(
        self,
        config: Config,
        store: SpillStore,
        uplink: Uplink,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.uplink = uplink
        self.now = now
        self.monotonic = monotonic
        self.topic_map = TopicMap.from_template(config.forwarding.upstream_topic, config.gateway.thing_name)
        self.max_message = config.upstream.quota.max_message_bytes
        self.max_age = config.spool.max_age.seconds
        self.spill_after = config.spool.spill_after.seconds
        self.memory_bytes = config.spool.memory_bytes
        self.expire_every = min(EXPIRE_EVERY, max(self.max_age / 4, 0.5))
        self.ahead = 2 * config.upstream.quota.max_inflight
        self.backlog = max(10, int(config.upstream.quota.publishes_per_second * FEED_WAIT))
        self.ahead_bytes = config.upstream.quota.bytes_per_second  # beyond a second's worth: waits here
        self.rules = [_rule(r) for r in config.forwarding.batch]
        self._pool = ThreadPoolExecutor(1, "spill")
        self._memory: dict[str, deque[_Entry]] = {}  # per sensor: in memory, not handed, not in the store
        self._on_disk: Counter[str] = Counter()  # per sensor: in the store, not read back yet (upper bound)
        self._spilling: Counter[str] = Counter()  # per sensor: being written, to be read back (not handed)
        self._read_back: dict[str, deque[_Entry]] = {}  # per sensor: read back from the store, to hand
        self._reading: set[str] = set()  # sensors with a read from the store under way
        self._turns: OrderedDict[str, None] = OrderedDict()  # sensors with something to hand, in turn
        self._unspilled: deque[_Entry] = deque()  # not in the store, not finished: oldest first
        self._unspilled_bytes = 0
        self._done_seqs: list[int] = []  # in the store and acknowledged by AWS IoT: done records to write
        self._accepting = asyncio.Event()
        self._accepting.set()
        self._wake_spill = asyncio.Event()
        self._wake_feed = asyncio.Event()
        self._handed = 0  # messages (batches count once) with the uplink, not acknowledged yet
        self._handed_bytes = 0
        self._full = False
        self._held: list[_Entry] = []  # QoS 1 messages the full store could not take
        self._stats = Stats(0, 0, None, 0, 0)
        self.counters = Counter[str]()
        self._unlogged = Counter[str]()
        self._last_drop_log = -DROP_LOG_EVERY
        self._drop_log_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reads: set[asyncio.Task[None]] = set()  # reads back from the store under way
        self._stopping = False

    # ------------------------------------------------------------------ the broker's side

    def forward(
        self, sensor: str, topic: str, payload: bytes, qos: int, retain: bool, done: Done | None
    ) -> int | None:
        """Take a sensor's message for upstream. Returns a reason code now (a refusal, or QoS 0's success),
        or None: `done` is called once AWS IoT acknowledged the message or it is durable."""
        if len(payload) > self.max_message:
            log.warning(
                "message from %s on %s refused: %d bytes is over upstream.quota.max_message_bytes (%d)",
                sensor, topic, len(payload), self.max_message,
            )  # fmt: skip
            self.counters["refusedTooLarge"] += 1
            return QUOTA_EXCEEDED
        entry = _Entry(
            sensor, topic, payload, min(qos, 1), self.now(), self.monotonic(), done if qos else None
        )
        queue = self._memory.get(sensor)
        if queue is None:
            queue = self._memory[sensor] = deque()
        queue.append(entry)
        self._unspilled.append(entry)
        self._unspilled_bytes += entry.size
        self._turns[sensor] = None
        self.counters["accepted"] += 1
        if self._unspilled_bytes > 2 * self.memory_bytes and not self._full and self._accepting.is_set():
            self._accepting.clear()  # the store does not keep up: TCP pushes back on the sensors
            self.counters["readPauses"] += 1
        if self._unspilled_bytes > self.memory_bytes or not self.uplink.connected:
            self._wake_spill.set()
        self._wake_feed.set()
        return None if qos else SUCCESS

    @property
    def accepting(self) -> bool:
        """False while sensors' input should wait (see room())."""
        return self._accepting.is_set()

    async def room(self) -> None:
        """Returns when sensors' sockets may be read (the store keeps up with memory_bytes)."""
        await self._accepting.wait()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.uplink.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.uplink.unsubscribe(topic_filter)

    # ------------------------------------------------------------------ running

    async def __aenter__(self) -> Forwarder:
        waiting = await self._run(self._sensors_on_disk)
        for sensor, count in waiting.items():
            self._on_disk[sensor] = count
            self._turns[sensor] = None
        self._stats = await self._run(self.store.stats)
        self._tasks = [
            asyncio.create_task(self._spiller(), name="spill"),
            asyncio.create_task(self._feeder(), name="feed"),
            asyncio.create_task(self._expirer(), name="spill-expire"),
        ]
        self._wake_feed.set()
        return self

    def _sensors_on_disk(self) -> dict[str, int]:
        return {s: self.store.waiting(s) for s in self.store.sensors()}

    async def __aexit__(self, *exc: object) -> None:
        """Stop: everything not acknowledged by AWS IoT yet is spilled (QoS 0 included; QoS 1 that does not
        fit stays unacknowledged, so its sensor sends it again), acknowledged to its sensor where the
        connection still is, and the store closed. A write in progress is never cut short."""
        self._stopping = True
        spiller, *others = self._tasks
        for task in others:
            task.cancel()
        self._wake_spill.set()
        try:
            await asyncio.wait_for(asyncio.shield(spiller), STOP_SPILL_TIMEOUT)
        except TimeoutError:
            log.error("spool: the final spill took over %g s; stopping without it", STOP_SPILL_TIMEOUT)
            spiller.cancel()
        await asyncio.gather(*self._tasks, *self._reads, return_exceptions=True)
        done, self._done_seqs = self._done_seqs, []
        await self._run(self._close, done)
        self._pool.shutdown(wait=True)

    def _close(self, done: list[int]) -> None:
        self.store.done(done)
        self.store.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ spilling

    def _due(self) -> tuple[list[_Entry], float | None]:
        """What must go to the store now, oldest first, and in how many seconds to look again (None: when
        something new arrives)."""
        unspilled = self._unspilled
        while unspilled and unspilled[0].state & GONE:
            unspilled.popleft()  # stored, or acknowledged by AWS IoT meanwhile (bytes given back then)
        if not unspilled:
            return [], None
        now = self.monotonic()
        everything = self._stopping or not self.uplink.connected
        over = self._unspilled_bytes - self.memory_bytes
        limit = now - self.spill_after
        group: list[_Entry] = []
        size = 0
        for entry in unspilled:
            if len(group) >= MAX_GROUP:
                break
            if entry.state & (GONE | SPILLING):
                continue
            if not (everything or entry.since <= limit or size < over):
                break
            group.append(entry)
            size += entry.size
        if not group:
            head = next((e for e in unspilled if not e.state & (GONE | SPILLING)), None)
            return [], None if head is None else head.since + self.spill_after - now
        if self._stopping or size >= GROUP_BYTES or over > 0:
            return group, 0.0
        # a small group waits a little for company: flash pages are written whole, whatever fills them
        due_at = group[0].since + (0.0 if everything else self.spill_after) + GROUP_WAIT
        return (group, 0.0) if now >= due_at else ([], due_at - now)

    async def _spiller(self) -> None:
        last_flush = self.monotonic()
        retry_at = 0.0  # while the store is full: a write is tried again on acknowledgements, or then
        while True:
            group, wait = self._due()
            held_back = self._full and not self._done_seqs and self.monotonic() < retry_at
            if group and not (held_back and not self._stopping):
                try:
                    await self._spill(group)
                except Exception as exc:
                    log.error("spool: writing to the spill store failed, retrying in 1 s: %s", exc)
                    if self._stopping:
                        return
                    await asyncio.sleep(1.0)
                    continue
                if self._full:
                    if self._stopping:
                        return  # what is left is held for room that will not come now
                    retry_at = self.monotonic() + 1.0
                continue
            if self._stopping:
                return
            if self._full and all(e.state & GONE for e in self._held):  # AWS IoT took them from memory
                self._held = []
                self.counters["heldBack"] = 0
                self._set_full(False)
            if self._done_seqs and self.monotonic() - last_flush >= FLUSH_EVERY:
                done, self._done_seqs = self._done_seqs, []
                await self._run(self._flush, done)
                last_flush = self.monotonic()
                continue
            self._wake_spill.clear()
            timeout = FLUSH_EVERY if wait is None else min(max(wait, 0.001), FLUSH_EVERY)
            if held_back:
                timeout = min(timeout, max(retry_at - self.monotonic(), 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_spill.wait(), timeout)

    def _flush(self, done: list[int]) -> None:
        self.store.done(done)
        self.store.flush()
        self._stats = self.store.stats()

    async def _spill(self, group: list[_Entry]) -> None:
        for entry in group:
            entry.state |= SPILLING
            if not entry.state & HANDED:  # read back from the store: the feed must not hand it before that
                queue = self._memory[entry.sensor]
                if queue[0] is entry:  # always: spills go oldest first, and so does the feed
                    queue.popleft()
                else:
                    queue.remove(entry)
                if not queue:
                    del self._memory[entry.sensor]
                self._spilling[entry.sensor] += 1
        to_age = self.store.clock.now() - self.monotonic()  # the age clock's reading of `since`
        items = [
            (
                Reading(e.sensor, e.topic, e.payload, e.qos, False, e.received, e.since + to_age),
                not e.state & HANDED,
            )
            for e in group
        ]
        done, self._done_seqs = self._done_seqs, []
        try:
            outcomes, dropped = await self._run(self._write, items, done)
        except BaseException:
            self._done_seqs = done + self._done_seqs
            self._unspill(group)
            raise
        held: list[_Entry] = []
        for entry, outcome in zip(group, outcomes, strict=True):
            if outcome > 0:
                self._stored(entry, outcome)
            elif outcome < 0:  # a QoS 0 message that does not fit is dropped, never held
                self._forget(entry)
            else:
                held.append(entry)
        self._count_drops(dropped, sum(1 for o in outcomes if o < 0))
        self._unspill(held)
        self._held = [e for e in held if not e.state & FINISHED]
        self.counters["heldBack"] = len(self._held)
        self._set_full(bool(self._held))
        if self._unspilled_bytes <= self.memory_bytes and not self._accepting.is_set():
            self._accepting.set()
        stored = sum(1 for o in outcomes if o > 0)
        if stored:
            self.counters["spilled"] += stored
        self._wake_feed.set()

    def _write(self, items: list[tuple[Reading, bool]], done: list[int]) -> tuple[list[int], list[Stored]]:
        """In the worker thread: record what AWS IoT acknowledged, then store as much of `items` as fits.
        Returns, per item, its sequence number once stored, 0 when it was not (held, in memory) or -1 for a
        QoS 0 message dropped because it did not fit; and the readings the store dropped for room
        (when_full). A QoS 1 message that does not fit holds it and every later QoS 1 one back, in order; a
        QoS 0 message that does not fit, or comes after a held one, is dropped."""
        self.store.done(done)
        try:
            seqs, dropped = self.store.append(items)
            outcomes = seqs
        except SpillFull:
            budget = self.store.room()
            fitting: list[tuple[Reading, bool]] = []
            outcomes = []
            holding = False
            for item in items:
                size = len(item[0].payload)
                if size <= budget and not holding:
                    fitting.append(item)
                    outcomes.append(1)
                    budget -= size
                elif item[0].qos == 0:
                    outcomes.append(-1)
                else:
                    holding = True  # and every later QoS 1 message: nothing overtakes a held one
                    outcomes.append(0)
            seqs, dropped = self.store.append(fitting) if fitting else ([], [])
            numbers = iter(seqs)
            outcomes = [next(numbers) if o > 0 else o for o in outcomes]
        self._stats = self.store.stats()
        return outcomes, dropped

    def _stored(self, entry: _Entry, seq: int) -> None:
        entry.seq = seq
        entry.state = (entry.state & ~SPILLING) | STORED
        self._unspilled_bytes -= entry.size
        self._settle(entry.sensor, stored=True)
        entry.acknowledge(SUCCESS)
        if entry.state & FINISHED:  # AWS IoT acknowledged it while it was being written
            self._done_seqs.append(seq)
        elif not entry.state & HANDED:
            entry.payload = b""  # read back from the store when its turn comes

    def _settle(self, sensor: str, stored: bool) -> None:
        """A spill of one of the sensor's messages (not handed) ended."""
        self._spilling[sensor] -= 1
        if self._spilling[sensor] <= 0:
            del self._spilling[sensor]
        if stored:
            self._on_disk[sensor] += 1

    def _unspill(self, entries: list[_Entry]) -> None:
        """Entries that were not stored go back to memory, in order, at the head of their sensors' queues
        (they kept their places in _unspilled); one AWS IoT acknowledged meanwhile is done with."""
        for entry in reversed(entries):
            entry.state &= ~SPILLING
            if not entry.state & HANDED:
                self._settle(entry.sensor, stored=False)
                self._memory.setdefault(entry.sensor, deque()).appendleft(entry)
                self._turns[entry.sensor] = None
            if entry.state & FINISHED:  # its place in _unspilled (kept while it was written) goes lazily
                self._unspilled_bytes -= entry.size

    def _forget(self, entry: _Entry) -> None:
        """A QoS 0 message dropped without being stored: its memory is given back."""
        entry.state = (entry.state & ~SPILLING) | FINISHED
        if not entry.state & HANDED:
            self._settle(entry.sensor, stored=False)
        self._unspilled_bytes -= entry.size

    def _set_full(self, full: bool) -> None:
        if full and not self._full:
            self._full = True
            if not self._accepting.is_set():
                self._accepting.set()  # held QoS 1 is bounded by the sensors' windows; PINGREQs need answers
            log.warning(
                "spool full (%d messages, %d bytes): holding back sensors' QoS 1 messages until AWS IoT "
                "acknowledges some", self._stats.messages, self._stats.bytes,
                extra=logevents.extra(logevents.SPOOL_FULL, spool_bytes=self._stats.bytes,
                                     spool_messages=self._stats.messages),
            )  # fmt: skip
        elif not full and self._full:
            self._full = False
            log.info("spool has room again: sensors' QoS 1 messages are accepted")

    def _count_drops(self, dropped: list[Stored], refused_qos0: int) -> None:
        qos1 = sum(1 for d in dropped if d.reading.qos)  # only with spool.when_full = drop-oldest
        if len(dropped) - qos1 + refused_qos0:
            self._dropped("droppedQos0", len(dropped) - qos1 + refused_qos0)
        if qos1:
            self._dropped("droppedQos1", qos1)

    # ------------------------------------------------------------------ out: the fair feed

    async def _feeder(self) -> None:
        while not self._stopping:  # also checked here: asyncio.wait_for (3.11) can lose a cancellation
            self._wake_feed.clear()  # whatever wakes it from here on is seen by the work below or the wait
            if self.uplink.connected:  # offline, everything waits (and is spilled)
                now = self.monotonic()
                for rule in self.rules:
                    for b in rule.batcher.due(now):
                        self._send_batch(rule, b)
                self._feed()
            # woken by new messages, writes and acknowledgements; at the latest when a batch is due, or
            # after a second (the uplink's connection state is checked that often)
            due = self._next_batch_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_feed.wait(), 1.0 if due is None else min(due, 1.0))

    def _feed(self) -> None:
        """Hand messages round robin while the uplink has room. A sensor whose next messages are in the store
        is skipped until they are read back: one read for every such sensor met in a round, so they come
        back together and share the uplink from the start."""
        turns = self._turns
        skipped = 0
        to_read: list[str] = []
        while turns and self._room() and not self._stopping and skipped < len(turns):
            sensor = next(iter(turns))
            entry = self._next_of(sensor, to_read)
            if entry is None:
                if sensor in self._reading or self._on_disk.get(sensor) or self._spilling.get(sensor):
                    turns.move_to_end(sensor)
                    skipped += 1
                else:
                    del turns[sensor]
                continue
            skipped = 0
            turns.move_to_end(sensor)
            self._hand(entry)
        if to_read:
            self._reading.update(to_read)
            task = asyncio.get_running_loop().create_task(self._read(to_read), name="spill-read")
            self._reads.add(task)
            task.add_done_callback(self._read_done)

    def _next_of(self, sensor: str, to_read: list[str]) -> _Entry | None:
        """The sensor's next message: read back from the store, else (once nothing of it is on disk or being
        written) from memory; None while a read is needed or under way."""
        entry = _pop(self._read_back, sensor)
        if entry is not None:
            return entry
        if sensor in self._reading or self._spilling.get(sensor):
            return None
        if self._on_disk.get(sensor):
            if sensor not in to_read:
                to_read.append(sensor)
            return None
        return _pop(self._memory, sensor)

    async def _read(self, sensors: list[str]) -> None:
        limit = max(1, min(PER_SENSOR_READ, 2000 // len(sensors)))
        try:
            results = await self._run(self._take, sensors, limit)
        finally:
            self._reading.difference_update(sensors)
        now = self.monotonic()
        for sensor, (got, left) in zip(sensors, results, strict=True):
            if got:
                back = self._read_back.setdefault(sensor, deque())
                for stored in got:
                    r = stored.reading
                    entry = _Entry(sensor, r.topic, r.payload, r.qos, r.enqueued, now, None)
                    entry.seq = stored.seq
                    entry.state = STORED
                    back.append(entry)
            if left:
                self._on_disk[sensor] = left
            else:
                self._on_disk.pop(sensor, None)
            self._turns[sensor] = None
        self._wake_feed.set()

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("spool: reading back from the spill store failed: %s", task.exception())
            self._wake_feed.set()  # the sensors are no longer marked as being read: tried again

    def _take(self, sensors: list[str], limit: int) -> list[tuple[list[Stored], int]]:
        return [(self.store.take(s, limit), self.store.waiting(s)) for s in sensors]

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
        return max(min(due) - self.monotonic(), 0.0) if due else None

    def _hand(self, entry: _Entry) -> None:
        entry.state |= HANDED
        rule = self._rule_for(entry.topic)
        if rule is not None:
            try:
                ready = rule.batcher.add(
                    entry.topic, entry.sensor, entry.payload, self.monotonic(), entry, received=entry.received
                )
            except ValueError:  # one reading larger than a batch: it goes on its own
                pass
            else:
                for b in ready:
                    self._send_batch(rule, b)
                self._wake_feed.set()  # a new open batch may be due before anything else happens
                return
        self._send(entry.topic, entry.payload, entry.qos, [entry])

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
        self._send(topic, b.encode(), 1, list(b.tags))

    def _send(self, topic: str, payload: bytes, qos: int, entries: list[Any]) -> None:
        def delivered(error: BaseException | None) -> None:
            self._handed -= 1
            self._handed_bytes -= len(payload)
            if error is None or isinstance(error, UplinkRefused):  # refused: it never will go; forget it
                reason = SUCCESS if error is None else QUOTA_EXCEEDED
                for entry in entries:
                    self._finished(entry, reason)
                self.counters["delivered" if error is None else "refusedTooLarge"] += len(entries)
            self._wake_feed.set()

        try:
            self.uplink.send(topic, payload, qos, delivered)
        except UplinkError as exc:  # not expected: the uplink's queue is far larger than `ahead`
            log.error(
                "spool: cannot hand %d message(s) to the uplink: %s (sent after a restart)", len(entries), exc
            )
            return
        self._handed += 1
        self._handed_bytes += len(payload)

    def _finished(self, entry: _Entry, reason: int) -> None:
        """AWS IoT acknowledged it (or refused it for good)."""
        entry.state |= FINISHED
        entry.acknowledge(reason)
        if self._full:
            self._wake_spill.set()  # it may have been the last one held
        if entry.seq:
            self._done_seqs.append(entry.seq)
            self._wake_spill.set()
        elif not entry.state & SPILLING:  # a spill under way settles it when it ends
            self._unspilled_bytes -= entry.size  # its place in _unspilled is dropped lazily
            if not self._accepting.is_set() and self._unspilled_bytes <= self.memory_bytes:
                self._accepting.set()  # AWS IoT caught up before the store had to
        if not entry.state & SPILLING:
            entry.payload = b""

    # ------------------------------------------------------------------ bounds and status

    async def _expirer(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.expire_every)
            old = await self._run(self._expire, self.store.clock.now() - self.max_age)
            if old:
                self._dropped("droppedExpired", old)

    def _expire(self, before: float) -> int:
        old = self.store.expire(before)
        self._stats = self.store.stats()
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
            q0, q1, self.store.when_full, old,
            extra=logevents.extra(
                logevents.SPOOL_DROPPED, reason=", ".join(reasons), dropped_qos0=q0, dropped_qos1=q1,
                dropped_expired=old,
            ),
        )  # fmt: skip

    def log_backlog(self) -> bool:
        """The spool's figures in the journal, when messages wait in the store (True: logged)."""
        s = self._stats
        if not s.messages:
            return False
        age = round(self.store.clock.now() - s.oldest) if s.oldest is not None else 0
        rate, throttled = round(self.uplink.publish_rate(), 1), self.uplink.status.throttled
        log.info(
            "spool: %d messages (%d bytes, the oldest %d s old) waiting; uplink publishing %g/s%s",
            s.messages, s.bytes, age, rate, ", throttled by the quota" if throttled else "",
            extra=logevents.extra(
                logevents.SPOOL_BACKLOG, spool_messages=s.messages, spool_bytes=s.bytes,
                oldest_age_seconds=age, publish_rate=rate, throttled=throttled,
            ),
        )  # fmt: skip
        return True

    def status_words(self) -> str:
        """For the STATUS= line: empty while nothing waits in the store."""
        s = self._stats
        if not s.messages and not self._full:
            return ""
        words = f"; spool {s.messages} messages, {s.bytes} bytes"
        if s.oldest is not None:
            words += f", oldest {self.store.clock.now() - s.oldest:.0f} s"
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
            "maxBytes": self.store.max_bytes,
            "oldestAgeSeconds": round(self.store.clock.now() - s.oldest, 1) if s.oldest is not None else None,
            "full": self._full,
            "segments": s.segments,
            "diskBytes": s.disk_bytes,
            "inMemory": sum(1 for e in self._unspilled if not e.state & GONE),
            "inMemoryBytes": self._unspilled_bytes,
            "withUplink": self._handed,
            **{k: self.counters[k] for k in COUNTERS},
        }


def _pop(queues: dict[str, deque[_Entry]], sensor: str) -> _Entry | None:
    """The head of a sensor's queue (the queue goes when empty)."""
    queue = queues.get(sensor)
    if not queue:
        return None
    entry = queue.popleft()
    if not queue:
        del queues[sensor]
    return entry


def _rule(section: BatchSection) -> _Rule:
    return _Rule(
        section.topic,
        Batcher(section.max_bytes, section.max_delay.seconds),
        section.basic_ingest_rule,
    )
