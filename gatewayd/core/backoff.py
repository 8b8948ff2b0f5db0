"""Reconnect timing: capped exponential backoff with full jitter, and at most one CONNECT per second.

Full jitter (delay uniform in [0, min(cap, base * 2**attempt)]) spreads a fleet's reconnects after an outage
(AWS Architecture Blog, "Exponential Backoff And Jitter"). AWS IoT Core throttles CONNECT per client id
(AWS IoT Core quotas: 1 per second), so no two attempts are closer than MIN_INTERVAL, whatever the jitter.
Time and randomness come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_INTERVAL = 1.0  # seconds between two CONNECT attempts of the same client id


@dataclass
class Backoff:
    cap: float = 120.0
    base: float = 1.0
    attempt: int = 0  # failures since the last success
    last_attempt: float | None = None  # monotonic time of the last CONNECT attempt

    def delay(self, now: float, rand: float) -> float:
        """Seconds to wait before the next attempt; `rand` is uniform in [0, 1)."""
        jittered = rand * min(self.cap, self.base * 2.0**self.attempt) if self.attempt else 0.0
        earliest = 0.0 if self.last_attempt is None else self.last_attempt + MIN_INTERVAL - now
        return max(jittered, earliest, 0.0)

    def attempted(self, now: float) -> None:
        self.last_attempt = now

    def failed(self) -> None:
        self.attempt = min(self.attempt + 1, 32)

    def succeeded(self) -> None:
        self.attempt = 0

    def reset_now(self) -> None:
        """Next attempt as soon as the one-per-second rule allows (e.g. the network just came back)."""
        self.attempt = 0
