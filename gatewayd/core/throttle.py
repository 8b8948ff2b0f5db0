"""Counting events that are logged at most once per interval (a scan, a flood, a full store), so the
journal gets one line with the count instead of one per event. Pure: the time comes in as an argument."""

from __future__ import annotations


class LogThrottle:
    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.total = 0  # events counted since the start
        self._since_logged = 0
        self._logged_at = -every

    def event(self, now: float) -> int | None:
        """Count one event at `now` (monotonic seconds). Returns how many events the line to log now stands
        for (this one and those held back since the last line), or None: not yet, it is held back."""
        self.total += 1
        self._since_logged += 1
        if now - self._logged_at < self.every:
            return None
        self._logged_at = now
        count, self._since_logged = self._since_logged, 0
        return count
