"""core/throttle.py: one log line per interval, standing for every event since the last one."""

from __future__ import annotations

from gatewayd.core.throttle import LogThrottle


def test_one_line_per_interval_carrying_the_count_held_back() -> None:
    t = LogThrottle(every=10.0)
    assert t.event(100.0) == 1  # the first is logged at once
    assert [t.event(now) for now in (101.0, 105.0, 109.9)] == [None, None, None]
    assert t.event(110.0) == 4  # this one and the three held back
    assert t.event(110.5) is None
    assert t.event(125.0) == 2
    assert t.total == 7


def test_the_first_event_is_logged_whatever_the_clock_says_at_start() -> None:
    assert LogThrottle(every=10.0).event(0.0) == 1  # monotonic time may start near 0
