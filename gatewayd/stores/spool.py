"""The durable spool: messages accepted from sensors for upstream, kept in SQLite (WAL, synchronous=FULL,
mode 0600) until AWS IoT acknowledged them. Used from one thread at a time (the forwarder runs every call in
its single worker thread).

- Group commit: append() takes a batch and writes it in one transaction, one fsync for many messages.
- Order: messages leave oldest first (by sequence number), so each sensor's order is kept; per_sensor()
  reads one sensor's messages in order, for a fair (round-robin) feed.
- Bounds: `max_bytes` of payload and `max_age` seconds. When a batch does not fit, `when_full` decides:
  "drop-qos0" (the default) drops the oldest QoS 0 messages; "hold" drops nothing stored; "drop-oldest" drops
  the oldest messages whatever their QoS. If that does not make room, the batch is refused (SpoolFull, nothing
  written: the caller holds back the sensors' acknowledgements of QoS 1 messages, so the sensors keep them),
  so QoS 1 is never silently dropped. Messages older than `max_age` are dropped by expire(). Every drop is
  returned, for counting and the log.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gatewayd.core.errors import GatewaydError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    enqueued REAL NOT NULL
);
CREATE INDEX messages_by_qos ON messages(qos, seq);
CREATE INDEX messages_by_sensor ON messages(sensor, seq);
"""


WHEN_FULL = ("drop-qos0", "hold", "drop-oldest")
_NO_ROOM = {
    "drop-qos0": "no QoS 0 message left to drop",
    "hold": "when_full is hold: nothing stored is dropped",
    "drop-oldest": "the batch is larger than the spool",
}
_DROPPABLE = {"drop-qos0": "WHERE qos=0", "hold": "WHERE 0", "drop-oldest": ""}  # what may go for room


class SpoolError(GatewaydError):
    pass


class SpoolFull(SpoolError):
    """QoS 1 messages that did not fit; the caller must not acknowledge them to their sensor."""


@dataclass(frozen=True)
class Message:
    sensor: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass(frozen=True)
class Spooled:
    seq: int
    message: Message
    enqueued: float


@dataclass(frozen=True)
class Stats:
    messages: int
    bytes: int
    oldest: float | None  # enqueue time of the oldest message


class Spool:
    def __init__(self, path: Path, max_bytes: int, max_age: float, when_full: str = "drop-qos0") -> None:
        if max_bytes <= 0 or max_age <= 0:
            raise ValueError("max_bytes and max_age must be positive")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {', '.join(WHEN_FULL)}")
        self.when_full = when_full
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged message survives a power cut
        with self._write():
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(statement)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            else:
                (version,) = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if int(version) > SCHEMA_VERSION:
                    raise SpoolError(f"{path} has schema version {version}, newer than this gatewayd")
        self._bytes = self._sum()
        (self._count,) = self.db.execute("SELECT COUNT(*) FROM messages").fetchone()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _sum(self) -> int:
        (total,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
        return int(total)

    # ------------------------------------------------------------------ in

    def append(self, batch: Iterable[Message], now: float) -> tuple[list[int], list[Spooled]]:
        """Store a batch in one transaction. Returns (sequence numbers of the batch, QoS 0 messages dropped to
        make room). SpoolFull (nothing written) when the QoS 1 messages do not fit even then."""
        messages = list(batch)
        incoming = sum(len(m.payload) for m in messages)
        dropped: list[Spooled] = []
        with self._write():
            over = self._bytes + incoming - self.max_bytes
            if over > 0:
                dropped = self._drop_for_room(over)
                freed = sum(len(d.message.payload) for d in dropped)
                if freed < over:  # the drops above are rolled back with the refusal: nothing changes
                    what = _NO_ROOM[self.when_full]
                    raise SpoolFull(
                        f"spool full ({self._bytes} of {self.max_bytes} bytes, {what}): "
                        f"{len(messages)} message(s) refused"
                    )
            self.db.executemany(
                "INSERT INTO messages (sensor, topic, payload, qos, retain, enqueued) VALUES (?,?,?,?,?,?)",
                [(m.sensor, m.topic, m.payload, m.qos, int(m.retain), now) for m in messages],
            )
            (last,) = self.db.execute("SELECT last_insert_rowid()").fetchone()
            # one writer, one transaction, AUTOINCREMENT: the batch's sequence numbers are consecutive
            seqs = list(range(last - len(messages) + 1, last + 1)) if messages else []
        self._bytes += incoming - sum(len(d.message.payload) for d in dropped)
        self._count += len(seqs) - len(dropped)
        return seqs, dropped

    def _drop_for_room(self, needed: int) -> list[Spooled]:
        """Inside a write transaction: delete the oldest droppable messages until `needed` bytes are freed."""
        dropped: list[Spooled] = []
        freed = 0
        for row in self.db.execute(f"SELECT * FROM messages {_DROPPABLE[self.when_full]} ORDER BY seq"):
            if freed >= needed:
                break
            dropped.append(_row(row))
            freed += len(row[3])
        for d in dropped:
            self.db.execute("DELETE FROM messages WHERE seq=?", (d.seq,))
        return dropped

    # ------------------------------------------------------------------ out

    def peek(self, limit: int, after: int = 0) -> list[Spooled]:
        """The oldest `limit` messages with a sequence number above `after`."""
        rows = self.db.execute("SELECT * FROM messages WHERE seq>? ORDER BY seq LIMIT ?", (after, limit))
        return [_row(r) for r in rows]

    def per_sensor(self, sensor: str, after: int, limit: int) -> list[Spooled]:
        """One sensor's oldest `limit` messages with a sequence number above `after`."""
        rows = self.db.execute(
            "SELECT * FROM messages WHERE sensor=? AND seq>? ORDER BY seq LIMIT ?", (sensor, after, limit)
        )
        return [_row(r) for r in rows]

    def sensors(self) -> list[str]:
        """Every sensor with a message in the spool (at start, to resume the feed)."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT sensor FROM messages")]

    def room(self) -> int:
        """Payload bytes an append could take now: the free space plus what the policy may drop."""
        (droppable,) = self.db.execute(
            f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages {_DROPPABLE[self.when_full]}"
        ).fetchone()
        return self.max_bytes - self._bytes + int(droppable)

    def ack(self, seqs: Iterable[int]) -> None:
        """Delivered: forget them (one transaction)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._write():
            for start in range(0, len(seqs), 500):  # SQLite allows 999 parameters per statement (before 3.32)
                chunk = seqs[start : start + 500]
                marks = ",".join("?" * len(chunk))
                (count, size) = self.db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages "
                    f"WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                self.db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", chunk)
                self._bytes -= int(size)
                self._count -= int(count)

    def expire(self, now: float) -> list[Spooled]:
        """Drop (and return, for counting and logging) every message older than max_age."""
        limit = now - self.max_age
        with self._write():
            old = [
                _row(r)
                for r in self.db.execute("SELECT * FROM messages WHERE enqueued<? ORDER BY seq", (limit,))
            ]
            self.db.execute("DELETE FROM messages WHERE enqueued<?", (limit,))
        self._bytes -= sum(len(s.message.payload) for s in old)
        self._count -= len(old)
        return old

    def stats(self) -> Stats:
        row = self.db.execute("SELECT enqueued FROM messages ORDER BY seq LIMIT 1").fetchone()
        return Stats(self._count, self._bytes, row[0] if row else None)  # the oldest is the first in


def _row(r: tuple[int, str, str, bytes, int, int, float]) -> Spooled:
    return Spooled(r[0], Message(r[1], r[2], bytes(r[3]), r[4], bool(r[5])), r[6])
