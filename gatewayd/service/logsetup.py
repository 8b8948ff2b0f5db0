"""Where log records go: journald (structured) under systemd, plain lines on stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping

from gatewayd.adapters.systemd import JournalHandler, StderrFormatter, under_systemd

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str = "info", environ: Mapping[str, str] = os.environ) -> str:
    """Install one handler on the `gatewayd` logger; returns "journald" or "stderr"."""
    root = logging.getLogger("gatewayd")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    new: logging.Handler
    if under_systemd(environ):
        new, target = JournalHandler(), "journald"
    else:
        new, target = logging.StreamHandler(sys.stderr), "stderr"
        new.setFormatter(StderrFormatter())
    root.addHandler(new)
    root.propagate = False
    # asyncio's own records (an accept() failing for lack of file descriptors, a handshake error) go to the
    # same place, each kind at most once per RateLimit.EVERY seconds: a flood must not become a log storm
    aio = logging.getLogger("asyncio")
    for handler in list(aio.handlers):
        aio.removeHandler(handler)
    for old in [f for f in aio.filters if isinstance(f, RateLimit)]:
        aio.removeFilter(old)
    aio.addHandler(new)
    aio.addFilter(RateLimit())
    aio.propagate = False
    apply_level(level)
    return target


class RateLimit(logging.Filter):
    """Lets one record of each kind (logger and message template) through per EVERY seconds; the next one
    through says how many were held back."""

    EVERY = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        if now - self._last.get(key, -self.EVERY) < self.EVERY:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this held back in the last {self.EVERY:g} s)"
        if len(self._last) > 1000:  # kinds are few; never grow without bound
            self._last.clear()
        return True


def apply_level(level: str) -> None:
    logging.getLogger("gatewayd").setLevel(_LEVELS[level])
