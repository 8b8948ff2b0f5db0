"""The age clock (stores/ageclock.py) and readings' ages in the spill store: an age is never made larger by a
wall-clock jump or a reboot (issue 16). The wall clock is not read at all: these tests move only the time
since boot and the boot id, which is all the age clock sees."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from gatewayd.stores.ageclock import AgeClock
from gatewayd.stores.spill import HEADER, MAGIC_V1, READING_V1, Reading, SpillStore


class Boot:
    """A fake machine: a boot id and the seconds since that boot."""

    def __init__(self, boot_id: str = "boot-1", uptime: float = 1000.0) -> None:
        self.id, self.uptime = boot_id, uptime

    def reboot(self, boot_id: str, uptime: float) -> None:
        self.id, self.uptime = boot_id, uptime

    def clock(self, directory: Path) -> AgeClock:
        return AgeClock(directory, lambda: self.id, lambda: self.uptime)


def _reading(n: int, wall: float = 1.7e9) -> tuple[Reading, bool]:
    return Reading("s1", "sensors/s1/t", b"%d" % n, 1, False, wall), True


def test_within_a_boot_the_clock_goes_on_across_restarts(tmp_path: Path) -> None:
    boot = Boot(uptime=500.0)
    clock = boot.clock(tmp_path)
    clock.open(None)
    assert clock.now() == 500.0
    boot.uptime = 800.0
    again = boot.clock(tmp_path)  # the daemon restarted in the same boot
    again.open(600.0)
    assert again.now() == 800.0 and not again.rebooted
    assert json.loads((tmp_path / "clock").read_text()) == {"bootId": "boot-1", "base": 0.0}


def test_after_a_reboot_the_clock_starts_at_the_newest_stamp(tmp_path: Path) -> None:
    boot = Boot(uptime=5000.0)
    boot.clock(tmp_path).open(None)
    boot.reboot("boot-2", 30.0)  # off for any time: not counted
    clock = boot.clock(tmp_path)
    clock.open(4990.0)
    assert clock.now() == 4990.0 + 30.0 and clock.rebooted
    assert json.loads((tmp_path / "clock").read_text()) == {"bootId": "boot-2", "base": 4990.0}


def test_no_file_is_rewritten_while_nothing_changes(tmp_path: Path) -> None:
    boot = Boot()
    boot.clock(tmp_path).open(None)
    before = (tmp_path / "clock").stat().st_mtime_ns, (tmp_path / "clock").stat().st_ino
    boot.uptime += 100
    boot.clock(tmp_path).open(900.0)
    assert ((tmp_path / "clock").stat().st_mtime_ns, (tmp_path / "clock").stat().st_ino) == before


def test_a_wall_clock_jump_expires_nothing(tmp_path: Path) -> None:
    """Issue 16's report: readings 90 s old were dropped as older than max_age when NTP moved the wall clock
    20 days forward. The store never reads the wall clock: the readings' recorded wall times are whatever
    the clock said (20 days behind here) and only the time since boot decides their age."""
    boot = Boot(uptime=100.0)
    store = SpillStore(tmp_path / "spool", 10**6, clock=boot.clock(tmp_path / "spool"))
    behind = 1.7e9 - 20 * 86400
    store.append([_reading(i, wall=behind) for i in range(20)])
    boot.uptime += 90.0
    max_age = 3600.0
    assert store.expire(store.clock.now() - max_age) == []
    assert store.clock.now() - (store.stats().oldest or 0) == 90.0
    boot.uptime += 3600.0  # really waited longer than max_age: now they go
    assert len(store.expire(store.clock.now() - max_age)) == 20


def test_ages_across_a_reboot_are_never_larger(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    boot = Boot(uptime=1000.0)
    store = SpillStore(d, 10**6, clock=boot.clock(d))
    store.append([_reading(0)])  # stamped 1000
    boot.uptime = 1200.0
    store.append([_reading(1)])  # stamped 1200
    store.close()
    boot.reboot("boot-2", uptime=20.0)  # the gateway was off for a week
    store = SpillStore(d, 10**6, clock=boot.clock(d))
    ages = sorted(
        store.clock.now() - s.reading.aged for s in store.take("s1", 10) if s.reading.aged is not None
    )
    assert ages == [20.0, 220.0]  # what they waited while a gateway ran, not the week off
    assert store.expire(store.clock.now() - 3600) == []


def test_segments_of_the_earlier_layout_are_read_and_aged_from_now(tmp_path: Path) -> None:
    """Segments written before the age clock existed (GWSPILL1: the wall-clock time only) are read; their
    readings' ages count from this start, and new readings go to a segment of the new layout."""
    d = tmp_path / "spool"
    d.mkdir()
    records = []
    for seq in (1, 2):
        sensor, topic, payload = b"s1", b"sensors/s1/t", b"old-%d" % seq
        body = READING_V1.pack(seq, 12345.0, 1, len(sensor), len(topic)) + sensor + topic + payload
        records.append(HEADER.pack(ord("M"), len(body), zlib.crc32(body, zlib.crc32(b"M"))) + body)
    (d / f"{1:016x}.seg").write_bytes(MAGIC_V1 + b"".join(records))
    boot = Boot(uptime=50.0)
    store = SpillStore(d, 10**6, clock=boot.clock(d))
    assert store.recovered.readings == 2 and store.expire(store.clock.now() - 10) == []
    store.append([_reading(3)])
    assert sorted(p.name for p in d.glob("*.seg")) == [f"{1:016x}.seg", f"{3:016x}.seg"]
    taken = store.take("s1", 10)
    assert [s.reading.payload for s in taken] == [b"old-1", b"old-2", b"3"]
    assert taken[0].reading.enqueued == 12345.0 and taken[0].reading.aged == 50.0
    store.close()
    store = SpillStore(d, 10**6, clock=boot.clock(d))  # reopened: both layouts read again
    assert [s.reading.payload for s in store.take("s1", 10)] == [b"old-1", b"old-2", b"3"]
