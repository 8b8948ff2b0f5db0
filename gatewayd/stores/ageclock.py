"""The clock that measures how long a reading has waited: it never jumps with the wall clock.

A Raspberry Pi has no battery-backed clock: at boot the wall clock is where fake-hwclock left it (days or
weeks behind) until NTP sets it with one jump, and a clock running ahead may be set back. An age measured with
the wall clock would then drop readings that waited seconds (`spool.max_age`) or keep ones that waited weeks.

The age clock is the kernel's CLOCK_BOOTTIME (seconds since boot, suspend included, never set) plus a base
kept in the store's directory (`clock`, JSON: the boot id and the base):

- within one boot (the daemon restarted) the base stays: ages go on exactly;
- after a reboot the base becomes the newest stamp in the store, so the clock starts where the last reading
  was stored and counts the time since this boot began. The time the gateway was off (and the time between its
  last reading and its shutdown) is not counted: an age is never made larger by a clock jump or a reboot, only
  possibly smaller.

The file is written once per boot (a few bytes), not per reading.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from gatewayd.stores.atomic import write_file

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
FILE = "clock"


def boot_id() -> str:
    """This boot's id (a new random one at every boot)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class AgeClock:
    def __init__(
        self,
        directory: Path,
        this_boot: Callable[[], str] = boot_id,
        since_boot: Callable[[], float] = boottime,
    ) -> None:
        self.path = directory / FILE
        self._since_boot = since_boot
        self._boot = this_boot()
        self.base = 0.0
        self.rebooted = False  # the store's stamps came from an earlier boot

    def open(self, newest_stamp: float | None) -> None:
        """Settle the base, given the newest stamp among the stored readings (None: none stored)."""
        saved_boot, saved_base = self._saved()
        newest = newest_stamp if newest_stamp is not None else 0.0
        if saved_boot is not None and saved_boot == self._boot and self._boot:
            # the same boot: the base stays (never below a stamp in the store, should the file be older)
            base = max(saved_base, newest - self._since_boot())
        else:
            base = newest
            self.rebooted = saved_boot is not None or newest_stamp is not None
        self.base = base
        if saved_boot != self._boot or saved_base != base:
            write_file(self.path, json.dumps({"bootId": self._boot, "base": base}).encode() + b"\n", 0o600)

    def _saved(self) -> tuple[str | None, float]:
        try:
            saved = json.loads(self.path.read_text())
            return str(saved["bootId"]), float(saved["base"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, 0.0

    def now(self) -> float:
        return self.base + self._since_boot()
