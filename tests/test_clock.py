"""The clock watch (service/clock.py), the time-sync sources (adapters/timesync.py) and the local CA's dates
under a clock that may be wrong (issue 16). The live daemon: test_clock_daemon.py."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.adapters import timesync
from gatewayd.core import logevents
from gatewayd.service.clock import ClockChange, ClockWatch
from gatewayd.stores.localca import SLACK_SYNCHRONIZED, SLACK_UNSYNCHRONIZED, LocalCA
from gatewayd.stores.x509util import load_pem_certificates, not_after, not_before

DAY = 86400.0


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono, self.synced = 1.8e9, 100.0, False

    def watch(self) -> ClockWatch:
        return ClockWatch("auto", lambda: self.wall, lambda: self.mono, lambda _source: self.synced)

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def _ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "message_name", "") for r in caplog.records if getattr(r, "message_name", "")]


def test_jumps_are_reported_once_and_slews_not_at_all(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks()
    watch = clocks.watch()
    seen: list[ClockChange] = []
    watch.listeners.append(seen.append)
    caplog.set_level(logging.INFO)
    for _ in range(10):
        clocks.tick(2.0)
        clocks.wall += 0.001  # NTP slewing: a millisecond per poll
        assert watch.poll() is None
    clocks.tick(2.0)
    clocks.wall += 20 * DAY  # NTP sets a stale clock
    change = watch.poll()
    assert change is not None and change.jump == pytest.approx(20 * DAY) and not change.synchronized
    clocks.tick(2.0)
    assert watch.poll() is None  # once
    clocks.wall -= 3 * 3600  # set back
    back = watch.poll()
    assert back is not None and back.jump == pytest.approx(-3 * 3600)
    assert [c.jump for c in seen] == [change.jump, back.jump]
    assert _ids(caplog) == ["CLOCK_JUMPED", "CLOCK_JUMPED"]
    assert "forward by 20.0 days" in caplog.records[0].getMessage()
    assert "back by 3.0 hours" in caplog.records[1].getMessage()
    assert watch.summary()["jumps"] == 2 and watch.summary()["lastJump"]["seconds"] == -10800.0


def test_synchronization_is_announced_and_its_changes_told(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks()
    watch = clocks.watch()
    seen: list[ClockChange] = []
    watch.listeners.append(seen.append)
    caplog.set_level(logging.INFO)
    watch.announce()
    assert _ids(caplog) == ["CLOCK_UNSYNCHRONIZED"]
    clocks.tick(2.0)
    assert watch.poll() is None
    clocks.synced = True
    clocks.tick(2.0)
    became = watch.poll()
    assert became == ClockChange(True, True, 0.0) and watch.synchronized
    clocks.tick(2.0)
    assert watch.poll() is None
    clocks.synced = False  # lost (the flag file removed, another source's view)
    clocks.tick(2.0)
    assert watch.poll() == ClockChange(False, False, 0.0)
    assert _ids(caplog) == ["CLOCK_UNSYNCHRONIZED", "CLOCK_SYNCHRONIZED", "CLOCK_UNSYNCHRONIZED"]
    assert len(seen) == 2
    assert logevents.CLOCK_SYNCHRONIZED in logevents.ALL


def test_a_failing_listener_does_not_stop_the_others() -> None:
    clocks = Clocks()
    watch = clocks.watch()
    told: list[bool] = []

    def broken(_change: ClockChange) -> None:
        raise RuntimeError("bug")

    watch.listeners += [broken, lambda c: told.append(c.synchronized)]
    clocks.synced = True
    clocks.tick(2.0)
    watch.poll()
    assert told == [True]


def test_sources(tmp_path: Path) -> None:
    flag = tmp_path / "synced"
    assert timesync.synchronized("always") is True
    assert timesync.synchronized(str(flag)) is False
    flag.touch()
    assert timesync.synchronized(str(flag)) is True
    assert "flag file" in timesync.describe(str(flag))
    assert isinstance(timesync.synchronized("auto"), bool)


def _dates(ca: LocalCA) -> tuple[dt.datetime, dt.datetime]:
    cert = load_pem_certificates((ca.dir / "server.pem").read_bytes(), "server")[0]
    return not_before(cert), not_after(cert)


def test_listener_certificate_tolerates_an_unsynchronized_clock(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path, "gw")
    ca.ensure()
    now = dt.datetime.now(dt.UTC)
    ca.server_identity(["gw"], ["127.0.0.1"], clock_trusted=False)
    start, end = _dates(ca)
    assert abs(start - (now - SLACK_UNSYNCHRONIZED)) < dt.timedelta(minutes=1)
    assert end - start == dt.timedelta(days=397)  # never longer than the CA/Browser Forum's limit
    first = (ca.dir / "server.pem").read_bytes()
    ca.server_identity(["gw"], ["127.0.0.1"])  # still fresh and valid: reused
    assert (ca.dir / "server.pem").read_bytes() == first
    ca.server_identity(["gw"], ["127.0.0.1"], clock_trusted=True, reissue=True)
    start, _ = _dates(ca)
    assert abs(start - (now - SLACK_SYNCHRONIZED)) < dt.timedelta(minutes=1)
    ca_cert, _ = ca.ca()
    assert not_before(ca_cert) < now - dt.timedelta(days=365)  # the CA, never made again, tolerates a year


def test_a_listener_certificate_from_the_future_is_not_reused(tmp_path: Path) -> None:
    """Made while the clock ran 200 days ahead, then the clock set back: not valid yet, so made again."""
    ca = LocalCA(tmp_path, "gw")
    ca.ensure()
    ca.server_identity(["gw"], ["127.0.0.1"])
    ca_cert, ca_key = ca.ca()
    current = load_pem_certificates((ca.dir / "server.pem").read_bytes(), "server")[0]
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=200)
    future = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca_cert.subject)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ahead)
        .not_valid_after(ahead + dt.timedelta(days=300))
        .add_extension(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
        .sign(ca_key, hashes.SHA256())
    )
    (ca.dir / "server.pem").write_bytes(future.public_bytes(serialization.Encoding.PEM))
    ca.server_identity(["gw"], ["127.0.0.1"])
    start, _ = _dates(ca)
    assert start <= dt.datetime.now(dt.UTC)
