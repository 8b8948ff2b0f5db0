"""Issue 17: hostile sensors against the broker in process (real sockets, the real session and codec). The
live daemon's hostile-client suite grows beside it as the issue's items are done."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import time
from pathlib import Path

import pytest

from gatewayd.core import logevents
from gatewayd.core.mqtt.codec import encode
from gatewayd.core.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Prop,
    Properties,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from gatewayd.core.mqtt.topics import Policy, identity_problem, policy_variables
from gatewayd.service.daemon import file_descriptors
from gatewayd.service.downstream.broker import Broker
from gatewayd.service.downstream.listeners import PendingGate
from gatewayd.service.logsetup import RateLimit

from .test_broker_failures import RaisingForwarder, RawSensor, _config, _serve

HOSTILE_IDS = ["s1/x", "+", "#", "sensors/#", "a${iot:ClientId}", "${", "bad\nline", "nul\x00", "x" * 129]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_hostile_client_ids_are_refused_before_any_session_exists(tmp_path: Path, version: int) -> None:
    """Items 4 and 5: '${' raised TemplateError after the session was stored (no CONNACK, a leaked session);
    '/' and wildcards widened or escaped policy rules. Refused now with 0x85 (3.1.1: 2), nothing stored."""
    broker = Broker(_config(tmp_path), None)

    async def body(port: int) -> None:
        for client_id in HOSTILE_IDS:
            sensor = await asyncio.to_thread(RawSensor, port, version)
            sensor.send(Connect(client_id, version, clean_start=False))
            answers = await asyncio.to_thread(sensor.read_until, 2)
            if "\x00" in client_id:  # U+0000 makes the CONNECT malformed: closed without CONNACK (1.5.4)
                assert answers == [] and sensor.closed
            else:
                expected = 2 if version == MQTT_311 else 0x85
                assert len(answers) == 1 and sensor.closed, (client_id, answers)  # closed after the refusal
                assert isinstance(answers[0], Connack) and answers[0].reason_code == expected, client_id
            sensor.close()
            assert client_id not in broker.sessions and client_id not in broker.clients
        good = await asyncio.to_thread(RawSensor, port, version)
        good.send(Connect("s1", version))
        (answer,) = await asyncio.to_thread(good.read_until, 1)
        assert answer == Connack(False, 0) or (isinstance(answer, Connack) and answer.reason_code == 0)
        good.close()

    asyncio.run(_serve(broker, body))


def test_identity_rules() -> None:
    for bad in HOSTILE_IDS:
        assert identity_problem(bad) is not None, bad
    for good in ("s1", "sensor-7f3a", "温度计", "$x", "a.b:c@d", "x" * 128, ""):
        assert identity_problem(good) is None, good


def test_deny_rules_fail_closed_and_allow_rules_drop() -> None:
    """Item 5: the rule-dropping protection dropped deny rules too (client id s1/x escaped a deny rule)."""
    policy = Policy(
        publish=("sensors/#",),
        subscribe=("commands/${iot:ClientId}/#",),
        deny_publish=("sensors/${iot:ClientId}/config",),
        deny_subscribe=("commands/${iot:Certificate.Subject.CommonName}/secret",),
    )
    bound = policy.bind(policy_variables("s1/x", "cn+", "gw"))
    assert not bound.may_publish("sensors/s1/x/config") and not bound.may_publish("sensors/other/t")
    assert not bound.may_subscribe("commands/s1/x/#") and not bound.may_subscribe("commands/other")
    fine = policy.bind(policy_variables("s1", "s1", "gw"))
    assert fine.may_publish("sensors/s1/t") and not fine.may_publish("sensors/s1/config")
    assert fine.may_subscribe("commands/s1/status") and not fine.may_subscribe("commands/s1/secret")


def test_a_slow_sender_gets_no_more_time_than_connect_timeout(tmp_path: Path) -> None:
    """Item 2: one byte every 0.8 s kept a connection that never completed CONNECT open for 75 s and more
    (each byte reset the read timeout that enforced connect_timeout)."""
    config = _config(tmp_path)
    config = dataclasses.replace(config, downstream=dataclasses.replace(config.downstream, connect_timeout=2))
    broker = Broker(config, None)

    async def body(port: int) -> None:
        sensor = await asyncio.to_thread(RawSensor, port, MQTT_311)
        started = time.monotonic()
        data = encode(Connect("slow", MQTT_311), MQTT_311)
        closed_after = None
        for byte in data[:-1]:  # never the whole CONNECT
            try:
                sensor.sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            await asyncio.sleep(0.4)
            if time.monotonic() - started > 8:
                break
        if closed_after is None:
            sensor.sock.settimeout(3)
            assert await asyncio.to_thread(sensor.read_until, 1) == [] and sensor.closed
            closed_after = time.monotonic() - started
        assert closed_after < 2 + 1.5, closed_after
        sensor.close()
        await asyncio.sleep(0.1)
        assert broker.early.count == 1  # counted (CLOSED_BEFORE_CONNECT), not a log line each

    asyncio.run(_serve(broker, body))


def test_pending_gate_bounds_in_all_and_per_address(caplog: pytest.LogCaptureFixture) -> None:
    """Item 1: connections before CONNECT were unbounded (1,200 bare TCP connections took every fd)."""
    caplog.set_level(logging.WARNING, logger="gatewayd.downstream")
    gate = PendingGate(total=5, per_address=2)
    assert gate.enter("192.0.2.1") and gate.enter("192.0.2.1")
    assert not gate.enter("192.0.2.1")  # a third from one address
    assert (
        gate.enter("::1") and gate.enter("127.0.0.2") and gate.enter("127.0.0.2")
    )  # loopback: no per-address cap
    assert not gate.enter("198.51.100.7")  # 5 pending in all
    assert gate.refused == 2
    gate.leave("192.0.2.1")
    assert gate.enter("198.51.100.7")
    assert gate.pending == 5 and gate.by_address == {
        "192.0.2.1": 1,
        "::1": 1,
        "127.0.0.2": 2,
        "198.51.100.7": 1,
    }
    limited = [r for r in caplog.records if getattr(r, "message_id", "") == logevents.CONNECTIONS_LIMITED.id]
    assert len(limited) == 1  # the second refusal within 10 s is counted, not logged


def test_asyncio_records_are_rate_limited() -> None:
    """Item 1: asyncio's accept retries wrote 122,000 log lines in 10 s; one of a kind per 10 s now."""
    now = [0.0]
    limit = RateLimit(clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = [limit.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 1
    assert limit.filter(record("another kind"))
    now[0] = 10.5
    again = record("socket.accept() out of system resource")
    assert limit.filter(again) and "999 more like this held back" in again.getMessage()


def test_the_open_files_limit_is_raised_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = _config(tmp_path)
    assert file_descriptors(config) == hard  # the soft limit raised to the hard one
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    caplog.set_level(logging.WARNING, logger="gatewayd.daemon")
    huge = dataclasses.replace(
        config, downstream=dataclasses.replace(config.downstream, max_connections=hard)
    )
    file_descriptors(huge)
    assert "raise LimitNOFILE=" in caplog.text


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_pipelined_hostile_variants(tmp_path: Path, version: int, caplog: pytest.LogCaptureFixture) -> None:
    """Item 3: CONNECT + CONNECT in one write hit an assertion; a flood behind a refused CONNECT must not be
    processed. A second CONNECT is a protocol error (3.1.1: closed; 5.0: DISCONNECT 0x82), nothing fails."""
    caplog.set_level(logging.INFO, logger="gatewayd.broker")
    forwarder = RaisingForwarder("never")
    broker = Broker(_config(tmp_path), forwarder)

    async def body(port: int) -> None:
        twice = await asyncio.to_thread(RawSensor, port, version)
        twice.send(Connect("c1", version), Connect("c1", version))
        answers = await asyncio.to_thread(twice.read_until, 3)
        assert isinstance(answers[0], Connack) and answers[0].reason_code == 0 and twice.closed
        if version == MQTT_5:
            assert answers[1:] == [Disconnect(0x82)]
        twice.close()
        flood = await asyncio.to_thread(RawSensor, port, version)
        flood.send(
            Connect("bad/id", version),
            *[Publish("sensors/x/t", b"x", 1, packet_id=i + 1) for i in range(300)],
        )
        answers = await asyncio.to_thread(flood.read_until, 3)
        assert len(answers) == 1 and isinstance(answers[0], Connack) and answers[0].reason_code in (2, 0x85)
        assert flood.closed
        flood.close()
        assert forwarder.forwarded == [] and "bad/id" not in broker.sessions

    asyncio.run(_serve(broker, body))
    assert not [
        r for r in caplog.records if getattr(r, "message_id", "") == logevents.SENSOR_CONNECTION_FAILED.id
    ]


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5])
def test_subscriptions_are_bounded_per_sensor(tmp_path: Path, version: int) -> None:
    """Items 6 and 7: one sensor could take all of the gateway's upstream subscriptions (and keep them in a
    persistent session), and hold 100,000 local ones. Bounded per sensor now; a filter AWS IoT would refuse
    upstream is refused."""
    config = _config(tmp_path)
    policy = dataclasses.replace(config.downstream.policy, subscribe=("commands/#", "local/#"))
    down = dataclasses.replace(config.downstream, max_subscriptions_per_sensor=20, policy=policy)
    broker = Broker(dataclasses.replace(config, downstream=down), None)
    refused = 0x80 if version == MQTT_311 else 0x97

    async def body(port: int) -> None:
        sensor = await asyncio.to_thread(RawSensor, port, version)
        sensor.send(Connect("greedy", version))
        await asyncio.to_thread(sensor.read_until, 1)
        upstream = [Subscription(f"commands/greedy/u{i}", 1) for i in range(10)]  # forwarded upstream
        sensor.send(Subscribe(1, tuple(upstream)))
        (suback,) = [p for p in await asyncio.to_thread(sensor.read_until, 2) if isinstance(p, Suback)]
        assert list(suback.reason_codes) == [1] * 8 + [refused] * 2  # max_upstream_subscriptions_per_sensor
        assert len(broker.upstream_refs) == 8
        deep = "commands/" + "/".join("x" * 8)  # 8 slashes upstream: AWS IoT allows 7
        sensor.send(Subscribe(2, (Subscription(deep, 1),)))
        packets = await asyncio.to_thread(sensor.read_until, 3)
        assert packets[-1].reason_codes == ((0x80 if version == MQTT_311 else 0x8F),)  # type: ignore[union-attr]
        local = [Subscription(f"local/greedy/{i}", 0) for i in range(30)]  # not forwarded
        sensor.send(Subscribe(3, tuple(local)))
        packets = await asyncio.to_thread(sensor.read_until, 4)
        assert list(packets[-1].reason_codes) == [0] * 12 + [refused] * 18  # type: ignore[union-attr]
        assert len(broker.sessions["greedy"].state.subscriptions) == 20
        sensor.close()

    asyncio.run(_serve(broker, body))


def test_retained_messages_are_bounded_in_bytes_and_expire(tmp_path: Path) -> None:
    """Item 8: retained messages were bounded by count only (one sensor parked 125 MiB, never expiring)."""
    config = _config(tmp_path)
    policy = dataclasses.replace(config.downstream.policy, subscribe=("sensors/#",))
    down = dataclasses.replace(
        config.downstream, policy=policy, max_retained_bytes=500_000, max_retained_bytes_per_sensor=250_000
    )
    broker = Broker(dataclasses.replace(config, downstream=down), None)
    big = b"r" * 100_000

    async def body(port: int) -> None:
        hog = await asyncio.to_thread(RawSensor, port, MQTT_5)
        hog.send(Connect("hog", MQTT_5))
        await asyncio.to_thread(hog.read_until, 1)
        for _ in range(10):  # the same topic again and again: counted once
            hog.send(Publish("sensors/hog/same", big, 0, retain=True))
        for i in range(5):
            hog.send(Publish(f"sensors/hog/t{i}", big, 0, retain=True))
        other = await asyncio.to_thread(RawSensor, port, MQTT_5)
        other.send(Connect("other", MQTT_5))
        await asyncio.to_thread(other.read_until, 1)
        for i in range(5):
            other.send(Publish(f"sensors/other/t{i}", big, 0, retain=True))
        props = Properties(((Prop.MESSAGE_EXPIRY_INTERVAL, 3),))
        other.send(Publish("sensors/other/brief", b"soon gone", 0, retain=True, properties=props))
        await asyncio.sleep(0.5)
        assert broker.retained.by_owner["hog"] <= 250_000 and broker.retained.bytes <= 500_000
        assert "sensors/hog/same" in broker.retained.messages and broker.retained.refused >= 4
        await asyncio.sleep(1.0)  # the brief one has waited 1.5 s: 2 s of its 3 are left, rounded up
        reader = await asyncio.to_thread(RawSensor, port, MQTT_5)
        reader.send(Connect("reader", MQTT_5), Subscribe(1, (Subscription("sensors/#", 0),)))
        await asyncio.sleep(0.5)
        reader.sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.to_thread(reader.read_until, 100)
        got = [p for p in reader.packets if isinstance(p, Publish)]
        assert [p.topic for p in got if p.topic.startswith("sensors/hog/")] == [
            "sensors/hog/same",
            "sensors/hog/t0",
        ]
        brief = [p for p in got if p.topic == "sensors/other/brief"]
        assert brief and brief[0].properties.get(Prop.MESSAGE_EXPIRY_INTERVAL) in (1, 2)  # 3 less the wait
        assert sum(len(p.payload) + len(p.topic) for p in got) <= 500_000
        await asyncio.sleep(1.2)
        broker.expire_retained(time.monotonic())
        assert "sensors/other/brief" not in broker.retained.messages
        for s in (hog, other, reader):
            s.close()

    asyncio.run(_serve(broker, body))
