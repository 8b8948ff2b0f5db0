"""Never lose a reading (issue 7): the spool, quota shaping, fairness and batching in the running daemon.

Real parts: the daemon, swtpm, a private stand-in (mosquitto with persistence, so its observer's session
survives the stand-in's restart), mosquitto_pub and paho as sensors, mosquitto_sub as the observer.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.service import forwarder
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack

from .conftest import REPO


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = DevStack(tmp_path_factory.mktemp("spool-stack"), persistent=True).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sensor_ca() -> pki.Issued:
    return pki.make_root("Spool Sensor CA", "ecc")


@dataclass
class GW:
    stack: DevStack
    workdir: Path
    config: Path
    tables: dict[str, dict[str, Any]]
    ca: pki.Issued
    daemon: Gateway | None = None

    def start(self) -> Gateway:
        env = {**gateway_env(self.stack), "PYTHONPATH": str(REPO)}
        self.daemon = Gateway(self.config, self.workdir, env=env)
        self.daemon.wait_ready()
        return self.daemon

    def ctl(self, command: str = "status") -> Any:
        return request(self.workdir / "control.sock", command, None)

    def spool(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl()["spool"]
        return result

    def connected(self) -> bool:
        return bool(self.ctl()["uplink"]["state"] == "connected")

    @property
    def port(self) -> int:
        return int(self.tables["downstream"]["listener"][0]["port"])

    def files(self, name: str) -> tuple[Path, Path]:
        return pki.write_client(self.ca, self.workdir, name)

    def sensor(self, name: str) -> Sensor:
        cert, key = self.files(name)
        return Sensor(name, self.port, self.workdir / "state" / "localca" / "ca.pem", cert, key)

    def mosquitto_pub(self, name: str, topic: str, qos: int = 1) -> subprocess.Popen[bytes]:
        """A third-party sensor: mosquitto_pub -l publishes every line written to its stdin."""
        cert, key = self.files(name)
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-i", name, "-t", topic]
        argv += ["-q", str(qos), "-l", "--cafile", str(self.workdir / "state" / "localca" / "ca.pem")]
        argv += ["--cert", str(cert), "--key", str(key)]
        return subprocess.Popen(argv, stdin=subprocess.PIPE)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def make_gw(stack: DevStack, sensor_ca: pki.Issued, tmp_path: Path) -> Iterator[Callable[..., GW]]:
    made: list[GW] = []

    def make(thing: str, **sections: Any) -> GW:
        # These tests stop the stand-in for up to half a minute; with the default 120 s cap the next attempt
        # after the outage could be a minute away (full jitter). Backoff itself is tested in test_uplink.
        sections["upstream"] = {"reconnect_max_delay": 4, **sections.get("upstream", {})}
        tables = standin_config(stack, tmp_path, thing, downstream={"auto_activate": True}, **sections)
        tables["downstream"]["policy"] = {"publish": ["sensors/${iot:ClientId}/#"]}
        config = write_config(tmp_path / "g.toml", tables)
        provision(stack, config)
        register_ca(config, sensor_ca, auto_registration=True)
        gw = GW(stack, tmp_path, config, tables, sensor_ca)
        made.append(gw)
        gw.start()
        wait_until(gw.connected, 20, "the uplink")
        return gw

    yield make
    for gw in made:
        gw.stop()


def _by_sensor(lines: list[str]) -> dict[str, list[int]]:
    """Observer lines "topic <sensor> <n>" -> each sensor's numbers, in arrival order."""
    out: dict[str, list[int]] = {}
    for line in lines:
        sensor, n = line.split(" ")[-2:]
        out.setdefault(sensor, []).append(int(n.rstrip(".")))  # payloads may be padded with dots
    return out


def test_outage_under_qos1_load_from_third_party_clients(make_gw: Callable[..., GW], stack: DevStack) -> None:
    """Five mosquitto_pub sensors publish QoS 1 while the stand-in is stopped for a while: after it is back,
    every message arrives, in order per sensor."""
    gw = make_gw("gw-outage")
    obs = Observer(stack, "gw-outage/sensors/#", gw.workdir / "obs.txt", session="obs-outage")
    names = [f"pub{i}" for i in range(5)]
    pubs = {n: gw.mosquitto_pub(n, f"sensors/{n}/n") for n in names}
    per_sensor = 300
    try:
        for i in range(per_sensor):
            for n, p in pubs.items():
                assert p.stdin is not None
                p.stdin.write(f"{n} {i}\n".encode())
                p.stdin.flush()
            if i == 100:
                stack.standin.stop()
                wait_until(lambda: not gw.connected(), 20, "the uplink to notice the outage")
            if 100 <= i < 200:
                time.sleep(0.02)  # about 2 s of publishing while the stand-in is down
            if i == 200:
                during = gw.spool()
                assert during["messages"] > 0, during  # the outage's messages wait in the spool
                stack.standin.start()
        for p in pubs.values():
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(60) == 0
        total = per_sensor * len(names)
        lines = obs.wait(total, timeout=90)
        got = _by_sensor(lines)
        for n in names:
            first_seen = list(dict.fromkeys(got[n]))
            assert first_seen == list(range(per_sensor)), f"{n}: lost or out of order"
        duplicates = len(lines) - total
        # at least once: only what was in flight when the stand-in went away may arrive twice
        assert duplicates <= 100, duplicates
        wait_until(lambda: gw.spool()["messages"] == 0, 30, "the spool to drain")
        print(f"\n{total} QoS 1 messages through a stand-in outage: none lost, {duplicates} duplicated")
    finally:
        for p in pubs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        obs.stop()


def test_every_acknowledged_message_survives_sigkill(make_gw: Callable[..., GW], stack: DevStack) -> None:
    gw = make_gw("gw-kill")
    obs = Observer(stack, "gw-kill/sensors/#", gw.workdir / "obs.txt", session="obs-kill")
    stack.standin.stop()  # nothing leaves: everything acknowledged is only in the spool when the kill comes
    sensor = gw.sensor("killed")
    acked: list[int] = []
    try:
        assert sensor.connect() == 0
        # paho's window (20 in flight): a one-in-flight sensor offline gets about ten PUBACKs a second (each
        # waits for a spill group, up to 0.1 s; README), which would make this test 20 s longer
        infos = [sensor.client.publish("sensors/killed/n", f"killed {i}".encode(), qos=1) for i in range(200)]
        wait_until(lambda: all(i.mid in sensor.acks for i in infos), 30, "every PUBACK")
        acked.extend(range(200))
        assert gw.daemon is not None
        gw.daemon.signal(signal.SIGKILL)
        gw.daemon.proc.popen.wait(10)
        gw.daemon.stop()
        sensor.stop()
        stack.standin.start()
        gw.start()
        wait_until(gw.connected, 30, "the uplink after the restart")
        lines = obs.wait(len(acked), timeout=60)
        assert sorted(set(_by_sensor(lines)["killed"])) == acked
        assert list(dict.fromkeys(_by_sensor(lines)["killed"])) == acked  # in order
        wait_until(lambda: gw.spool()["messages"] == 0, 30, "the spool to drain")
    finally:
        obs.stop()


def test_full_spool_drops_qos0_first_and_holds_qos1(make_gw: Callable[..., GW], stack: DevStack) -> None:
    gw = make_gw("gw-full", spool={"max_bytes": 4096})
    obs = Observer(stack, "gw-full/sensors/#", gw.workdir / "obs.txt", session="obs-full")
    stack.standin.stop()
    wait_until(lambda: not gw.connected(), 20, "the outage")
    s = gw.sensor("filler")
    try:
        assert s.connect() == 0
        for i in range(20):  # 20 x 100 bytes of QoS 0
            s.publish("sensors/filler/q0", f"filler q0-{i}".encode().ljust(100, b"."), qos=0)
        wait_until(lambda: gw.spool()["bytes"] >= 2000, 10, "QoS 0 in the spool")
        for i in range(40):  # 40 x 100 bytes of QoS 1: the spool takes 40 only by dropping QoS 0
            assert s.publish("sensors/filler/q1", f"filler {i}".encode().ljust(100, b"."), qos=1) == 0
        spool = gw.spool()
        assert spool["droppedQos0"] == 20 and spool["bytes"] == 4000, spool
        info = [s.client.publish("sensors/filler/q1", f"filler {40 + i}".encode().ljust(100, b"."), qos=1)
                for i in range(3)]  # fmt: skip
        wait_until(lambda: gw.spool()["heldBack"] == 3, 10, "the held-back QoS 1 messages")
        time.sleep(1.0)
        assert not any(i.mid in s.acks for i in info[1:])  # the sensor has no PUBACK: it keeps them
        assert gw.spool()["full"] is True
        assert gw.daemon is not None and logevents.SPOOL_FULL.id in gw.daemon.log()
        daemon = gw.daemon

        def logged_drops() -> int:  # the first drop is logged at once, the rest of the burst 10 s later
            return sum(int(n) for n in re.findall(r"dropped_qos0=(\d+)", daemon.log()))

        wait_until(lambda: logged_drops() == 20, 15, "the drops in the log")
        assert logevents.SPOOL_BACKLOG.id in daemon.log()  # depth and age in the journal while messages wait
        stack.standin.start()
        wait_until(lambda: all(i.mid in s.acks for i in info), 30, "PUBACKs once there is room")
        lines = obs.wait(43, timeout=60)
        q1 = _by_sensor(lines)["filler"]
        assert list(dict.fromkeys(q1)) == list(range(43)), "a QoS 1 message was lost"
        assert not any("q0-" in line for line in lines)  # the QoS 0 ones made room
        assert gw.spool()["full"] is False
    finally:
        s.stop()
        obs.stop()


def _max_in_window(stamps: list[float], window: float = 1.0) -> int:
    best, start = 0, 0
    for end, t in enumerate(stamps):
        while stamps[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_publish_rate_stays_within_the_quota_and_sensors_share_it(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    """With 20 publishes/s allowed: a flooding sensor's backlog does not delay the calm sensors' messages
    by more than a round, and the stand-in never sees more than 20 publishes in any second."""
    quota = 20
    gw = make_gw("gw-quota", upstream={"quota": {"publishes_per_second": quota}})
    obs = Observer(stack, "gw-quota/sensors/#", gw.workdir / "obs.txt", stamped=True)
    flood = gw.mosquitto_pub("flood", "sensors/flood/n")
    calm = [gw.sensor(f"calm{i}") for i in range(3)]
    try:
        assert flood.stdin is not None
        flood.stdin.write(b"".join(f"flood {i}\n".encode() for i in range(300)))  # 15 s of quota
        flood.stdin.flush()
        wait_until(lambda: gw.spool()["messages"] > 100, 20, "the flood's backlog")
        sent_at: dict[str, float] = {}
        for c in calm:
            assert c.connect() == 0
        for round_ in range(3):
            for c in calm:
                assert c.publish(f"sensors/{c.client_id}/n", f"{c.client_id} {round_}".encode()) == 0
                sent_at[f"{c.client_id} {round_}"] = time.time()
            time.sleep(1.0)
        calm_lines = lambda: [ln for ln in obs.lines() if " calm" in ln]  # noqa: E731
        wait_until(lambda: len(calm_lines()) >= 9, 20, "the calm sensors' messages")
        for line in calm_lines():
            stamp, _topic, name, n = line.split(" ")
            delay = float(stamp) - sent_at[f"{name} {n}"]
            assert delay < 3.0, f"{name} {n} waited {delay:.1f} s behind the flood"
        assert gw.spool()["messages"] > 0  # the flood was still queued: the calm ones went past it
        flood.stdin.close()
        assert flood.wait(60) == 0
        lines = obs.wait(309, timeout=60)
        stamps = sorted(float(line.split(" ")[0]) for line in lines)
        peak = _max_in_window(stamps)
        elapsed = stamps[-1] - stamps[0]
        rate = (len(stamps) - 1) / elapsed
        print(f"\nquota {quota}/s: peak {peak} publishes in any 1 s at the stand-in, mean {rate:.1f}/s")
        assert peak <= quota + 2, peak  # arrival jitter at the observer may pull a message or two together
        assert rate <= quota * 1.05
        status = gw.ctl()["uplink"]
        assert status["throttledSeconds"] > 5 and status["published"] >= 309
        assert gw.daemon is not None and logevents.UPLINK_THROTTLED.id in gw.daemon.log()
    finally:
        for c in calm:
            c.stop()
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        obs.stop()


def test_batching_combines_readings_within_bounds(make_gw: Callable[..., GW], stack: DevStack) -> None:
    gw = make_gw(
        "gw-batch",
        forwarding={
            "batch": [
                {"topic": "sensors/+/telemetry", "max_bytes": 2048, "max_delay": "0.5s"},
                {"topic": "sensors/+/ingest", "basic_ingest_rule": "telemetry_ingest"},
            ]
        },
    )
    obs = Observer(stack, "gw-batch/sensors/#", gw.workdir / "obs.txt")
    ingest = Observer(stack, "$aws/rules/#", gw.workdir / "ingest.txt")
    pub = gw.mosquitto_pub("batcher", "sensors/batcher/telemetry")
    plain = gw.sensor("plain")
    try:
        assert plain.connect() == 0
        assert plain.publish("sensors/plain/ingest", b"not json") == 0
        line = ingest.wait(1)[0]
        topic, payload = line.split(" ", 1)
        assert topic == "$aws/rules/telemetry_ingest/gw-batch/sensors/plain/ingest"  # AWS Basic Ingest
        assert json.loads(payload)["batch"][0]["payload"] == {"base64": "bm90IGpzb24="}  # not JSON: base64
        assert pub.stdin is not None
        pub.stdin.write(b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(200)))
        pub.stdin.close()
        assert pub.wait(30) == 0
        wait_until(lambda: gw.spool()["delivered"] >= 200, 30, "every reading delivered")
        lines = obs.lines()
        readings = []
        for line in lines:
            topic, payload = line.split(" ", 1)
            assert topic == "gw-batch/sensors/batcher/telemetry"
            assert len(payload) <= 2048
            batch = json.loads(payload)["batch"]
            assert all(item["clientId"] == "batcher" and item["timestamp"] > 0 for item in batch)
            readings += [item["payload"]["n"] for item in batch]
        assert readings == list(range(200))  # all, once, in order
        assert len(lines) < 200 / 10, f"{len(lines)} messages for 200 readings"
        print(f"\n200 readings in {len(lines)} batch messages")
    finally:
        plain.stop()
        ingest.stop()
        obs.stop()


def test_old_messages_expire_and_the_status_line_shows_the_spool(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    gw = make_gw("gw-expire", spool={"max_age": "3s"})
    assert gw.daemon is not None
    daemon = gw.daemon
    stack.standin.stop()
    wait_until(lambda: not gw.connected(), 20, "the outage")
    s = gw.sensor("ager")
    try:
        assert s.connect() == 0
        for i in range(5):
            assert s.publish("sensors/ager/n", f"ager {i}".encode()) == 0
        # systemctl status (sd_notify STATUS=) tells that messages wait (refreshed every 5 s)
        daemon.notify.wait_for("STATUS", timeout=10)
        wait_until(
            lambda: any("spool 5 messages" in m.get("STATUS", "") for m in daemon.notify.messages),
            10,
            "STATUS= with the spool",
        )
        wait_until(lambda: gw.spool()["droppedExpired"] == 5, 10, "the messages to expire")
        assert gw.spool()["messages"] == 0

        # Drops are logged in aggregate, at most every 10 s: expiry sweeps that split the 5 (a loaded machine)
        # give two lines, the second up to 10 s after the count.
        def logged() -> int:
            counts = re.findall(r"(\d+) message\(s\) older than spool.max_age", daemon.log())
            return sum(int(n) for n in counts)

        wait_until(lambda: logged() == 5, 15, "the 5 drops logged")
        assert logevents.SPOOL_DROPPED.id in daemon.log()
    finally:
        s.stop()
        stack.standin.start()


def _publish_until_killed(gw: GW, name: str, count: int, acked: list[int]) -> threading.Thread:
    """A sensor publishing QoS 1 readings one after another (each waits for its PUBACK), recording the
    acknowledged ones, until `count` or until the gateway goes away."""
    sensor = gw.sensor(name)
    assert sensor.connect() == 0

    def run() -> None:
        try:
            for i in range(count):
                if sensor.publish(f"sensors/{name}/n", f"{name} {i}".encode(), qos=1, timeout=3) != 0:
                    return
                acked.append(i)
        except Exception:  # the gateway was killed under it: what was acknowledged is recorded
            return
        finally:
            sensor.stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_kill_during_the_spill_loses_no_acknowledged_reading(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    """The uplink is down, so every reading is being spilled (groups written and fsynced while sensors
    publish) when the daemon is SIGKILLed. After the restart every acknowledged reading reaches AWS IoT, in
    order per sensor."""
    gw = make_gw("gw-kill-spill")
    obs = Observer(stack, "gw-kill-spill/sensors/#", gw.workdir / "obs.txt", session="obs-kill-spill")
    stack.standin.stop()
    try:
        wait_until(lambda: not gw.connected(), 20, "the outage")
        acked: dict[str, list[int]] = {f"spill{k}": [] for k in range(3)}
        threads = [_publish_until_killed(gw, name, 100_000, acked[name]) for name in acked]
        wait_until(lambda: all(len(a) > 50 for a in acked.values()), 20, "readings being spilled")
        assert gw.daemon is not None
        gw.daemon.signal(signal.SIGKILL)
        gw.daemon.proc.popen.wait(10)
        gw.daemon.stop()
        for t in threads:
            t.join(10)
        stack.standin.start()
        gw.start()
        total = sum(len(a) for a in acked.values())
        lines = obs.wait(total, timeout=60)
        got = _by_sensor(lines)
        for name, numbers in acked.items():
            first_seen = list(dict.fromkeys(got[name]))
            assert first_seen[: len(numbers)] == numbers, f"{name}: an acknowledged reading lost or reordered"
        wait_until(lambda: gw.spool()["messages"] == 0, 30, "the spool to drain")
    finally:
        stack.standin.start()
        obs.stop()


def test_a_kill_during_the_drain_loses_nothing_and_repeats_little(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    """3,000 readings wait in the spool; the uplink comes back and the drain is under way when the daemon is
    SIGKILLed. After the restart the rest is sent: nothing lost, and AWS IoT sees again at most what was in
    flight plus what it acknowledged since the last done record was written (FLUSH_EVERY)."""
    gw = make_gw("gw-kill-drain", upstream={"quota": {"publishes_per_second": 500}})
    obs = Observer(stack, "gw-kill-drain/sensors/#", gw.workdir / "obs.txt", session="obs-kill-drain")
    stack.standin.stop()
    try:
        wait_until(lambda: not gw.connected(), 20, "the outage")
        s = gw.sensor("drain")
        assert s.connect() == 0
        infos = [s.client.publish("sensors/drain/n", f"drain {i}".encode(), qos=1) for i in range(3000)]
        wait_until(lambda: all(i.mid in s.acks for i in infos), 60, "every reading acknowledged (spilled)")
        s.stop()
        assert gw.spool()["messages"] == 3000
        stack.standin.start()
        wait_until(lambda: len(obs.lines()) >= 1000, 30, "the drain under way")
        assert gw.daemon is not None
        gw.daemon.signal(signal.SIGKILL)
        gw.daemon.proc.popen.wait(10)
        seen_at_kill = len(obs.lines())
        gw.daemon.stop()
        gw.start()
        obs.wait(3000, timeout=60)
        deadline = time.monotonic() + 30  # duplicates count among the lines: wait for every reading itself
        while len(set(_by_sensor(obs.lines()).get("drain", []))) < 3000 and time.monotonic() < deadline:
            time.sleep(0.2)
        missing = set(range(3000)) - set(_by_sensor(obs.lines())["drain"])
        assert not missing, f"{len(missing)} spilled readings lost, e.g. {sorted(missing)[:10]}"
        wait_until(lambda: gw.spool()["messages"] == 0, 30, "the spool to drain")
        time.sleep(1.0)  # late duplicates
        duplicates = len(_by_sensor(obs.lines())["drain"]) - 3000
        # in flight (100) plus at most FLUSH_EVERY's worth of acknowledgements at the 500/s quota
        bound = 100 + int(500 * forwarder.FLUSH_EVERY) + 50
        print(f"\nkill during the drain: {seen_at_kill} delivered before the kill, {duplicates} duplicates")
        assert duplicates <= bound, (duplicates, bound)
    finally:
        stack.standin.start()
        obs.stop()
