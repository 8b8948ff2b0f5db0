"""Is the wall clock synchronized? A Raspberry Pi has no battery-backed clock: until NTP sets it, the time is
where fake-hwclock or systemd-timesyncd left it at the last shutdown (days or weeks behind).

Sources, as `[time] synchronized` selects:

- "auto": systemd-timesyncd's flag file /run/systemd/timesync/synchronized (created once it has synchronized),
  else the kernel's NTP state: adjtimex(2) reports a maximum error under 16 s once an NTP client (timesyncd,
  chrony, ntpd) disciplines the clock, the rule timedated's `NTPSynchronized` uses. The packaged unit's
  sandbox (ProtectClock=yes, systemd issue #26413) refuses even a read-only adjtimex; there, timedated's
  `NTPSynchronized` is asked over D-Bus (`busctl`, at most every TIMEDATED_EVERY seconds).
- "always": the clock is trusted (a gateway with a real-time clock, or a host whose time is the reference).
- an absolute path: synchronized while that file exists (a hook of another time source creates it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path

TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
MAX_ERROR_US = 16_000_000  # the kernel's maximum error while nothing disciplines the clock (NTP's 16 s)
TIMEDATED_EVERY = 30.0  # seconds between two questions to timedated (a process each)
BUSCTL = (
    "busctl", "get-property", "org.freedesktop.timedate1", "/org/freedesktop/timedate1",
    "org.freedesktop.timedate1", "NTPSynchronized",
)  # fmt: skip


class _Timex(ctypes.Structure):
    # struct timex's leading fields on 64-bit Linux (x86_64, arm64); the rest is room for the kernel to fill
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_byte * 256),
    )


def _kernel_synchronized() -> bool | None:
    """The kernel's NTP state (adjtimex with no modes only reads); None where it cannot be read (a sandbox, a
    32-bit ABI whose struct timex layout depends on its time_t: not guessed)."""
    if ctypes.sizeof(ctypes.c_long) != 8:
        return None
    try:
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    tx = _Timex()
    if adjtimex(ctypes.byref(tx)) < 0:
        return None if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES) else False
    return bool(tx.maxerror < MAX_ERROR_US)


class _Timedated:
    """timedated's NTPSynchronized over D-Bus, asked at most every TIMEDATED_EVERY seconds."""

    def __init__(self) -> None:
        self.asked_at = -TIMEDATED_EVERY
        self.answer: bool | None = None

    def synchronized(self) -> bool | None:
        now = time.monotonic()
        if now - self.asked_at >= TIMEDATED_EVERY:
            self.asked_at = now
            try:
                out = subprocess.run(BUSCTL, capture_output=True, text=True, timeout=5, check=False)
                self.answer = out.stdout.split() == ["b", "true"] if out.returncode == 0 else None
            except (OSError, subprocess.SubprocessError):
                self.answer = None
        return self.answer


_TIMEDATED = _Timedated()


def synchronized(source: str) -> bool:
    """Whether the wall clock is known to be right, per `source` ("auto", "always" or a flag file's path)."""
    if source == "always":
        return True
    if source != "auto":
        return os.path.exists(source)
    if TIMESYNCD_FLAG.exists():
        return True
    kernel = _kernel_synchronized()
    if kernel is not None:
        return kernel
    return bool(_TIMEDATED.synchronized())


def describe(source: str) -> str:
    """Where the answer comes from, for the status and the journal."""
    if source == "always":
        return "configured as always synchronized ([time] synchronized)"
    if source != "auto":
        return f"the flag file {source}"
    return "systemd-timesyncd or the kernel's NTP state"
