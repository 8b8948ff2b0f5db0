"""Quota shaping for the uplink (pure; issue 7 groundwork): AWS IoT Core's per-connection limits, sliding
windows that never let the uplink exceed them, and a fair queue so one chatty sensor cannot starve others.

Times are seconds (monotonic) passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
EPSILON = 1e-6  # seconds: time comparisons are made with this much slack against float rounding


@dataclass(frozen=True)
class Quota:
    """AWS IoT Core's per-connection quotas (AWS IoT Core endpoints and quotas, "Message broker and protocol
    limits and quotas"), the defaults of `[uplink]` shaping."""

    publishes_per_second: float = 100.0
    bytes_per_second: float = 512 * 1024
    max_message_bytes: int = 128 * 1024
    max_inflight: int = 100  # unacknowledged QoS 1 publishes
    max_subscriptions: int = 50
    filters_per_subscribe: int = 8


class SlidingWindow:
    """At most `limit` units (publishes, bytes) in any window of `window` seconds, exactly: what was sent in
    the last window is remembered. delay() says how long to wait before `amount` more may go (0: recorded as
    sent now). An amount larger than the limit (one message bigger than a second's bytes) may go only when the
    window is empty."""

    def __init__(self, limit: float, window: float = 1.0) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit = limit
        self.window = window
        self._sent: deque[tuple[float, float]] = deque()  # (time, amount), oldest first
        self._total = 0.0

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0][0] <= now - self.window + EPSILON:
            self._total -= self._sent.popleft()[1]

    def delay(self, now: float, amount: float = 1.0) -> float:
        self._expire(now)
        if self._total + amount <= self.limit or not self._sent:
            self._sent.append((now, amount))
            self._total += amount
            return 0.0
        need = self._total + amount - self.limit  # this much must leave the window first
        freed = 0.0
        for at, sent in self._sent:
            freed += sent
            if freed >= need:
                return max(at + self.window - now, EPSILON)  # never 0: 0 means "sent"
        return max(self._sent[-1][0] + self.window - now, EPSILON)  # unreachable: all leaving frees enough

    def undo(self) -> None:
        """Forget the last recorded send (it did not happen after all)."""
        _, amount = self._sent.pop()
        self._total -= amount


@dataclass
class Shaper:
    """Publishes per second and bytes per second together: a publish goes out only when both allow it.

    Publishes are also paced, at least 1/publishes_per_second apart: a full second's quota sent as one burst
    would reach the broker with network jitter and could land in a one-second window with part of the next
    burst; evenly spaced publishes keep any window at the quota, give or take one."""

    quota: Quota
    publishes: SlidingWindow = field(init=False)
    bytes: SlidingWindow = field(init=False)

    _next: float = field(init=False, default=float("-inf"))  # earliest time of the next publish

    def __post_init__(self) -> None:
        self.publishes = SlidingWindow(self.quota.publishes_per_second)
        self.bytes = SlidingWindow(self.quota.bytes_per_second)

    def delay(self, now: float, size: int) -> float:
        """0 when a publish of `size` bytes may go now (it is recorded as sent), else the seconds to wait."""
        if size > self.quota.max_message_bytes:
            raise ValueError(
                f"{size} bytes is over AWS IoT's {self.quota.max_message_bytes}-byte message limit"
            )
        if now < self._next - EPSILON:
            return self._next - now
        wait_p = self.publishes.delay(now)
        if wait_p:
            return wait_p
        wait_b = self.bytes.delay(now, size)
        if wait_b:
            self.publishes.undo()  # nothing was sent
            return wait_b
        self._next = now + 1.0 / self.quota.publishes_per_second
        return 0.0


class FairQueue(Generic[T]):
    """Per-sensor FIFO queues served round robin: each sensor with something waiting gets one message per
    round, whatever the others have queued; a sensor's own messages keep their order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def push(self, sensor: str, item: T) -> None:
        queue = self._queues.get(sensor)
        if queue is None:
            queue = self._queues[sensor] = deque()
        queue.append(item)
        self._length += 1

    def pop(self) -> tuple[str, T] | None:
        """The next message: the head of the sensor whose turn it is (which then goes to the back)."""
        if not self._queues:
            return None
        sensor, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._length -= 1
        if queue:
            self._queues.move_to_end(sensor)
        else:
            del self._queues[sensor]
        return sensor, item

    def waiting(self, sensor: str) -> int:
        queue = self._queues.get(sensor)
        return len(queue) if queue is not None else 0
