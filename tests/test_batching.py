"""Batching of readings (pure core; issue 7 groundwork, not wired yet): nothing lost or reordered, every batch
within its size bound and no reading older than the latency bound when batches are taken as due."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.batching import Batcher, basic_ingest


def test_format_and_bounds() -> None:
    b = Batcher(max_bytes=200, max_delay=0.5)
    assert b.add("gw/sensors/t", "temp-1", b'{"c": 21.5}', now=10.0) == []
    assert b.add("gw/sensors/t", "temp-2", b"\x00\x01raw", now=10.1) == []
    assert b.next_due() == 10.5
    assert b.due(10.4) == []
    (batch,) = b.due(10.5)
    body = json.loads(batch.encode())
    assert body == {
        "batch": [
            {"clientId": "temp-1", "timestamp": 10000, "payload": {"c": 21.5}},
            {
                "clientId": "temp-2",
                "timestamp": 10100,
                "payload": {"base64": base64.b64encode(b"\x00\x01raw").decode()},
            },
        ]
    }
    assert len(batch.encode()) == batch.size
    with pytest.raises(ValueError, match="does not fit"):
        b.add("t", "c", b"x" * 300, now=11.0)
    assert basic_ingest("storeReadings", "gw/sensors/t") == "$aws/rules/storeReadings/gw/sensors/t"
    with pytest.raises(ValueError):
        basic_ingest("a/b", "t")


@settings(max_examples=80, deadline=None)
@given(
    readings=st.lists(
        st.tuples(
            st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 5), st.integers(0, 60), st.floats(0, 0.05)
        ),
        max_size=300,
    )
)
def test_nothing_lost_reordered_oversized_or_late(readings: list[tuple[str, int, int, float]]) -> None:
    b = Batcher(max_bytes=1024, max_delay=0.2)
    now, sent, out = 0.0, [], []
    late = 0.0
    for n, (topic, sensor, size, gap) in enumerate(readings):
        now += gap
        for batch in b.due(now):  # taken as soon as due is asked, at most one gap after it became due
            late = max(late, now - batch.opened)
            out.append(batch)
        payload = json.dumps({"n": n, "pad": "x" * size}).encode()
        out += b.add(topic, f"s{sensor}", payload, now)
        sent.append((topic, n))
    out += b.due(now + 1)
    assert b.open == {} and late <= 0.2 + 0.05 + 1e-9
    got = []
    for batch in out:
        encoded = batch.encode()
        assert len(encoded) <= 1024 and len(encoded) == batch.size
        got += [(batch.topic, item["payload"]["n"]) for item in json.loads(encoded)["batch"]]
    assert sorted(got) == sorted(sent)  # nothing lost, nothing duplicated
    for topic in ("t1", "t2", "t3"):  # each topic's readings in arrival order
        assert [n for t, n in got if t == topic] == [n for t, n in sent if t == topic]


def test_many_readings_become_few_publishes() -> None:
    b = Batcher(max_bytes=128 * 1024, max_delay=1.0)
    batches = []
    for i in range(10_000):  # 10,000 readings in one second from 100 sensors
        batches += b.add("gw/telemetry", f"s{i % 100}", b'{"t": 21.5, "h": 40}', now=i / 10_000)
    batches += b.due(2.0)
    print(f"\n10000 readings -> {len(batches)} publishes")
    assert len(batches) <= 10 and sum(len(json.loads(x.encode())["batch"]) for x in batches) == 10_000


def test_a_deeply_nested_payload_is_carried_as_base64_not_a_crash() -> None:
    """Issue 17, item 12: a sensor's 30,000-deep JSON raised RecursionError in the batcher."""
    deep = b"[" * 30000 + b"]" * 30000
    b = Batcher(max_bytes=200_000, max_delay=0.5)
    b.add("gw/sensors/t", "s1", deep, now=1.0)
    (batch,) = b.due(2.0)
    (item,) = json.loads(batch.encode())["batch"]
    assert base64.b64decode(item["payload"]["base64"]) == deep
