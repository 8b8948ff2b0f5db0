"""systemd integration: sd_notify over NOTIFY_SOCKET, and a logging handler that writes to journald.

sd_notify is a single datagram on a unix socket (sd_notify(3)); it is done here with the standard library so
that it also works where python-systemd is absent. journald records go through python-systemd's
`journal.send`, which carries arbitrary structured fields.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Mapping

SYSLOG_IDENTIFIER = "gatewayd"


def under_systemd(environ: Mapping[str, str] = os.environ) -> bool:
    """True when started by systemd: stdout/stderr go to the journal, or the unit set INVOCATION_ID."""
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


class Notifier:
    """Sends sd_notify messages; does nothing when NOTIFY_SOCKET is not set (not run by systemd)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace (sd_notify(3)).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> None:
        if self._sock is None:
            return
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            # Never block: a unix datagram send waits when the receiver's queue is full, and the daemon's
            # event loop must not stall on systemd. A dropped message is superseded by the next one.
            self._sock.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:  # systemd gone or queue full: never fatal for the daemon
            logging.getLogger("gatewayd.systemd").debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=_one_line(status))

    def status(self, status: str) -> None:
        self.send(STATUS=_one_line(status))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload to this message.
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=_one_line(status))

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = environ.get("WATCHDOG_PID", "")
    if wpid and wpid != str(pid if pid is not None else os.getpid()):
        return None  # meant for another process (sd_watchdog_enabled(3))
    return int(usec) / 1_000_000 / 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


# Characters that would let a logged value (a sensor's client id, a topic) start a line of its own or hide
# text: C0 controls, DEL, NEL and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(text: str) -> str:
    """`text` with every control character escaped (a newline as backslash-n): a value that came from the
    network cannot forge a log line. Journal fields (GATEWAYD_*) keep the exact values."""
    return _CONTROLS.sub(_escape, text)


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalHandler(logging.Handler):
    """Structured records to journald: MESSAGE, PRIORITY, MESSAGE_ID, GATEWAYD_COMPONENT, GATEWAYD_*.

    A record's `message_id` attribute becomes MESSAGE_ID and its `fields` mapping becomes upper-cased
    GATEWAYD_<NAME> fields (see gatewayd.core.logevents.extra).
    """

    def __init__(self) -> None:
        super().__init__()
        import systemd.journal as journal  # imported here so that stderr logging works without python-systemd

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = printable(record.getMessage())
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            fields: dict[str, str | int] = {
                "PRIORITY": str(getattr(record, "journal_priority", _PRIORITY.get(record.levelno, 6))),
                "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
                "GATEWAYD_COMPONENT": component_of(record),
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,  # python-systemd formats it with {:d}
                "CODE_FUNC": record.funcName,
            }
            message_id = getattr(record, "message_id", None)
            if message_id:
                fields["MESSAGE_ID"] = message_id
            for name, value in getattr(record, "fields", {}).items():
                fields["GATEWAYD_" + name.upper()] = str(value)
            self._send(message, **fields)
        except OSError:
            # journald unreachable: keep the line rather than lose it.
            sys.stderr.write(StderrFormatter().format(record) + "\n")
        except Exception:
            self.handleError(record)


def component_of(record: logging.LogRecord) -> str:
    """`gatewayd.control` -> `control`; the root of the tree is `daemon`."""
    name = record.name
    return name.split(".", 1)[1] if name.startswith("gatewayd.") else "daemon"


class StderrFormatter(logging.Formatter):
    """Plain one-line records for a terminal: `HH:MM:SS.mmm LEVEL component: message [key=value ...]`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S") + f".{int(record.msecs):03d}"
        text = f"{stamp} {record.levelname:<7} {component_of(record)}: {printable(record.getMessage())}"
        extras = dict(getattr(record, "fields", {}))
        message_id = getattr(record, "message_id", None)
        if message_id:
            extras = {"message_id": message_id, **extras}
        if extras:
            text += " [" + " ".join(f"{k}={printable(str(v))}" for k, v in extras.items()) + "]"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text
