"""The durable spool store: group commit, order, survival across reopening and a killed writer, the bounds
policy (QoS 0 dropped first, QoS 1 never silently), expiry. The daemon's use of it: test_spool_daemon.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.stores.spool import Message, Spool, SpoolFull

from .conftest import REPO


def _m(sensor: str, n: int, qos: int = 1, size: int = 10) -> Message:
    return Message(sensor, f"sensors/{sensor}/t", str(n).encode().ljust(size, b"."), qos)


def test_batches_keep_order_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1_000_000, 3600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seqs, dropped = spool.append([_m("a", 0), _m("b", 0), _m("a", 1)], now=100.0)
    assert dropped == [] and seqs == sorted(seqs)
    spool.append([_m("b", 1), _m("a", 2)], now=101.0)
    spool.close()
    spool = Spool(path, 1_000_000, 3600)
    out = spool.peek(100)
    assert [(s.message.sensor, s.message.payload[:1]) for s in out] == [
        ("a", b"0"), ("b", b"0"), ("a", b"1"), ("b", b"1"), ("a", b"2"),
    ]  # fmt: skip
    assert spool.stats().messages == 5 and spool.stats().bytes == 50 and spool.stats().oldest == 100.0
    spool.ack(s.seq for s in out[:2])
    assert [s.seq for s in spool.peek(100)] == [s.seq for s in out[2:]]
    assert spool.peek(10, after=out[3].seq)[0].seq == out[4].seq
    assert spool.stats().bytes == 30


def test_a_committed_batch_survives_a_killed_writer(tmp_path: Path) -> None:
    """SIGKILL right after append() returned: everything appended is there afterwards."""
    code = (
        "import os, sys\n"
        "from gatewayd.stores.spool import Message, Spool\n"
        "s = Spool(__import__('pathlib').Path(sys.argv[1]), 10**8, 3600)\n"
        "for b in range(20):\n"
        "    s.append([Message('k', 't', str(b * 100 + i).encode(), 1) for i in range(100)], now=1.0)\n"
        "print('appended', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spool.db")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == -9 and "appended" in result.stdout, result.stderr
    spool = Spool(tmp_path / "spool.db", 10**8, 3600)
    assert [int(s.message.payload) for s in spool.peek(5000)] == list(range(2000))


def test_full_drops_oldest_qos0_first_and_never_qos1(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=100, max_age=3600)
    spool.append([_m("a", 0, qos=1), _m("b", 0, qos=0), _m("b", 1, qos=0), _m("a", 1, qos=1)], now=1.0)
    spool.append([_m("c", 0, qos=0) for _ in range(6)], now=2.0)  # exactly full: 100 bytes
    _, dropped = spool.append([_m("a", 2, qos=1)], now=3.0)  # the oldest QoS 0 (b's first) makes room
    assert [(d.message.sensor, d.message.payload[:1]) for d in dropped] == [("b", b"0")]
    assert spool.stats().bytes == 100
    # drop QoS 0 until none is left; then QoS 1 is refused and nothing changes
    for i in range(7):
        spool.append([_m("a", 3 + i, qos=1)], now=4.0)
    before = [s.seq for s in spool.peek(100)]
    with pytest.raises(SpoolFull, match="no QoS 0 message left to drop"):
        spool.append([_m("a", 99, qos=1)], now=5.0)
    assert [s.seq for s in spool.peek(100)] == before and spool.stats().bytes == 100
    assert all(s.message.qos == 1 for s in spool.peek(100))


def test_expiry_by_age(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 10_000, max_age=60)
    spool.append([_m("a", 0)], now=0.0)
    spool.append([_m("a", 1)], now=50.0)
    expired = spool.expire(now=100.0)
    assert [e.message.payload[:1] for e in expired] == [b"0"]
    assert spool.stats().messages == 1 and spool.stats().bytes == 10 and spool.stats().oldest == 50.0
    with pytest.raises(ValueError):
        Spool(tmp_path / "other.db", 0, 60)
    with pytest.raises(ValueError, match="when_full must be one of"):
        Spool(tmp_path / "other.db", 100, 60, "drop-newest")


def test_when_full_hold_keeps_everything_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=100, max_age=3600, when_full="hold")
    spool.append([_m("b", i, qos=0) for i in range(5)] + [_m("a", i, qos=1) for i in range(5)], now=1.0)
    assert spool.room() == 0
    before = [s.seq for s in spool.peek(100)]
    for qos in (0, 1):
        with pytest.raises(SpoolFull, match="when_full is hold"):
            spool.append([_m("c", 0, qos=qos)], now=2.0)
    assert [s.seq for s in spool.peek(100)] == before  # not even the old QoS 0 messages went


def test_when_full_drop_oldest_drops_any_qos_and_never_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=100, max_age=3600, when_full="drop-oldest")
    spool.append([_m("a", i, qos=1) for i in range(10)], now=1.0)
    assert spool.room() == 100
    _, dropped = spool.append([_m("b", 0, qos=1), _m("b", 1, qos=0)], now=2.0)
    assert [(d.message.sensor, d.message.qos, d.message.payload[:1]) for d in dropped] == [
        ("a", 1, b"0"),
        ("a", 1, b"1"),
    ]  # the two oldest, QoS 1 or not
    assert spool.stats().bytes == 100 and [s.message.sensor for s in spool.peek(100)][-2:] == ["b", "b"]
    with pytest.raises(SpoolFull, match="larger than the spool"):
        spool.append([_m("c", i) for i in range(11)], now=3.0)
