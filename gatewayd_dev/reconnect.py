"""Measuring how fast the uplink reacts to an event, from `gatewayctl status`'s uplink fields.

`uplink` is a function returning that dict (`connectAttempts`, `nextAttemptAt`, `state`); the tests pass
their own (control socket or gatewayctl).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd_dev.sensor import wait_until

Uplink = Callable[[], dict[str, Any]]


def seconds_ahead(iso: str | None) -> float:
    """Seconds from now to a `nextAttemptAt` time (0 when there is none)."""
    if not iso:
        return 0.0
    at = dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return at.timestamp() - time.time()


def wait_for_long_backoff(uplink: Uplink, seconds: float, timeout: float = 90) -> None:
    """Until the uplink waits on its backoff with more than `seconds` to go (full jitter draws short waits
    too; failed attempts keep coming until a long one is drawn)."""

    def long_wait() -> bool:
        up = uplink()
        return bool(up["state"] == "waiting" and seconds_ahead(up["nextAttemptAt"]) > seconds)

    wait_until(long_wait, timeout, f"a backoff wait of more than {seconds} s")


@dataclass(frozen=True)
class Reaction:
    attempt: float  # seconds from the event to the next CONNECT attempt
    connected: float  # seconds from the event to connected
    backoff_left: float  # seconds the backoff still had to go when the event came

    def describe(self, event: str) -> str:
        attempt, connected = self.attempt * 1000, self.connected * 1000
        return (
            f"{event} -> CONNECT attempt: {attempt:.0f} ms, connected: {connected:.0f} ms"
            f" (the backoff had {self.backoff_left:.1f} s to go)"
        )


def reaction(uplink: Uplink, event: Callable[[], object]) -> Reaction:
    """Cause `event()` while the uplink waits on its backoff; time its next attempt and its connection."""
    up = uplink()
    left, before = seconds_ahead(up["nextAttemptAt"]), up["connectAttempts"]
    start = time.monotonic()
    event()
    wait_until(lambda: uplink()["connectAttempts"] > before, 5, "a CONNECT attempt")
    attempt = time.monotonic() - start
    wait_until(lambda: uplink()["state"] == "connected", 10, "the uplink")
    return Reaction(attempt, time.monotonic() - start, left)
