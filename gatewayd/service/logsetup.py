"""Where log records go: journald (structured) under systemd, plain lines on stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

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
    apply_level(level)
    return target


def apply_level(level: str) -> None:
    logging.getLogger("gatewayd").setLevel(_LEVELS[level])
