"""The wall clock as the daemon sees it: synchronized or not, and when it jumps.

A Raspberry Pi boots with the time of its last shutdown and NTP sets it later with one jump (a clock running
ahead may be set back). Everything that measures a duration uses monotonic clocks (readings' ages: the spill
store's age clock); what compares the wall clock with a certificate's dates asks this watch first:

- `synchronized`: from `[time] synchronized` (adapters/timesync.py), polled every POLL_EVERY seconds;
- a jump: the wall clock moved against the monotonic one by more than JUMP_SECONDS between two polls;
- the journal says each change once (CLOCK_UNSYNCHRONIZED, CLOCK_SYNCHRONIZED, CLOCK_JUMPED) and the
  listeners (uplink, renewal, listener certificate) are told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd.adapters import timesync
from gatewayd.core import logevents
from gatewayd.core.timefmt import iso_utc

log = logging.getLogger("gatewayd.clock")

POLL_EVERY = 2.0  # seconds
JUMP_SECONDS = 1.0  # NTP slews smaller corrections; a step is at least this


@dataclass(frozen=True)
class ClockChange:
    synchronized: bool
    became_synchronized: bool  # it was not at the previous poll
    jump: float  # seconds the wall clock moved at this poll (0.0: none)


def _span(seconds: float) -> str:
    s = abs(seconds)
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} hours"
    if s >= 60:
        return f"{s / 60:.1f} minutes"
    return f"{s:.1f} s"


class ClockWatch:
    def __init__(
        self,
        source: str,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        check: Callable[[str], bool] = timesync.synchronized,
    ) -> None:
        self.source = source
        self._wall, self._monotonic, self._check = wall, monotonic, check
        self.synchronized = check(source)
        self._offset = wall() - monotonic()
        self.jumps = 0
        self.last_jump: dict[str, Any] | None = None
        self.listeners: list[Callable[[ClockChange], None]] = []
        self._changed_at = wall()

    def announce(self) -> None:
        """The state at start, once in the journal."""
        if self.synchronized:
            log.info("wall clock synchronized (%s)", timesync.describe(self.source))
        else:
            self._log_unsynchronized()

    def _log_unsynchronized(self) -> None:
        now = self._wall()
        log.warning(
            "wall clock not synchronized (%s): it says %s; no renewal starts by the clock until it is",
            timesync.describe(self.source), iso_utc(now),
            extra=logevents.extra(
                logevents.CLOCK_UNSYNCHRONIZED, source=self.source, wall_clock=iso_utc(now)
            ),
        )  # fmt: skip

    def set_source(self, source: str) -> None:
        """`[time] synchronized` changed (reload): the next poll asks the new source."""
        self.source = source

    def poll(self, synced: bool | None = None) -> ClockChange | None:
        """Look once (`synced`: the source's answer, asked by the caller; None: ask it now); returns (and
        tells the listeners) what changed, or None."""
        now, mono = self._wall(), self._monotonic()
        offset = now - mono
        jump = offset - self._offset
        self._offset = offset
        if abs(jump) < JUMP_SECONDS:
            jump = 0.0
        else:
            self.jumps += 1
            self.last_jump = {"at": iso_utc(now), "seconds": round(jump, 3)}
            log.info(
                "wall clock jumped %s by %s: from %s to %s",
                "forward" if jump > 0 else "back", _span(jump), iso_utc(now - jump), iso_utc(now),
                extra=logevents.extra(
                    logevents.CLOCK_JUMPED, jump_seconds=round(jump, 3), wall_clock=iso_utc(now)
                ),
            )  # fmt: skip
        if synced is None:
            synced = self._check(self.source)
        changed = synced != self.synchronized
        if changed:
            self.synchronized = synced
            self._changed_at = now
            if synced:
                log.info(
                    "wall clock synchronized (%s): it says %s", timesync.describe(self.source), iso_utc(now),
                    extra=logevents.extra(
                        logevents.CLOCK_SYNCHRONIZED, source=self.source, wall_clock=iso_utc(now)
                    ),
                )  # fmt: skip
            else:
                self._log_unsynchronized()
        if not jump and not changed:
            return None
        change = ClockChange(synced, changed and synced, jump)
        for listener in list(self.listeners):
            try:
                listener(change)
            except Exception:
                log.exception("a clock listener failed")
        return change

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY)
            # the source may be a D-Bus question (adapters/timesync.py): never on the event loop
            self.poll(await asyncio.to_thread(self._check, self.source))

    def summary(self) -> dict[str, Any]:
        return {
            "synchronized": self.synchronized,
            "source": self.source,
            "wallClock": iso_utc(self._wall()),
            "since": iso_utc(self._changed_at),
            "jumps": self.jumps,
            "lastJump": self.last_jump,
        }
