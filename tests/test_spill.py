"""The spill store (stores/spill.py): group commit, per-sensor order, survival across reopening and a killed
writer, torn tails cut, done records instead of rewrites, whole-segment deletion, the bounds policy (QoS 0
dropped first, QoS 1 never silently), expiry, bytes written per reading, and the move from an earlier
version's SQLite spool.db. The daemon's use of it: test_forwarder.py and test_spool_daemon.py."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.errors import SpillError, SpillFull
from gatewayd.stores.migrate import migrate_sqlite_spool
from gatewayd.stores.spill import HEADER, MAGIC, Reading, SpillStore

from .conftest import REPO


def _r(sensor: str, n: int, qos: int = 1, size: int = 10, at: float = 100.0) -> tuple[Reading, bool]:
    return Reading(sensor, f"sensors/{sensor}/t", str(n).encode().ljust(size, b"."), qos, False, at, at), True


def _numbers(store: SpillStore, sensor: str) -> list[int]:
    return [int(s.reading.payload.rstrip(b".")) for s in store.take(sensor, 10**6)]


def test_groups_keep_order_per_sensor_and_survive_reopening(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    store = SpillStore(d, 1_000_000)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    seqs, dropped = store.append([_r("a", 0), _r("b", 0), _r("a", 1)])
    assert dropped == [] and seqs == [1, 2, 3]
    store.append([_r("b", 1), _r("a", 2, at=101.0)])
    (segment,) = d.glob("*.seg")
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600 and segment.name == f"{1:016x}.seg"
    store.close()
    store = SpillStore(d, 1_000_000)
    assert store.recovered.readings == 5 and store.recovered.torn == []
    assert sorted(store.sensors()) == ["a", "b"] and store.waiting("a") == 3
    s = store.stats()
    assert (s.messages, s.bytes, s.oldest) == (5, 50, 100.0)
    got = store.take("a", 2)
    assert [(g.seq, g.reading.payload[:1], g.reading.topic) for g in got] == [
        (1, b"0", "sensors/a/t"), (3, b"1", "sensors/a/t"),
    ]  # fmt: skip
    assert store.take("a", 10)[0].reading.enqueued == 101.0
    assert _numbers(store, "b") == [0, 1]
    store.close()


def test_readings_handed_already_are_stored_but_not_queued(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spool", 10**6)
    reading, _ = _r("a", 0)
    (seq,) = store.append([(reading, False)])[0]
    assert (
        store.waiting("a") == 0 and store.stats().messages == 1
    )  # the uplink has it; done() comes from there
    store.close()
    store = SpillStore(tmp_path / "spool", 10**6)
    assert store.waiting("a") == 1  # after a restart everything live is sent again
    assert store.take("a", 5)[0].seq == seq


def test_done_records_and_whole_segment_deletion(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    store = SpillStore(d, 10**6, segment_bytes=1000)
    for i in range(0, 100, 2):
        store.append([_r("a", i), _r("b", i + 1)])
    assert (
        store.stats().segments == 6
    )  # 100 readings of 62 bytes (9 header, 31 fields, 22 data); 1000 per file
    files_before = {p.name: p.stat().st_size for p in d.glob("*.seg")}
    first_a = store.take("a", 10)
    assert store.done(g.seq for g in first_a) == 10
    assert store.done(g.seq for g in first_a) == 0  # twice is once
    store.flush()
    # nothing was rewritten: every file that existed is the same size but the newest (appended to)
    newest = max(files_before)
    assert all(
        (d / n).stat().st_size == size for n, size in files_before.items() if n != newest and (d / n).exists()
    )
    store.close()
    store = SpillStore(d, 10**6, segment_bytes=1000)
    assert store.stats().messages == 90
    assert _numbers(store, "a")[:3] == [20, 22, 24]
    store.close()
    store = SpillStore(d, 10**6, segment_bytes=1000)
    everything = sorted(g.seq for g in store.take("a", 1000) + store.take("b", 1000))
    store.done(everything[: len(everything) // 2])  # the older half: the oldest segments are all done
    store.flush()
    assert store.stats().segments < len(files_before)  # the oldest segments, all done, are gone
    store.done(everything)
    store.close()
    assert list(d.glob("*.seg")) == []
    store = SpillStore(d, 10**6, segment_bytes=1000)
    assert store.stats().messages == 0 and store.sensors() == []


def test_a_stored_group_survives_a_killed_writer(tmp_path: Path) -> None:
    """SIGKILL right after append() returned: everything appended is there afterwards, in order."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from gatewayd.stores.spill import Reading, SpillStore\n"
        "s = SpillStore(Path(sys.argv[1]), 10**8, segment_bytes=20000)\n"
        "for b in range(20):\n"
        "    s.append([(Reading('k', 't', str(b * 100 + i).encode(), 1, False, 1.0), True)\n"
        "              for i in range(100)])\n"
        "print('appended', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spool")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == -9 and "appended" in result.stdout, result.stderr
    store = SpillStore(tmp_path / "spool", 10**8)
    assert [int(s.reading.payload) for s in store.take("k", 5000)] == list(range(2000))


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 3, -1])
def test_a_torn_tail_is_cut_and_what_came_before_is_kept(tmp_path: Path, cut: int) -> None:
    """A power cut in the middle of a group leaves part of a record: detected (length, checksum) and cut off;
    the file then takes appends again."""
    d = tmp_path / "spool"
    store = SpillStore(d, 10**6)
    store.append([_r("a", i) for i in range(5)])
    store.close()
    (segment,) = d.glob("*.seg")
    good = segment.stat().st_size
    store = SpillStore(d, 10**6)
    store.append([_r("a", 5, size=40)])
    store.close()
    data = segment.read_bytes()
    torn = data[: good + cut] if cut > 0 else data[:-1] + bytes([data[-1] ^ 0xFF])  # cut short, or corrupt
    segment.write_bytes(torn)
    store = SpillStore(d, 10**6)
    assert len(store.recovered.torn) == 1 and f"offset {good}" in store.recovered.torn[0]
    assert segment.stat().st_size == good
    store.append([_r("a", 6)])
    store.close()
    store = SpillStore(d, 10**6)
    assert store.recovered.torn == []
    assert _numbers(store, "a") == [0, 1, 2, 3, 4, 6]


def test_a_segment_cut_while_being_created_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / f"{7:016x}.seg").write_bytes(MAGIC[:3])
    store = SpillStore(d, 10**6)
    assert store.stats().segments == 0 and list(d.glob("*.seg")) == []
    (d / f"{7:016x}.seg").write_bytes(b"something else entirely")
    with pytest.raises(SpillError, match="not a gatewayd spill segment"):
        SpillStore(d, 10**6)


def test_full_drops_oldest_qos0_first_and_never_qos1(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spool", max_bytes=100)
    store.append([_r("a", 0, qos=1), _r("b", 0, qos=0), _r("b", 1, qos=0), _r("a", 1, qos=1)])
    store.append([_r("c", i, qos=0) for i in range(6)])  # exactly full: 100 bytes
    assert store.room() == 80  # what drop-qos0 may free
    _, dropped = store.append([_r("a", 2, qos=1)])  # the oldest QoS 0 (b's first) makes room
    assert [(d.reading.sensor, d.reading.payload[:1]) for d in dropped] == [("b", b"0")]
    assert store.stats().bytes == 100
    for i in range(7):  # drop QoS 0 until none is left
        store.append([_r("a", 3 + i, qos=1)])
    assert store.room() == 0
    before = store.stats()
    with pytest.raises(SpillFull, match="no QoS 0 message left to drop"):
        store.append([_r("a", 99, qos=1)])
    assert store.stats() == before  # nothing changed
    assert _numbers(store, "a") == list(range(10)) and store.take("b", 10) == [] and store.take("c", 10) == []


def test_when_full_hold_keeps_everything_stored(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spool", max_bytes=30, when_full="hold")
    store.append([_r("a", 0, qos=0), _r("a", 1, qos=0), _r("a", 2, qos=1)])
    with pytest.raises(SpillFull, match="when_full is hold"):
        store.append([_r("a", 3, qos=0)])
    assert store.room() == 0 and _numbers(store, "a") == [0, 1, 2]


def test_when_full_drop_oldest_drops_any_qos_and_never_refuses(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spool", max_bytes=30, when_full="drop-oldest")
    store.append([_r("a", 0, qos=1), _r("a", 1, qos=0), _r("a", 2, qos=1)])
    _, dropped = store.append([_r("a", 3, qos=1), _r("a", 4, qos=1)])
    assert [int(d.reading.payload.rstrip(b".")) for d in dropped] == [0, 1]
    with pytest.raises(SpillFull, match="larger than the spool"):
        store.append([_r("a", 5, size=31)])
    store.close()
    store = SpillStore(tmp_path / "spool", max_bytes=30, when_full="drop-oldest")
    assert _numbers(store, "a") == [2, 3, 4]  # the drops were recorded


def test_expiry_by_age(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "spool", 10**6)
    store.append([_r("a", 0, at=10.0), _r("b", 0, at=20.0), _r("a", 1, at=30.0)])
    old = store.expire(before=25.0)
    assert [(o.reading.sensor, o.reading.enqueued) for o in old] == [("a", 10.0), ("b", 20.0)]
    assert store.expire(before=25.0) == []
    assert store.stats().oldest == 30.0 and _numbers(store, "a") == [1] and store.take("b", 5) == []


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def test_bytes_written_per_spilled_reading(tmp_path: Path) -> None:
    """Issue 15's target: a spilled reading costs at most twice its size plus 32 bytes on the card, done
    records and segment files included, when groups are of the size the forwarder makes (16 KiB)."""
    store = SpillStore(tmp_path / "spool", 10**9)
    reading = Reading("s001", "gw/sensors/s001/t", b"x" * 200, 1, False, 1.0)
    size = len(reading.topic) + len(reading.payload)
    group = [(reading, True)] * (16384 // size + 1)
    os.sync()
    before = _write_bytes()
    seqs: list[int] = []
    for _ in range(100):
        seqs += store.append(group)[0]
        store.done(seqs[-len(group) * 2 : -len(group)])  # acknowledged one group later, as a slow uplink does
    store.done(seqs)
    store.close()
    written = _write_bytes() - before
    per_reading = written / len(seqs)
    print(f"{len(seqs)} readings of {size} bytes: {written} bytes written, {per_reading:.0f} per reading")
    assert per_reading <= 2 * size + 32, per_reading


def _old_spool(path: Path, rows: list[tuple[str, str, bytes, int, int, float]]) -> None:
    """A spool.db as gatewayd 0.x wrote it (stores/spool.py, schema version 1)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, sensor TEXT NOT NULL,"
        " topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, enqueued REAL NOT NULL);"
        "CREATE INDEX messages_by_qos ON messages(qos, seq);"
        "CREATE INDEX messages_by_sensor ON messages(sensor, seq);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
    )
    db.executemany(
        "INSERT INTO messages (sensor, topic, payload, qos, retain, enqueued) VALUES (?,?,?,?,?,?)", rows
    )
    db.close()  # the WAL may stay: what an upgrade finds after a power cut


def test_an_earlier_versions_spool_db_is_moved_in_order_never_dropped(tmp_path: Path) -> None:
    old = tmp_path / "spool.db"
    rows = [
        (f"s{i % 3}", f"gw/sensors/s{i % 3}/t", f"{i}".encode() * 30, i % 2, 0, 1000.0 + i)
        for i in range(3000)
    ]
    _old_spool(old, rows)
    store = SpillStore(tmp_path / "spool", max_bytes=4096)  # far smaller than what waits: nothing is dropped
    moved = migrate_sqlite_spool(old, store)
    assert moved is not None and moved.messages == 3000
    assert not old.exists() and not Path(f"{old}-wal").exists() and not Path(f"{old}-shm").exists()
    assert store.max_bytes == 4096 and store.stats().messages == 3000
    store.close()
    store = SpillStore(tmp_path / "spool", max_bytes=4096)
    for n in range(3):
        got = store.take(f"s{n}", 5000)
        assert [g.reading.payload for g in got] == [f"{i}".encode() * 30 for i in range(n, 3000, 3)]
        assert [g.reading.qos for g in got[:2]] == [n % 2, (n + 3) % 2]
        assert got[0].reading.enqueued == 1000.0 + n and got[0].reading.topic == f"gw/sensors/s{n}/t"
    assert migrate_sqlite_spool(old, store) is None  # done once


def test_an_empty_or_schemaless_spool_db_is_removed(tmp_path: Path) -> None:
    old = tmp_path / "spool.db"
    sqlite3.connect(old).close()
    store = SpillStore(tmp_path / "spool", 10**6)
    moved = migrate_sqlite_spool(old, store)
    assert moved is not None and moved.messages == 0 and not old.exists()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("append"), st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 1)), max_size=6)
            ),
            st.tuples(st.just("take"), st.sampled_from("abc")),
            st.tuples(st.just("done"), st.integers(0, 5)),
            st.tuples(st.just("reopen"), st.just(0)),
        ),
        max_size=30,
    )
)
def test_the_store_matches_a_model_across_reopens(
    tmp_path_factory: pytest.TempPathFactory, ops: list
) -> None:
    """Any sequence of appends, takes, dones and reopens: what is live equals a plain model, in order."""
    d = tmp_path_factory.mktemp("model") / "spool"
    store = SpillStore(d, 10**6, segment_bytes=300)
    live: dict[int, tuple[str, int]] = {}  # seq -> (sensor, n)
    taken: list[int] = []
    n = 0
    for op, arg in ops:
        if op == "append":
            items = []
            for sensor, qos in arg:
                items.append(_r(sensor, n, qos))
                n += 1
            seqs, dropped = store.append(items)
            assert dropped == []
            for seq, (reading, _) in zip(seqs, items, strict=True):
                live[seq] = (reading.sensor, int(reading.payload.rstrip(b".")))
        elif op == "take":
            taken += [s.seq for s in store.take(arg, 2)]
        elif op == "done":
            done = taken[:arg]
            del taken[:arg]
            store.done(done)
            for seq in done:
                live.pop(seq, None)
        else:
            store.close()
            store = SpillStore(d, 10**6, segment_bytes=300)
            taken = []
            for sensor in "abc":
                expected = [v for _, (s, v) in sorted(live.items()) if s == sensor]
                assert store.waiting(sensor) == len(expected)
    store.close()
    store = SpillStore(d, 10**6, segment_bytes=300)
    for sensor in "abc":
        assert _numbers(store, sensor) == [v for _, (s, v) in sorted(live.items()) if s == sensor]
    assert store.stats().messages == len(live)
    store.close()
