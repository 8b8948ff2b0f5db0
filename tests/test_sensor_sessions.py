"""Sensors as people write them (issue 14): publish right after connect(), persistent sessions, the daemon
SIGKILLed and restarted under load, the sensor's own network dropped.

Real parts: the daemon with its TPM-held uplink to the AWS IoT stand-in, mutual TLS on 127.0.0.1, and as
sensors: Debian 12's paho-mqtt 1.6 (it sends PUBLISHes in the same write as CONNECT, and re-sends everything
it holds right behind CONNECT on every reconnect), paho-mqtt 2.x, the AWS IoT Device SDK v2 and
mosquitto_pub, in MQTT 3.1.1 and 5.0. Both paho generations run in every pass of the suite: Debian's python3
for 1.6, the dev venv for 2.x (gatewayd_dev/stream_sensor.py runs under either).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import MQTT_311, Connack, Connect, Disconnect, Puback, Publish
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack

from .conftest import REPO

THING = "gw-sessions"
UPLINK_INFLIGHT = 20  # upstream.quota.max_inflight here: bounds what AWS IoT may see twice after a SIGKILL
SENSOR_INFLIGHT = 20  # paho's and the Device SDK's default window
DEBIAN_PYTHON = "/usr/bin/python3"
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")

# (interpreter, library, MQTT 5): both paho generations whichever interpreter runs the suite
CLIENTS = {
    "paho1.6-311": (DEBIAN_PYTHON, "paho", False),
    "paho1.6-5": (DEBIAN_PYTHON, "paho", True),
    "paho2-311": (VENV_PYTHON, "paho", False),
    "paho2-5": (VENV_PYTHON, "paho", True),
    "awsiotsdk-311": (VENV_PYTHON, "awscrt", False),
}


def _paho_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import paho.mqtt; print(paho.mqtt.__version__)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, f"{python} cannot import paho-mqtt (make deps installs it): {out.stderr}"
    return out.stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def both_paho_generations() -> None:
    """The clients are what they claim to be (make deps installs both); never skipped."""
    assert _paho_version(DEBIAN_PYTHON).startswith("1."), "Debian 12's python3-paho-mqtt is 1.6"
    assert _paho_version(VENV_PYTHON).startswith("2."), "the dev venv pins paho-mqtt 2.x"


@dataclass
class GW:
    stack: DevStack
    workdir: Path
    config: Path
    port: int
    ca: pki.Issued
    daemon: Gateway | None = None
    logs: list[str] = field(default_factory=list)

    def start(self) -> Gateway:
        self.daemon = Gateway(
            self.config, self.workdir, env={**gateway_env(self.stack), "PYTHONPATH": str(REPO)}
        )
        self.daemon.wait_ready(30)
        return self.daemon

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.signal(signal.SIGKILL)
        self.daemon.proc.popen.wait(10)
        self.logs.append(self.daemon.log())
        self.daemon.stop()

    def log(self) -> str:
        return "".join(self.logs) + (self.daemon.log() if self.daemon is not None else "")

    def connected(self) -> bool:
        return bool(request(self.workdir / "control.sock", "status", None)["uplink"]["state"] == "connected")

    @property
    def local_ca(self) -> Path:
        return self.workdir / "state" / "localca" / "ca.pem"

    def files(self, name: str) -> tuple[Path, Path]:
        return pki.write_client(self.ca, self.workdir, name)


@pytest.fixture(scope="module")
def gw(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GW]:
    workdir = tmp_path_factory.mktemp("sessions")
    ca = pki.make_root("Sessions Sensor CA", "ecc")
    tables = standin_config(
        devstack, workdir, THING, downstream={"auto_activate": True},
        upstream={"reconnect_max_delay": 2},
    )  # fmt: skip
    tables["downstream"]["policy"] = {"publish": ["sensors/${iot:ClientId}/#"]}
    # The stand-in is not AWS IoT: a higher publish quota keeps these tests short (shaping: test_shaping)
    tables["upstream"]["quota"] = {"publishes_per_second": 3000, "max_inflight": UPLINK_INFLIGHT}
    config = write_config(workdir / "g.toml", tables)
    provision(devstack, config)
    register_ca(config, ca, auto_registration=True)
    g = GW(devstack, workdir, config, int(tables["downstream"]["listener"][0]["port"]), ca)
    g.start()
    try:
        wait_until(g.connected, 30, "the uplink")
        yield g
    finally:
        if g.daemon is not None:
            g.daemon.stop()
        log = g.log()
        # no connection task may end on an exception, whatever the test did
        assert "Task exception was never retrieved" not in log
        assert "SENSOR_CONNECTION_FAILED" not in log and "sensor connection" not in log, log[-3000:]


@dataclass
class Run:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path

    def result(self, timeout: float) -> dict[str, Any]:
        """The sensor's record with "exit"; for a crowd ("clients"), each client's record with the exit."""
        self.proc.wait(timeout)
        data: dict[str, Any] = json.loads(self.out.read_text())
        if "published" in data:
            data["exit"] = self.proc.returncode
            return data
        for record in data.values():  # one process: an exit status for all, each record judged by itself
            record["exit"] = 0 if all(t is not None for t in record["acked"]) else 1
        return {"exit": self.proc.returncode, "clients": data}


def stream(
    gw: GW,
    name: str,
    client: str,
    count: int,
    rate: float = 0,
    port: int | None = None,
    clients: int = 0,
    cert_dir: Path | None = None,
) -> Run:
    """gatewayd_dev.stream_sensor as client `name` (or `clients` clients name-0..., certificates in
    `cert_dir`), with the interpreter and library CLIENTS names."""
    python, library, mqtt5 = CLIENTS[client]
    out = gw.workdir / f"{name}.json"
    argv = [python, "-m", "gatewayd_dev.stream_sensor", "--port", str(port or gw.port)]
    argv += ["--ca", str(gw.local_ca), "--client-id", name]
    if clients:
        argv += ["--clients", str(clients), "--cert-dir", str(cert_dir)]
    else:
        cert, key = gw.files(name)
        argv += ["--cert", str(cert), "--key", str(key)]
    argv += ["--out", str(out), "--library", library, "--count", str(count), "--rate", str(rate)]
    argv += ["--timeout", "90"] + (["--mqtt5"] if mqtt5 else [])
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return Run(name, subprocess.Popen(argv, env=env, cwd=REPO), out)


def arrivals(lines: list[str]) -> dict[str, list[int]]:
    """Observer lines "<thing>/sensors/<id>/stream <id> <n>" -> each sensor's readings, in arrival order."""
    out: dict[str, list[int]] = {}
    for line in lines:
        sensor, n = line.split(" ")[-2:]
        out.setdefault(sensor, []).append(int(n))
    return out


def acked(result: dict[str, Any]) -> list[int]:
    return [i for i, t in enumerate(result["acked"]) if t is not None]


def in_flight_at(result: dict[str, Any], when: float) -> int:
    """Readings handed to the client library by `when` and not acknowledged by then, bounded by the client's
    window (what is beyond it had not been sent)."""
    waiting = sum(
        1
        for p, a in zip(result["published"], result["acked"], strict=True)
        if p is not None and p <= when and (a is None or a > when)
    )
    return min(waiting, SENSOR_INFLIGHT)


# ---------------------------------------------------------------- publish right after connect()


@pytest.mark.parametrize("client", list(CLIENTS))
def test_publish_right_after_connect(gw: GW, client: str) -> None:
    """200 QoS 1 readings published at once after connect(), on a persistent session (paho 1.6 puts the
    first ones in the same write as CONNECT): one CONNACK, every reading acknowledged and upstream."""
    name = f"burst-{client}"
    obs = Observer(gw.stack, f"{THING}/sensors/{name}/#", gw.workdir / f"obs-{name}.txt")
    try:
        result = stream(gw, name, client, 200).result(60)
        assert result["exit"] == 0, result["disconnects"]
        assert len(result["connacks"]) == 1 and result["connacks"][0][1] is False
        last_ack = max(t for t in result["acked"] if t is not None)
        assert [d for d in result["disconnects"] if d[0] <= last_ack] == []
        got = arrivals(obs.wait(200, 30))[name]
        assert sorted(set(got)) == list(range(200))
    finally:
        obs.stop()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub_persistent_session_lines(gw: GW, version: str) -> None:
    """mosquitto_pub -l with a persistent session (-c), 100 lines written at once."""
    name = f"mosq-{version}"
    cert, key = gw.files(name)
    obs = Observer(gw.stack, f"{THING}/sensors/{name}/#", gw.workdir / f"obs-{name}.txt")
    argv = [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(gw.port),
        "-i",
        name,
        "-c",
        "-q",
        "1",
        "-V",
        version,
    ]
    argv += ["-t", f"sensors/{name}/stream", "-l", "--cafile", str(gw.local_ca), "--cert", str(cert)]
    argv += ["--key", str(key)] + (["-x", "600"] if version == "mqttv5" else [])
    try:
        pub = subprocess.run(
            argv, input="".join(f"{name} {i}\n" for i in range(100)).encode(), timeout=60, capture_output=True
        )
        assert pub.returncode == 0, pub.stderr
        got = arrivals(obs.wait(100, 30))[name]
        assert sorted(set(got)) == list(range(100))
    finally:
        obs.stop()


def test_raw_connect_and_300_publishes_in_one_write(gw: GW) -> None:
    """CONNECT and 300 QoS 1 PUBLISHes in a single write, 3.1.1 (no Receive Maximum: 300 is three times the
    gateway's window): CONNACK first, then all 300 PUBACKs in order; no DISCONNECT, no close."""
    name = "raw-pipeline"
    cert, key = gw.files(name)
    ctx = ssl.create_default_context(cafile=str(gw.local_ca))
    ctx.load_cert_chain(str(cert), str(key))
    data = encode(Connect(name, MQTT_311, clean_start=False), MQTT_311)
    data += b"".join(
        encode(Publish(f"sensors/{name}/stream", f"{name} {i}".encode(), 1, packet_id=i + 1), MQTT_311)
        for i in range(300)
    )
    obs = Observer(gw.stack, f"{THING}/sensors/{name}/#", gw.workdir / f"obs-{name}.txt")
    answers: list[Any] = []
    try:
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=20) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(data)
            decoder = Decoder(MQTT_311)
            deadline = time.monotonic() + 30
            while len(answers) < 301 and time.monotonic() < deadline:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                answers += decoder.feed(chunk)
            tls.sendall(encode(Disconnect(), MQTT_311))
        assert answers[0] == Connack(False, 0)
        assert answers[1:] == [Puback(i + 1) for i in range(300)]
        assert sorted(set(arrivals(obs.wait(300, 30))[name])) == list(range(300))
    finally:
        obs.stop()


# ---------------------------------------------------------------- restart under load, network drop


def _stop(runs: dict[str, Run], obs: Observer) -> None:
    """Sensors still running (a test failed) are ended by their PID; the observer is stopped."""
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
    obs.stop()


LOAD = ["paho1.6-311", "paho1.6-5", "paho2-311", "paho2-5"]


def _check_everything_arrived(results: dict[str, dict[str, Any]], obs: Observer) -> Counter[str]:
    """Every sensor got every reading acknowledged, and every acknowledged reading reaches AWS IoT (waited
    for, up to 90 s: the spool may still be sending the last ones). Returns the duplicates per sensor."""
    for name, result in results.items():
        assert result["exit"] == 0, f"{name}: not every reading acknowledged; {result['disconnects']}"
    wanted = {(name, seq) for name, result in results.items() for seq in acked(result)}

    def missing() -> set[tuple[str, int]]:
        return wanted - {(name, seq) for name, seqs in arrivals(obs.lines()).items() for seq in seqs}

    deadline = time.monotonic() + 90
    while (left := missing()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{len(left)} acknowledged readings never reached AWS IoT, e.g. {sorted(left)[:5]}"
    time.sleep(1.0)  # late duplicates
    got = arrivals(obs.lines())
    return Counter({name: len(got[name]) - len(set(got[name])) for name in results})


def test_persistent_sensors_across_a_daemon_sigkill_under_load(gw: GW) -> None:
    """Four persistent sensors (paho 1.6 and 2.x, 3.1.1 and 5.0) stream 1,200 readings each at 300/s; the
    daemon is SIGKILLed 2 s in and started again. Each sensor is back at its next attempt (one CONNACK after
    the restart, no disconnect loop), every acknowledged reading reaches AWS IoT, and AWS IoT sees at most
    the readings in flight at the kill twice."""
    count, rate = 1200, 300
    obs = Observer(gw.stack, f"{THING}/sensors/#", gw.workdir / "obs-kill.txt", session="obs-kill")
    runs = {f"kill-{c}": stream(gw, f"kill-{c}", c, count, rate) for c in LOAD}
    try:
        time.sleep(2.0)
        killed_at = time.time()
        gw.kill()
        gw.start()
        ready_at = time.time()
        results = {name: run.result(90) for name, run in runs.items()}
        wait_until(lambda: request(gw.workdir / "control.sock", "status", None)["spool"]["messages"] == 0, 60,
                   "the spool to drain")  # fmt: skip
        dups = _check_everything_arrived(results, obs)
        in_flight = {name: in_flight_at(r, killed_at) for name, r in results.items()}
        for name, result in results.items():
            after = [c for c in result["connacks"] if c[0] > killed_at]
            assert len(after) == 1, f"{name}: {len(after)} CONNACKs after the restart (a reconnect loop?)"
            assert after[0][0] - ready_at < 5, f"{name}: back {after[0][0] - ready_at:.1f} s after READY"
            assert [d for d in result["disconnects"] if d[0] > after[0][0] and d[1] != 0] == []
        print(
            f"\nSIGKILL under load: in flight at the kill {dict(in_flight)}, "
            f"duplicates upstream {dict(dups)}, back after READY: "
            + ", ".join(
                f"{n} {min(c[0] for c in r['connacks'] if c[0] > killed_at) - ready_at:.2f}s"
                for n, r in results.items()
            )
        )
        # a duplicate is a reading the gateway had stored but not yet acknowledged to its sensor, or one
        # AWS IoT had received but whose PUBACK the spool had not recorded: at most both windows
        assert sum(dups.values()) <= sum(in_flight.values()) + UPLINK_INFLIGHT, (dups, in_flight)
        assert "receive maximum exceeded" not in gw.log()
    finally:
        _stop(runs, obs)


def test_hundreds_of_persistent_sensors_reconnect_at_once_after_a_sigkill(gw: GW) -> None:
    """A busy gateway restarted under load (as an `apt upgrade` does, but harder): 100 sensors on paho 1.6
    (3.1.1) and 100 on paho 2.x (5.0), persistent sessions, 60 readings each at 10/s; SIGKILL 2.5 s in.
    All 200 reconnect at once to the new daemon: each has exactly one CONNACK after the restart, every
    reading is acknowledged and upstream, duplicates stay within what was in flight."""
    count, rate, per_group = 60, 10, 100
    groups = {"crowd311": "paho1.6-311", "crowd5": "paho2-5"}
    certs = gw.workdir / "crowd-certs"
    certs.mkdir(exist_ok=True)
    for prefix in groups:
        for i in range(per_group):
            pki.write_client(gw.ca, certs, f"{prefix}-{i}")
    obs = Observer(gw.stack, f"{THING}/sensors/#", gw.workdir / "obs-crowd.txt", session="obs-crowd")
    runs = {
        prefix: stream(gw, prefix, client, count, rate, clients=per_group, cert_dir=certs)
        for prefix, client in groups.items()
    }
    try:
        time.sleep(2.5)
        killed_at = time.time()
        gw.kill()
        gw.start()
        ready_at = time.time()
        results: dict[str, dict[str, Any]] = {}
        for run in runs.values():
            results.update(run.result(120)["clients"])
        assert len(results) == 2 * per_group
        dups = _check_everything_arrived(results, obs)
        in_flight = {name: in_flight_at(r, killed_at) for name, r in results.items()}
        back = []
        for name, result in results.items():
            after = [c for c in result["connacks"] if c[0] > killed_at]
            assert len(after) == 1, f"{name}: {len(after)} CONNACKs after the restart (a reconnect loop?)"
            back.append(after[0][0] - ready_at)
        back.sort()
        print(
            f"\n200 sensors after a SIGKILL: back after READY median {back[len(back) // 2]:.2f} s, "
            f"last {back[-1]:.2f} s; in flight at the kill {sum(in_flight.values())}, "
            f"duplicates upstream {sum(dups.values())}"
        )
        assert back[-1] < 10, "every sensor back within 10 s of READY"
        assert sum(dups.values()) <= sum(in_flight.values()) + UPLINK_INFLIGHT, (dups, in_flight)
    finally:
        _stop(runs, obs)


def test_persistent_sensors_across_a_drop_of_their_own_network(gw: GW) -> None:
    """The sensors' connections are cut (a TCP proxy in between drops them) in the middle of a stream; the
    daemon stays up. Each sensor resumes its session (session present) at its next attempt; every reading
    arrives; duplicates are at most what was in flight at the cut."""
    count, rate = 1000, 250
    proxy = RecordingProxy(gw.port)
    obs = Observer(gw.stack, f"{THING}/sensors/#", gw.workdir / "obs-drop.txt", session="obs-drop")
    runs = {f"drop-{c}": stream(gw, f"drop-{c}", c, count, rate, port=proxy.port) for c in LOAD}
    try:
        time.sleep(2.0)
        cut_at = time.time()
        proxy.cut()
        results = {name: run.result(90) for name, run in runs.items()}
        dups = _check_everything_arrived(results, obs)
        in_flight = {name: in_flight_at(r, cut_at) for name, r in results.items()}
        for name, result in results.items():
            after = [c for c in result["connacks"] if c[0] > cut_at]
            assert len(after) == 1, f"{name}: {len(after)} CONNACKs after the cut (a reconnect loop?)"
            assert after[0][1] is True, f"{name}: the session was not resumed"
            assert dups[name] <= in_flight[name], (name, dups[name], in_flight[name])
        print(f"\nnetwork drop: in flight at the cut {dict(in_flight)}, duplicates upstream {dict(dups)}")
    finally:
        proxy.close()
        _stop(runs, obs)


def test_no_connection_outlives_its_sensor(gw: GW) -> None:
    """After every sensor of this module has disconnected (or been cut, or lost its daemon), the daemon
    holds no connection for any of them."""
    wait_until(
        lambda: not request(gw.workdir / "control.sock", "list-connections", None)["connections"], 10,
        "every connection to be gone",
    )  # fmt: skip


def test_the_running_daemon_holds_no_tpm_library(gw: GW) -> None:
    """The identity checks before each connection ran (the uplink is connected with the TPM-held key), yet
    neither tpm2-pytss nor the TSS libraries are in the daemon: they run in a short-lived helper process
    (service/upstream/tpmproc.py) and would otherwise keep 10-12 MB resident for good (issue 15)."""
    assert gw.daemon is not None
    wait_until(gw.connected, 30, "the uplink")
    maps = Path(f"/proc/{gw.daemon.pid}/maps").read_text()
    assert "libtss2" not in maps and "tpm2_pytss" not in maps
