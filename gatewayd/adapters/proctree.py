"""Processes started on the daemon's behalf, found again by a mark in their environment: a command's
children inherit it even when they leave its process group and session (setsid), which killpg cannot reach.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from pathlib import Path

MARK = "GATEWAYD_RUN"


def new_mark() -> str:
    return secrets.token_hex(8)


def marked(mark: str, proc: Path = Path("/proc")) -> list[int]:
    """The processes (of this user: others' environments cannot be read) carrying `MARK=mark`."""
    needle = f"{MARK}={mark}".encode() + b"\0"
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
    return found


def kill_marked(mark: str) -> int:
    """SIGKILL every process carrying the mark; how many there were."""
    victims = marked(mark)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)
