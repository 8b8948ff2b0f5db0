"""The spill store: readings that have to wait (uplink down or throttled, slow acknowledgements, memory bound
reached), kept on flash until AWS IoT acknowledged them. Made for SD cards (docs/architecture.md, "Data
plane"):

- **Append only.** Records go to the end of the newest segment file (`<first seq, 16 hex digits>.seg`, mode
  0600, in a 0700 directory); a record is never rewritten. One write and one fdatasync per group of records
  (group commit). What AWS IoT acknowledged, what a bound dropped and what expired is recorded as a small
  "done" record listing sequence-number ranges, written with the next group (or at close) without an fsync of
  its own: a done record lost in a power cut means a duplicate upstream, never a loss.
- **A segment is deleted whole** once every reading in it is done, oldest segment first (a later segment may
  hold the done records of an earlier one, never the reverse). Nothing is compacted or rewritten.
- **Checksummed records** (CRC-32 of kind and body); at open, every segment is read, a torn tail (a record
  cut by a power cut, or failing its checksum) is cut off the file, and the done records are applied.
- **Order and fairness**: sequence numbers grow across segments; each sensor's readings are kept in a queue of
  sequence numbers (`take()` reads a sensor's oldest), so replay is per-sensor in order and round robin.
- **Bounds**: `max_bytes` of live payload; when a group does not fit, `when_full` decides as the SQLite spool
  of earlier versions did: "drop-qos0" drops the oldest QoS 0 readings, "hold" drops nothing stored,
  "drop-oldest" drops the oldest whatever their QoS; if that does not make room the group is refused
  (SpillFull, nothing written). Expiry by age: `expire()`.

- **Ages that do not jump**: a reading's age (`expire()`, the oldest's age) is measured on the age clock
  (stores/ageclock.py: time since boot plus a base kept across reboots), never on the wall clock, which a
  gateway without a real-time clock sees jump by days when NTP sets it.

Memory: an in-memory index of 4 + 4 + 8 + 1 bytes per live reading (offset, payload length, age-clock stamp,
flags) plus 8 per reading not handed to the uplink yet, in arrays, never a Python object per reading.

Record layout (little endian): kind (1 byte: M reading, D done), body length (4), CRC-32 of kind + body (4),
then the body. M: seq (8), received (8, float seconds, wall clock: for batches' timestamps), age-clock stamp
(8, float seconds), flags (1: QoS in bits 0-1, retain in bit 2), sensor length (2), topic length (2), sensor,
topic, payload. D: (first seq (8), count (4)) ranges. Segments of earlier versions (`GWSPILL1`: no age-clock
stamp) are read, never appended to; their readings' ages count from the start that first read them.
Used from one thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gatewayd.core.errors import SpillError, SpillFull
from gatewayd.stores.ageclock import AgeClock

MAGIC = b"GWSPILL2"
MAGIC_V1 = b"GWSPILL1"  # earlier versions' segments: read, never appended to
HEADER = struct.Struct("<BII")  # kind, body length, crc32
READING = struct.Struct("<QddBHH")  # seq, received (wall clock), age-clock stamp, flags, sensor/topic length
READING_V1 = struct.Struct("<QdBHH")  # seq, received (wall clock), flags, sensor length, topic length
RANGE = struct.Struct("<QI")
KIND_READING = ord("M")
KIND_DONE = ord("D")
SEGMENT_BYTES = 4 << 20  # a new segment once the newest is this large
MAX_BODY = 16 << 20  # a larger length in a header is corruption, not a record
LIVE, QOS = 1, 2  # flag bits in the index

WHEN_FULL = ("drop-qos0", "hold", "drop-oldest")
_NO_ROOM = {
    "drop-qos0": "no QoS 0 message left to drop",
    "hold": "when_full is hold: nothing stored is dropped",
    "drop-oldest": "the batch is larger than the spool",
}


@dataclass(frozen=True, slots=True)
class Reading:
    sensor: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    enqueued: float  # seconds (wall clock) when the gateway received it: for batches' timestamps only
    aged: float | None = None  # its age-clock stamp (stores/ageclock.py); None: now, when it is appended


@dataclass(frozen=True, slots=True)
class Stored:
    seq: int
    reading: Reading


@dataclass(frozen=True)
class Stats:
    messages: int
    bytes: int
    oldest: float | None  # the age-clock stamp of the oldest live reading (its age: clock.now() - oldest)
    segments: int
    disk_bytes: int  # the segment files' sizes


@dataclass(frozen=True)
class Recovered:
    """What opening found (logged by the caller)."""

    segments: int
    readings: int
    torn: list[str]  # one line per segment whose tail was cut


class _Seqs:
    """A FIFO of sequence numbers in an array (8 bytes each)."""

    __slots__ = ("head", "items")

    def __init__(self) -> None:
        self.items = array("Q")
        self.head = 0

    def __len__(self) -> int:
        return len(self.items) - self.head

    def append(self, seq: int) -> None:
        self.items.append(seq)

    def popleft(self) -> int:
        seq = self.items[self.head]
        self.head += 1
        if self.head >= 1024 and self.head * 2 >= len(self.items):
            del self.items[: self.head]
            self.head = 0
        return seq


class _Segment:
    __slots__ = ("aged", "first", "flags", "lengths", "live", "offsets", "path", "rfd", "size", "version")

    def __init__(self, first: int, path: Path, size: int, version: int = 2) -> None:
        self.first = first
        self.version = version
        self.path = path
        self.size = size
        self.offsets = array("I")
        self.lengths = array("I")  # payload bytes
        self.aged = array("d")  # age-clock stamps
        self.flags = bytearray()
        self.live = 0
        self.rfd = -1  # opened for reading back on first use

    def close(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1

    def end(self) -> int:
        """One past the last sequence number in it."""
        return self.first + len(self.offsets)


class SpillStore:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        when_full: str = "drop-qos0",
        segment_bytes: int = SEGMENT_BYTES,
        clock: AgeClock | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {', '.join(WHEN_FULL)}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # the segments' first sequence numbers, for bisect
        self._queues: dict[str, _Seqs] = {}  # per sensor: live readings not taken yet, oldest first
        self._fd = -1  # the newest segment, open for appending
        self._next = 1
        self._bytes = 0  # live payload bytes
        self._count = 0
        self._qos0_bytes = 0  # live QoS 0 payload bytes
        self._done_ranges: list[tuple[int, int]] = []  # done records not written yet
        self._drop_at = 0  # sequence number below which nothing droppable is live (drops go oldest first)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.clock = clock if clock is not None else AgeClock(directory)
        self._v1: list[
            _Segment
        ] = []  # earlier versions' segments: their readings are stamped once the clock is
        self.recovered = self._recover()

    # ------------------------------------------------------------------ opening

    def _recover(self) -> Recovered:
        torn: list[str] = []
        names = sorted(p for p in self.directory.iterdir() if p.suffix == ".seg")
        sensors: list[tuple[int, str]] = []  # every reading's sensor, until the done records are applied
        for path in names:
            try:
                first = int(path.stem, 16)
            except ValueError:
                continue
            self._load(path, first, torn, sensors)
        for seq, sensor in sensors:
            where = self._locate(seq)
            if where is not None and where[0].flags[where[1]] & LIVE:
                self._queue(sensor).append(seq)
        self._delete_finished()
        if self._segments:
            self._next = max(self._next, self._segments[-1].end())
        stamps = [max(seg.aged) for seg in self._segments if seg.version == 2 and seg.aged]
        self.clock.open(max(stamps) if stamps else None)
        now = self.clock.now()
        for seg in self._v1:  # no stamp of their own: their age counts from now
            seg.aged = array("d", [now]) * len(seg.offsets)
        self._v1.clear()
        return Recovered(len(names), self._count, torn)

    def _load(self, path: Path, first: int, torn: list[str], sensors: list[tuple[int, str]]) -> None:
        data = path.read_bytes()
        version = 1 if data.startswith(MAGIC_V1) else 2
        seg = _Segment(first, path, len(data), version)
        if not data.startswith(MAGIC) and version == 2:
            if len(data) > len(MAGIC) or not (MAGIC.startswith(data) or MAGIC_V1.startswith(data)):
                raise SpillError(f"{path} is not a gatewayd spill segment")
            data = b""  # cut while being created
        pos = len(MAGIC)
        done: list[tuple[int, int]] = []
        while pos < len(data):
            record = self._parse(data, pos, version)
            if record is None or (record[0] == KIND_READING and record[2] != seg.end()):
                torn.append(
                    f"{path.name}: {len(data) - pos} bytes at offset {pos} cut (torn or corrupt record)"
                )
                break
            kind, end, seq, header = record
            if kind == KIND_READING:
                _, aged, flags, sensor_len, topic_len, size = header
                at = pos + HEADER.size + size
                sensors.append((seq, sys.intern(data[at : at + sensor_len].decode())))
                seg.offsets.append(pos)
                seg.lengths.append(end - at - sensor_len - topic_len)
                seg.aged.append(aged)
                seg.flags.append(LIVE | (QOS if flags & 3 else 0))
                seg.live += 1
            else:
                done.extend(RANGE.iter_unpack(data[pos + HEADER.size : end]))
            pos = end
        if pos < len(data) or not data:
            self._cut(path, max(pos, len(MAGIC)) if data else 0)
            seg.size = max(pos, len(MAGIC)) if data else 0
        if seg.size == 0:
            path.unlink()
            return
        self._segments.append(seg)
        self._firsts.append(first)
        if version == 1:
            self._v1.append(seg)
        self._count += seg.live
        self._bytes += sum(seg.lengths)
        self._qos0_bytes += sum(n for n, f in zip(seg.lengths, seg.flags, strict=True) if not f & QOS)
        self._next = max(self._next, seg.end())
        for start, count in done:
            self._mark_done(start, count)

    @staticmethod
    def _parse(
        data: bytes, pos: int, version: int = 2
    ) -> tuple[int, int, int, tuple[int, float, int, int, int, int]] | None:
        """(kind, end offset, seq, reading header) of the record at `pos`, or None when it is torn. The
        header: seq, age-clock stamp (0 in a version 1 segment), flags, sensor and topic length, its size."""
        if pos + HEADER.size > len(data):
            return None
        kind, length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if kind not in (KIND_READING, KIND_DONE) or length > MAX_BODY or end > len(data):
            return None
        body = memoryview(data)[pos + HEADER.size : end]
        if zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
            return None
        if kind == KIND_DONE:
            return (kind, end, 0, (0, 0.0, 0, 0, 0, 0)) if length % RANGE.size == 0 else None
        layout = READING if version == 2 else READING_V1
        if length < layout.size:
            return None
        if version == 2:
            seq, _, aged, flags, sensor_len, topic_len = READING.unpack_from(body)
        else:
            (seq, _, flags, sensor_len, topic_len), aged = READING_V1.unpack_from(body), 0.0
        if layout.size + sensor_len + topic_len > length:
            return None
        return kind, end, seq, (seq, aged, flags, sensor_len, topic_len, layout.size)

    @staticmethod
    def _cut(path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _queue(self, sensor: str) -> _Seqs:
        q = self._queues.get(sensor)
        if q is None:
            q = self._queues[sensor] = _Seqs()
        return q

    # ------------------------------------------------------------------ reading back

    def _locate(self, seq: int) -> tuple[_Segment, int] | None:
        i = bisect_right(self._firsts, seq) - 1
        if i < 0:
            return None
        seg = self._segments[i]
        ordinal = seq - seg.first
        return (seg, ordinal) if ordinal < len(seg.offsets) else None

    def _read(self, seg: _Segment, ordinal: int) -> bytes:
        if seg.rfd < 0:
            seg.rfd = os.open(seg.path, os.O_RDONLY)
        start = seg.offsets[ordinal]
        _, length, _ = HEADER.unpack(os.pread(seg.rfd, HEADER.size, start))
        body = os.pread(seg.rfd, length, start + HEADER.size)
        if len(body) != length:
            raise SpillError(f"{seg.path}: record at {start} is cut short")
        return body

    def _reading(self, seg: _Segment, ordinal: int) -> Reading:
        body = self._read(seg, ordinal)
        if seg.version == 2:
            _, enqueued, _, flags, sensor_len, topic_len = READING.unpack_from(body)
            a = READING.size
        else:
            _, enqueued, flags, sensor_len, topic_len = READING_V1.unpack_from(body)
            a = READING_V1.size
        b = a + sensor_len
        c = b + topic_len
        return Reading(
            body[a:b].decode(), body[b:c].decode(), bytes(body[c:]), flags & 3, bool(flags & 4), enqueued,
            seg.aged[ordinal],
        )  # fmt: skip

    def sensors(self) -> list[str]:
        """Sensors with readings not taken yet."""
        return [s for s, q in self._queues.items() if len(q)]

    def waiting(self, sensor: str) -> int:
        q = self._queues.get(sensor)
        return len(q) if q is not None else 0

    def take(self, sensor: str, limit: int) -> list[Stored]:
        """Up to `limit` of a sensor's oldest live readings not taken yet (to hand to the uplink); they stay
        stored until done()."""
        q = self._queues.get(sensor)
        out: list[Stored] = []
        while q is not None and len(q) and len(out) < limit:
            seq = q.popleft()
            where = self._locate(seq)
            if where is None or not where[0].flags[where[1]] & LIVE:
                continue  # dropped or expired meanwhile
            out.append(Stored(seq, self._reading(*where)))
        if q is not None and not len(q):
            del self._queues[sensor]
        return out

    # ------------------------------------------------------------------ in

    def append(
        self, batch: Iterable[tuple[Reading, bool]], sync: bool = True
    ) -> tuple[list[int], list[Stored]]:
        """Store a group in one write and one fdatasync. Each item is (reading, queued): queued readings may
        be take()n later; the others are already with the uplink (their done() comes from there). Returns the
        group's sequence numbers and the readings dropped for room (when_full). SpillFull, nothing written,
        when they do not fit."""
        items = list(batch)
        incoming = sum(len(r.payload) for r, _ in items)
        over = self._bytes + incoming - self.max_bytes
        dropped: list[Stored] = []
        if over > 0:
            victims = self._droppable(over)
            if sum(len_ for _, _, len_ in victims) < over:
                raise SpillFull(
                    f"spool full ({self._bytes} of {self.max_bytes} bytes, {_NO_ROOM[self.when_full]}): "
                    f"{len(items)} message(s) refused"
                )
            for seg, ordinal, _ in victims:
                dropped.append(Stored(seg.first + ordinal, self._reading(seg, ordinal)))
            self.done(s.seq for s in dropped)
        if not items and not self._done_ranges:
            return [], dropped
        seg = self._head(incoming)
        chunks: list[bytes] = []
        pos = seg.size
        seqs: list[int] = []
        new_offsets: list[int] = []
        now = self.clock.now()
        stamps = [now if r.aged is None else r.aged for r, _ in items]
        for (reading, _), aged in zip(items, stamps, strict=True):
            sensor, topic = reading.sensor.encode(), reading.topic.encode()
            flags = reading.qos | (4 if reading.retain else 0)
            body = b"".join(
                (READING.pack(self._next, reading.enqueued, aged, flags, len(sensor), len(topic)), sensor,
                 topic, reading.payload)
            )  # fmt: skip
            chunks.append(HEADER.pack(KIND_READING, len(body), zlib.crc32(body, zlib.crc32(b"M"))))
            chunks.append(body)
            new_offsets.append(pos)
            pos += HEADER.size + len(body)
            seqs.append(self._next)
            self._next += 1
        chunks.append(self._done_record())
        data = b"".join(chunks)
        try:
            written = os.pwrite(self._fd, data, seg.size)
            if written != len(data):
                raise OSError(f"short write to {seg.path} ({written} of {len(data)} bytes)")
            if sync:
                os.fdatasync(self._fd)
        except OSError:
            self._next = seqs[0] if seqs else self._next
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)  # nothing of a failed group stays (a retry writes it again)
            raise
        self._done_ranges.clear()
        seg.size += len(data)
        for (reading, queued), seq, offset, aged in zip(items, seqs, new_offsets, stamps, strict=True):
            seg.offsets.append(offset)
            seg.lengths.append(len(reading.payload))
            seg.aged.append(aged)
            seg.flags.append(LIVE | (QOS if reading.qos else 0))
            if queued:
                self._queue(reading.sensor).append(seq)
        seg.live += len(items)
        self._count += len(items)
        self._bytes += incoming
        self._qos0_bytes += sum(len(r.payload) for r, _ in items if not r.qos)
        self._delete_finished()
        return seqs, dropped

    def _head(self, incoming: int) -> _Segment:
        """The segment to append to: a new one when there is none, or the newest is full or of version 1."""
        if self._segments and self._fd >= 0 and self._segments[-1].size < self.segment_bytes:
            return self._segments[-1]
        newest = self._segments[-1] if self._segments else None
        if newest is not None and self._fd < 0 and newest.size < self.segment_bytes and newest.version == 2:
            seg = self._segments[-1]
            self._fd = os.open(seg.path, os.O_WRONLY)
            return seg
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        path = self.directory / f"{self._next:016x}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, MAGIC)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        self._fsync_dir()
        self._fd = fd
        seg = _Segment(self._next, path, len(MAGIC))
        self._segments.append(seg)
        self._firsts.append(seg.first)
        return seg

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _done_record(self) -> bytes:
        if not self._done_ranges:
            return b""
        body = b"".join(RANGE.pack(start, count) for start, count in self._done_ranges)
        return HEADER.pack(KIND_DONE, len(body), zlib.crc32(body, zlib.crc32(b"D"))) + body

    def _droppable(self, needed: int) -> list[tuple[_Segment, int, int]]:
        """The oldest live readings when_full allows to drop, until `needed` payload bytes (or all there are).
        A cursor skips what can never be dropped again (done, or QoS 1 under drop-qos0): drops go oldest
        first, so the scan does not start from the beginning every time the store is full."""
        if self.when_full == "hold":
            return []
        only_qos0 = self.when_full == "drop-qos0"
        out: list[tuple[_Segment, int, int]] = []
        freed = 0
        moving = True
        for seg in self._segments:
            if seg.end() <= self._drop_at:
                continue
            for i in range(max(self._drop_at - seg.first, 0), len(seg.flags)):
                flag = seg.flags[i]
                if flag & LIVE and not (only_qos0 and flag & QOS):
                    moving = False
                    out.append((seg, i, seg.lengths[i]))
                    freed += seg.lengths[i]
                    if freed >= needed:
                        return out
                elif moving:
                    self._drop_at = seg.first + i + 1
        return out

    # ------------------------------------------------------------------ done

    def done(self, seqs: Iterable[int]) -> int:
        """Readings AWS IoT acknowledged (or dropped, or expired): recorded with the next write. Returns how
        many were live."""
        count = 0
        run_start, run_len = -1, 0
        for seq in sorted(seqs):
            if self._mark_done(seq, 1):
                count += 1
                if run_len and seq == run_start + run_len:
                    run_len += 1
                else:
                    if run_len:
                        self._done_ranges.append((run_start, run_len))
                    run_start, run_len = seq, 1
        if run_len:
            self._done_ranges.append((run_start, run_len))
        return count

    def _mark_done(self, start: int, count: int) -> bool:
        hit = False
        for seq in range(start, start + count):
            where = self._locate(seq)
            if where is None:
                continue
            seg, i = where
            if seg.flags[i] & LIVE:
                seg.flags[i] &= ~LIVE & 0xFF
                seg.live -= 1
                self._count -= 1
                self._bytes -= seg.lengths[i]
                if not seg.flags[i] & QOS:
                    self._qos0_bytes -= seg.lengths[i]
                hit = True
        return hit

    def flush(self, sync: bool = False) -> None:
        """Write the pending done records (at close, or when nothing else was written for a while)."""
        if self._done_ranges:
            self.append([], sync=sync)
        self._delete_finished()

    def _delete_finished(self) -> None:
        """Delete the oldest segments whose every reading is done (never the one being appended to)."""
        finished = next(
            (i for i, seg in enumerate(self._segments[:-1]) if seg.live), len(self._segments[:-1])
        )
        if self._segments and not self._count and self._fd < 0:
            finished = len(self._segments)  # nothing live at all, and no segment open for appending
        if not finished:
            return
        if self._done_ranges:
            self.append([], sync=True)  # their done records must outlive them
        elif self._fd >= 0:
            os.fdatasync(self._fd)
        for seg in self._segments[:finished]:
            seg.close()
            seg.path.unlink(missing_ok=True)
        del self._segments[:finished]
        del self._firsts[:finished]
        self._fsync_dir()

    # ------------------------------------------------------------------ bounds and figures

    def room(self) -> int:
        """Payload bytes an append could take now: the free space plus what when_full may drop."""
        droppable = {"hold": 0, "drop-qos0": self._qos0_bytes, "drop-oldest": self._bytes}[self.when_full]
        return self.max_bytes - self._bytes + droppable

    def expire(self, before: float) -> list[Stored]:
        """Drop (and return) every live reading stamped before `before` on the age clock (self.clock)."""
        out: list[Stored] = []
        for seg in self._segments:
            if not seg.live:
                continue
            for i, aged in enumerate(seg.aged):
                if aged < before and seg.flags[i] & LIVE:
                    out.append(Stored(seg.first + i, self._reading(seg, i)))
        self.done(s.seq for s in out)
        return out

    def stats(self) -> Stats:
        oldest = None
        for seg in self._segments:
            if seg.live:
                oldest = next(seg.aged[i] for i, f in enumerate(seg.flags) if f & LIVE)
                break
        disk = sum(seg.size for seg in self._segments)
        return Stats(self._count, self._bytes, oldest, len(self._segments), disk)

    def close(self) -> None:
        try:
            self.flush(sync=True)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._count:
                self._delete_finished()  # nothing waits: no file is left behind
            for seg in self._segments:
                seg.close()
