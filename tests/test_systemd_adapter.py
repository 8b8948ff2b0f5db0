"""sd_notify, the watchdog interval rules, and the two log formats."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from gatewayd.adapters.systemd import (
    JournalHandler,
    Notifier,
    StderrFormatter,
    under_systemd,
    watchdog_interval,
)
from gatewayd.core import logevents


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_watchdog_meant_for_another_pid_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert watchdog_interval(env, pid=4242) is None
    assert watchdog_interval({**env, "WATCHDOG_PID": "4242"}, pid=4242) == 0.5
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 0.5


def test_under_systemd_detection() -> None:
    assert under_systemd({"JOURNAL_STREAM": "8:1234"})
    assert under_systemd({"INVOCATION_ID": "abc"})
    assert not under_systemd({})


def test_notifier_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        notifier.ready("Running;  two\nlines")
        assert sock.recv(4096) == b"READY=1\nSTATUS=Running; two lines"
        notifier.close()


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"gatewayd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.stopping("Stopping")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=Stopping"


def test_notifier_without_socket_does_nothing_and_survives_a_vanished_socket(tmp_path: Path) -> None:
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.watchdog()  # no error
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    gone.watchdog()  # systemd went away: logged at debug, never raised


def test_stderr_format_carries_message_id_and_fields() -> None:
    record = logging.LogRecord("gatewayd.control", logging.WARNING, __file__, 1, "hello %s", ("x",), None)
    for key, value in logevents.extra(logevents.CONFIG_RESTART_REQUIRED, config_key="a.b").items():
        setattr(record, key, value)
    line = StderrFormatter().format(record)
    assert line.endswith(
        f"WARNING control: hello x [message_id={logevents.CONFIG_RESTART_REQUIRED.id} config_key=a.b]"
    )


def test_notifier_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    """A unix datagram send blocks once the receiver's queue is full; the daemon's loop must not."""
    import time

    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))  # never read from
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        t0 = time.monotonic()
        for i in range(5000):
            notifier.status(f"state {i}")
        assert time.monotonic() - t0 < 2.0
        notifier.close()


def test_a_client_id_cannot_forge_a_log_line() -> None:
    """Issue 17, item 14: a newline in a client id made a second, forged line. Control characters are escaped
    in the text (stderr and journald's MESSAGE); the journal fields keep the exact value."""
    forged = "s1\n12:00:00.000 INFO    broker: sensor valve-1 connected\x1b[2K\u2028"
    record = logging.LogRecord(
        "gatewayd.broker", logging.INFO, __file__, 1, "sensor %s connected", (forged,), None
    )
    record.__dict__.update(logevents.extra(logevents.SENSOR_CONNECTED, client_id=forged))
    line = StderrFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    assert (
        "sensor s1\\n12:00:00.000 INFO    broker: sensor valve-1 connected\\x1b[2K\\u2028 connected" in line
    )
    sent: list[tuple[str, dict[str, object]]] = []
    handler = JournalHandler.__new__(JournalHandler)
    logging.Handler.__init__(handler)
    handler._send = lambda message, **fields: sent.append((message, fields))
    handler.emit(record)
    ((message, fields),) = sent
    assert "\n" not in message and "\\n" in message
    assert fields["GATEWAYD_CLIENT_ID"] == forged  # exact in the structured field
