"""The forwarder in process (issue 15): acknowledge through, spill only what has to wait, per-sensor order
across the store and memory, the bounds, a restart. The store is the real one on a temp dir; the uplink is a
stand-in whose acknowledgements the test decides (the remote cloud's decisions are the one thing faked)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd.core.config import Config, validate
from gatewayd.service.forwarder import Forwarder
from gatewayd.stores.spill import SpillStore

Done = Callable[[BaseException | None], None]


def sync(test: Callable[..., Any]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the suite runs without an asyncio pytest plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


@dataclass
class _Status:
    throttled: bool = False


@dataclass
class Cloud:
    """In the uplink's place: takes messages; AWS IoT's acknowledgements come when the test says."""

    connected: bool = True
    sent: list[tuple[str, bytes, Done]] = field(default_factory=list)
    status: _Status = field(default_factory=_Status)
    backlog: int = 0

    def send(self, topic: str, payload: bytes, qos: int, callback: Done) -> None:
        self.sent.append((topic, payload, callback))

    def ack(self, count: int | None = None) -> list[tuple[str, bytes]]:
        """AWS IoT acknowledges the oldest `count` (all) messages sent."""
        n = len(self.sent) if count is None else count
        done, self.sent = self.sent[:n], self.sent[n:]
        for _, _, callback in done:
            callback(None)
        return [(t, p) for t, p, _ in done]

    def drop_connection(self) -> None:
        """What the uplink does when the connection is lost: keeps what was sent, to send again later."""
        self.connected = False

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def unsubscribe(self, topic_filter: str) -> None:
        pass

    def publish_rate(self) -> float:
        return 0.0


def _config(tmp_path: Path, **spool: Any) -> Config:
    doc = {
        "gateway": {"thing_name": "gw-fwd", "state_dir": str(tmp_path / "state")},
        "upstream": {"endpoint": "standin-ats.iot.local.gatewayd.test"},
        "spool": {"spill_after": "0.3s", **spool},
    }
    return validate(doc, {}, str(tmp_path / "gatewayd.toml"))


class Acks:
    def __init__(self) -> None:
        self.got: dict[int, int] = {}

    def callback(self, n: int) -> Callable[[int], None]:
        def done(reason: int) -> None:
            assert n not in self.got, f"message {n} acknowledged twice"
            self.got[n] = reason

        return done


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _segments(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool").glob("*.seg"))


def _forwarder(tmp_path: Path, cloud: Cloud, **spool: Any) -> Forwarder:
    config = _config(tmp_path, **spool)
    store = SpillStore(tmp_path / "spool", config.spool.max_bytes, config.spool.when_full)
    return Forwarder(config, store, cloud)  # type: ignore[arg-type]


def _payloads(cloud: Cloud) -> list[bytes]:
    return [p for _, p, _ in cloud.sent]


@sync
async def test_acknowledged_through_when_aws_iot_answers_in_time(tmp_path: Path) -> None:
    cloud, acks = Cloud(), Acks()
    async with _forwarder(tmp_path, cloud) as fwd:
        for n in range(50):
            assert fwd.forward("s1", "gw/sensors/s1/t", b"%d" % n, 1, False, acks.callback(n)) is None
        assert fwd.forward("s1", "gw/sensors/s1/t", b"q0", 0, False, None) == 0  # QoS 0: success at once
        await _until(lambda: len(cloud.sent) == 51)
        assert acks.got == {}  # no PUBACK before AWS IoT has it
        cloud.ack(20)
        assert acks.got == dict.fromkeys(range(20), 0)
        cloud.ack()
        assert len(acks.got) == 50
        await asyncio.sleep(0.5)  # past spill_after: nothing is waiting, nothing is written
        assert _segments(tmp_path) == [] and fwd.summary()["spilled"] == 0
        assert fwd.summary()["delivered"] == 51


@sync
async def test_a_message_aws_iot_has_not_acknowledged_in_spill_after_is_spilled_then_acknowledged(
    tmp_path: Path,
) -> None:
    cloud, acks = Cloud(), Acks()
    async with _forwarder(tmp_path, cloud) as fwd:
        start = time.monotonic()
        fwd.forward("s1", "gw/sensors/s1/t", b"slow", 1, False, acks.callback(0))
        await _until(lambda: 0 in acks.got)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 1.5, waited  # spill_after, then the group's short wait and one fsync
        assert fwd.summary()["spilled"] == 1 and fwd.summary()["messages"] == 1
        assert len(_segments(tmp_path)) == 1
        cloud.ack()  # AWS IoT's acknowledgement comes later: the store records it is done
        await _until(lambda: fwd.summary()["messages"] == 0, 3.0)
    assert _segments(tmp_path) == []  # all done: no file left
    assert acks.got == {0: 0}


@sync
async def test_offline_everything_is_spilled_and_replayed_in_order_per_sensor(tmp_path: Path) -> None:
    cloud, acks = Cloud(connected=False), Acks()
    async with _forwarder(tmp_path, cloud) as fwd:
        for n in range(30):
            fwd.forward(f"s{n % 3}", f"gw/sensors/s{n % 3}/t", b"%d" % n, 1, False, acks.callback(n))
        await _until(lambda: len(acks.got) == 30)  # durable: acknowledged without AWS IoT
        assert fwd.summary()["messages"] == 30 and cloud.sent == []
        cloud.connected = True
        for n in range(30, 45):  # these stay in memory, behind their sensors' stored ones
            fwd.forward(f"s{n % 3}", f"gw/sensors/s{n % 3}/t", b"%d" % n, 1, False, acks.callback(n))
        await _until(lambda: len(cloud.sent) == 45)
        by_sensor: dict[str, list[int]] = {}
        for topic, payload, _ in cloud.sent:
            by_sensor.setdefault(topic.split("/")[2], []).append(int(payload))
        assert by_sensor == {f"s{k}": list(range(k, 45, 3)) for k in range(3)}
        first_round = [int(p) for p in _payloads(cloud)[:3]]
        assert sorted(n % 3 for n in first_round) == [0, 1, 2]  # round robin, not one sensor's backlog first
        cloud.ack()
        await _until(lambda: len(acks.got) == 45 and fwd.summary()["messages"] == 0, 3.0)


@sync
async def test_a_lost_connection_spills_what_was_in_flight(tmp_path: Path) -> None:
    cloud, acks = Cloud(), Acks()
    async with _forwarder(tmp_path, cloud) as fwd:
        for n in range(10):
            fwd.forward("s1", "gw/sensors/s1/t", b"%d" % n, 1, False, acks.callback(n))
        await _until(lambda: len(cloud.sent) == 10)
        cloud.drop_connection()
        fwd.forward("s1", "gw/sensors/s1/t", b"10", 1, False, acks.callback(10))
        await _until(lambda: len(acks.got) == 11)  # all durable now, the ten in flight too
        assert fwd.summary()["messages"] == 11
        cloud.connected = True
        await _until(lambda: len(cloud.sent) == 11)  # the one that was never sent
        cloud.ack()  # the uplink re-sent and AWS IoT acknowledged all eleven
        await _until(lambda: fwd.summary()["messages"] == 0, 3.0)


@sync
async def test_the_memory_bound_spills_the_oldest_at_once(tmp_path: Path) -> None:
    cloud, acks = Cloud(), Acks()
    async with _forwarder(tmp_path, cloud, memory_bytes=65536, spill_after="30s") as fwd:
        start = time.monotonic()
        for n in range(100):  # 100 KB waiting for AWS IoT, far under spill_after
            fwd.forward("s1", "gw/sensors/s1/t", b"%04d" % n + b"." * 1020, 1, False, acks.callback(n))
        await _until(lambda: len(acks.got) >= 30)
        assert time.monotonic() - start < 5  # not the 30 s of spill_after
        assert 0 in acks.got and fwd.summary()["inMemoryBytes"] <= 65536
        cloud.ack()
        await _until(lambda: len(acks.got) == 100)
        for n in range(100, 240):  # over twice memory_bytes at once: sensors' sockets are not read...
            fwd.forward("s1", "gw/sensors/s1/t", b"%04d" % n + b"." * 1020, 1, False, acks.callback(n))
        assert not fwd.accepting and fwd.summary()["readPauses"] == 1
        cloud.ack()  # ...until AWS IoT's acknowledgements or the store bring it under memory_bytes
        await _until(lambda: fwd.accepting)
        await _until(lambda: bool(cloud.ack() or True) and len(acks.got) == 240)  # AWS IoT answers all


@sync
async def test_a_full_store_holds_qos1_unacknowledged_and_drops_qos0(tmp_path: Path) -> None:
    cloud, acks = Cloud(connected=False), Acks()
    async with _forwarder(tmp_path, cloud, max_bytes=4096) as fwd:
        for n in range(45):  # 4,500 bytes of QoS 1 for 4,096 of room
            fwd.forward("s1", "gw/sensors/s1/t", b"%03d" % n + b"." * 97, 1, False, acks.callback(n))
        fwd.forward("s2", "gw/sensors/s2/t", b"q0" + b"." * 98, 0, False, None)
        await _until(lambda: fwd.summary()["full"])
        await _until(lambda: len(acks.got) == 40)
        assert sorted(acks.got) == list(range(40))  # in order: the first 40 stored, 5 held unacknowledged
        summary = fwd.summary()
        assert summary["heldBack"] == 5 and summary["droppedQos0"] == 1, summary
        cloud.connected = True  # the stored ones go first, then the held ones, straight from memory
        await _until(lambda: len(cloud.sent) == 45)
        assert [int(p[:3]) for p in _payloads(cloud)] == list(range(45))
        cloud.ack()
        await _until(lambda: len(acks.got) == 45 and not fwd.summary()["full"])


@sync
async def test_a_stop_spills_everything_waiting_and_a_restart_sends_it(tmp_path: Path) -> None:
    cloud, acks = Cloud(), Acks()
    async with _forwarder(tmp_path, cloud, spill_after="30s") as fwd:
        for n in range(5):
            fwd.forward("s1", "gw/sensors/s1/t", b"%d" % n, 1, False, acks.callback(n))
        fwd.forward("s1", "gw/sensors/s1/t", b"q0", 0, False, None)
        await _until(lambda: len(cloud.sent) == 6)
    assert sorted(acks.got) == list(range(5))  # stored at the stop: acknowledged
    cloud = Cloud()
    async with _forwarder(tmp_path, cloud) as fwd:
        await _until(lambda: len(cloud.sent) == 6)
        assert _payloads(cloud) == [b"0", b"1", b"2", b"3", b"4", b"q0"]
        cloud.ack()
        await _until(lambda: fwd.summary()["messages"] == 0, 3.0)
    assert _segments(tmp_path) == []
