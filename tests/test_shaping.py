"""Quota shaping (pure core; issue 7 groundwork): the uplink never exceeds AWS IoT's per-connection rates in
any one-second window, and one flooding sensor cannot starve the others."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.shaping import FairQueue, Quota, Shaper, SlidingWindow


def _max_in_any_window(sent: list[tuple[float, float]], window: float) -> float:
    worst = 0.0
    for i, (start, _) in enumerate(sent):
        total = sum(amount for at, amount in sent[i:] if at < start + window - 1e-5)  # half-open, float slack
        worst = max(worst, total)
    return worst


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 0.2), min_size=1, max_size=300),
    amounts=st.lists(st.integers(1, 10), min_size=300, max_size=300),
)
def test_sliding_window_never_exceeds_its_limit(limit: int, gaps: list[float], amounts: list[int]) -> None:
    """Senders that retry exactly when told: whatever they do, no window of 1 s holds more than the limit
    (except a single amount larger than the limit, alone in its window)."""
    w = SlidingWindow(limit)
    now, sent = 0.0, []
    for gap, amount in zip(gaps, amounts, strict=False):
        now += gap
        while (wait := w.delay(now, amount)) > 0:
            now += wait
        sent.append((now, float(amount)))
    assert _max_in_any_window([s for s in sent if s[1] <= limit], 1.0) <= limit
    for i, (at, amount) in enumerate(sent):
        if amount > limit:  # alone in its window
            assert all(abs(other - at) >= 1.0 - 1e-5 for j, (other, _) in enumerate(sent) if j != i)


def test_sliding_window_waits_exactly_as_long_as_needed() -> None:
    w = SlidingWindow(3)
    assert [w.delay(0.0), w.delay(0.1), w.delay(0.2)] == [0, 0, 0]
    assert w.delay(0.5) == pytest.approx(0.5)  # the send at 0.0 leaves the window at 1.0
    assert w.delay(1.0) == 0
    assert w.delay(1.05, 2) == pytest.approx(0.15)  # 0.1 and 0.2 must leave first
    with pytest.raises(ValueError):
        SlidingWindow(0)


def test_shaper_holds_publishes_and_bytes_per_second() -> None:
    quota = Quota(publishes_per_second=100, bytes_per_second=10_000, max_message_bytes=5_000)
    shaper = Shaper(quota)
    now, sent = 0.0, []
    for i in range(1000):
        size = 50 if i % 10 else 4_000  # mostly small readings, sometimes a large one
        while (wait := shaper.delay(now, size)) > 0:
            now += wait
        sent.append((now, size))
    assert _max_in_any_window([(t, 1.0) for t, _ in sent], 1.0) <= 100
    assert _max_in_any_window([(t, float(s)) for t, s in sent], 1.0) <= 10_000
    least = sum(s for _, s in sent) / 10_000  # the byte limit binds: the shortest possible time
    print(f"\n1000 publishes in {now:.2f} s of simulated time (at least {least:.2f} s at 10 kB/s)")
    assert now <= least * 1.15 + 1  # in FIFO order a large message waits for room: within 15% of ideal
    with pytest.raises(ValueError, match="over AWS IoT's 5000-byte message limit"):
        shaper.delay(now, 5_001)


def test_aws_defaults() -> None:
    q = Quota()
    assert (q.publishes_per_second, q.bytes_per_second, q.max_message_bytes) == (100, 524288, 131072)
    assert (q.max_inflight, q.max_subscriptions, q.filters_per_subscribe) == (100, 50, 8)


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers()), max_size=200))
def test_fair_queue_keeps_each_sensors_order(pushes: list[tuple[str, int]]) -> None:
    q: FairQueue[int] = FairQueue()
    for sensor, item in pushes:
        q.push(sensor, item)
    assert len(q) == len(pushes)
    popped: dict[str, list[int]] = {}
    while (got := q.pop()) is not None:
        popped.setdefault(got[0], []).append(got[1])
    assert len(q) == 0
    for sensor in "abcde":
        assert popped.get(sensor, []) == [item for s, item in pushes if s == sensor]


def test_a_flooding_sensor_cannot_starve_the_others() -> None:
    q: FairQueue[int] = FairQueue()
    for i in range(10_000):
        q.push("flood", i)
    for sensor in ("quiet-1", "quiet-2"):
        q.push(sensor, 0)
    first = [q.pop() for _ in range(3)]
    assert {p[0] for p in first if p is not None} == {"flood", "quiet-1", "quiet-2"}
    assert q.waiting("flood") == 9_999 and q.waiting("quiet-1") == 0


def test_shaper_paces_publishes_evenly() -> None:
    """A second's quota never leaves as one burst: publishes are 1/rate apart, so network jitter cannot
    squeeze two bursts into one second at the broker."""
    shaper = Shaper(Quota(publishes_per_second=20))
    now, sent = 0.0, []
    for _ in range(100):
        while (wait := shaper.delay(now, 100)) > 0:
            now += wait
        sent.append(now)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 0.05 - 1e-9 and sent[-1] == pytest.approx(99 * 0.05)
    # even if every arrival were 40 ms late or early, no one-second window would hold more than 21
    assert _max_in_any_window([(t, 1.0) for t in sent], 1.0 - 0.04) <= 20
