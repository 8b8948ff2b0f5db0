"""Sensors with their own certificates, through the gateway's listener, to the AWS IoT stand-in and back.

Real parts: the daemon, its TPM-held uplink to the stand-in, mutual TLS on 127.0.0.1, paho-mqtt (3.1.1 and
5.0) and mosquitto_pub/mosquitto_sub as sensors.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import MQTT_311, Connack, Connect, Will
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.sensor import PAHO2, Sensor, wait_until
from gatewayd_dev.stack import DevStack

THING = "gw-down"


@dataclass
class Setup:
    stack: DevStack
    workdir: Path
    port: int
    sensor_ca: pki.Issued
    daemon: Gateway

    @property
    def local_ca(self) -> Path:
        return self.workdir / "state" / "localca" / "ca.pem"

    def cert(self, cn: str) -> tuple[Path, Path]:
        return pki.write_client(self.sensor_ca, self.workdir, cn)

    def sensor(self, cn: str, mqtt5: bool = False, client_id: str | None = None, **kw: Any) -> Sensor:
        cert, key = self.cert(cn)
        return Sensor(client_id or cn, self.port, self.local_ca, cert, key, mqtt5, **kw)

    def observe(self, topic: str) -> Observer:
        return Observer(self.stack, topic, self.workdir / f"obs-{time.monotonic_ns()}.txt")

    def ctl(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return request(self.workdir / "control.sock", command, args)


@pytest.fixture(scope="module")
def setup(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("downstream")
    sensor_ca = pki.make_root("Test Sensor CA", "ecc")
    # The sensor CA is registered with auto-registration, and auto_activate admits each new sensor at once
    # (the registry's own tests cover the other ways in).
    tables = standin_config(
        devstack, workdir, THING, downstream={"auto_activate": True, "connect_timeout": 2},
    )  # fmt: skip
    tables["downstream.policy"] = {
        "publish": ["sensors/${iot:ClientId}/#", "local/#", "$aws/rules/telemetry/${iot:ClientId}/#",
                    "$aws/things/${iot:ClientId}/shadow/#", "$aws/events/#"],
        "subscribe": ["commands/${iot:ClientId}/#", "commands/all/#", "local/#",
                      "$aws/things/${iot:ClientId}/shadow/update/accepted", "$aws/rules/#"],
    }  # fmt: skip
    config = write_config(workdir / "g.toml", tables)
    provision(devstack, config)
    daemon = Gateway(config, workdir, env=gateway_env(devstack))
    try:
        daemon.wait_ready()
        register_ca(config, sensor_ca, auto_registration=True)
        wait_until(
            lambda: request(workdir / "control.sock", "status")["uplink"]["state"] == "connected",
            20,
            "uplink",
        )
        port = tables["downstream"]["listener"][0]["port"]
        yield Setup(devstack, workdir, port, sensor_ca, daemon)
    finally:
        daemon.stop()


def _from_aws_until_received(setup: Setup, s: Sensor, topic: str, payload: str) -> None:
    """Publish at the stand-in until the sensor has a message (its upstream subscription may take a moment
    to be in place)."""
    port = str(setup.stack.standin.observer_port)
    deadline = time.monotonic() + 15
    while not s.received:
        assert time.monotonic() < deadline, f"nothing on {topic} reached the sensor"
        command = ["-t", topic, "-m", payload]
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", *command], check=True)
        time.sleep(0.3)


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5.0"])
def test_paho_sensor_reading_reaches_aws_and_command_comes_back(
    setup: Setup, sensors: Callable[[Sensor], Sensor], mqtt5: bool
) -> None:
    cid = f"paho-{'5' if mqtt5 else '311'}"
    obs = setup.observe(f"{THING}/sensors/{cid}/#")
    s = sensors(setup.sensor(cid, mqtt5))
    assert s.connect() == 0
    assert s.publish(f"sensors/{cid}/temperature", b"21.5", qos=1) == 0
    assert obs.wait()[0] == f"{THING}/sensors/{cid}/temperature 21.5"
    obs.stop()
    assert s.subscribe(f"commands/{cid}/#") == [1]
    _from_aws_until_received(setup, s, f"{THING}/commands/{cid}/reboot", "now")
    assert s.received[0][:2] == (f"commands/{cid}/reboot", b"now")


def test_reserved_topics_as_aws_iot_allows_them(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    """Issue 18, point 6: where the policy grants them, a sensor publishes to the reserved topics AWS IoT
    accepts from devices (Basic Ingest, its shadow), unmapped, and subscribes to its shadow's answers (made
    upstream, whatever the command filter); the others are refused with AWS IoT's reason, never sent up."""
    cid = "reserved-1"
    obs = setup.observe("$aws/#")
    try:
        s = sensors(setup.sensor(cid, mqtt5=True))
        assert s.connect() == 0
        assert s.publish(f"$aws/rules/telemetry/{cid}/t", b"ingest", qos=1) == 0
        assert s.publish(f"$aws/things/{cid}/shadow/update", b'{"state":{}}', qos=1) == 0
        for forged in ("$aws/events/presence/connected/x", f"$aws/things/{cid}/shadow/update/accepted"):
            code = s.publish(forged, b"forged", qos=1)
            if PAHO2:  # paho 1.6 does not report a PUBACK's reason code
                assert code == 0x90, forged  # Topic Name invalid
            assert f"published to {forged}: " in setup.daemon.log()
        got = obs.wait(2)
    finally:
        obs.stop()
    assert got == [
        f"$aws/rules/telemetry/{cid}/t ingest",
        f'$aws/things/{cid}/shadow/update {{"state":{{}}}}',
    ]
    assert s.subscribe("$aws/rules/telemetry/#") == [0x8F]  # AWS IoT lets nobody subscribe to Basic Ingest
    assert s.subscribe(f"$aws/things/{cid}/shadow/update/accepted") == [1]
    _from_aws_until_received(setup, s, f"$aws/things/{cid}/shadow/update/accepted", "ok")
    assert s.received[0][:2] == (f"$aws/things/{cid}/shadow/update/accepted", b"ok")


def test_mosquitto_clients_as_sensors(setup: Setup) -> None:
    cert, key = setup.cert("mosq-1")
    tls = [
        "--cafile",
        str(setup.local_ca),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-h",
        "127.0.0.1",
        "-p",
        str(setup.port),
    ]
    sub = subprocess.Popen(
        ["mosquitto_sub", *tls, "-i", "mosq-1", "-t", "local/room1/#", "-C", "1", "-W", "15", "-v"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)
    obs = setup.observe(f"{THING}/local/#")
    cert2, key2 = setup.cert("mosq-2")
    tls2 = [
        "--cafile",
        str(setup.local_ca),
        "--cert",
        str(cert2),
        "--key",
        str(key2),
        "-h",
        "127.0.0.1",
        "-p",
        str(setup.port),
    ]
    pub = subprocess.run(
        ["mosquitto_pub", *tls2, "-i", "mosq-2", "-q", "1", "-t", "local/room1/lux", "-m", "300"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert pub.returncode == 0, pub.stderr
    out, _ = sub.communicate(timeout=20)
    assert out.strip() == "local/room1/lux 300"  # sensor to sensor, locally
    assert obs.wait()[0] == f"{THING}/local/room1/lux 300"  # and upstream
    obs.stop()


def test_denied_publish_and_subscribe(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    s5 = sensors(setup.sensor("deny-5", mqtt5=True))
    assert s5.connect() == 0
    code = s5.publish("sensors/someone-else/t", b"x", qos=1)
    if PAHO2:  # paho 1.6 does not pass PUBACK reason codes to the application
        assert code == 0x87
    assert s5.subscribe("commands/#") == [0x87]
    s3 = sensors(setup.sensor("deny-311"))
    assert s3.connect() == 0
    assert s3.publish("sensors/someone-else/t", b"x", qos=1) == 0  # 3.1.1: acknowledged and dropped
    assert s3.subscribe("commands/#") == [0x80]
    log = setup.daemon.log()
    assert "sensor deny-311 may not publish to sensors/someone-else/t: dropped" in log
    assert "sensor deny-5 may not subscribe to commands/#" in log


def test_client_id_must_match_the_certificate(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    raw = _raw_tls(setup, "real-cn")
    raw.sendall(encode(Connect("impostor", MQTT_311), MQTT_311))
    (connack,) = Decoder(MQTT_311).feed(raw.recv(4))
    assert connack == Connack(False, 2)  # 3.1.1 on the wire: identifier rejected
    assert raw.recv(10) == b""
    s5 = sensors(setup.sensor("real-cn5", mqtt5=True, client_id="impostor5"))
    assert s5.connect() == 0x85
    assert "client id 'impostor' is not the certificate CN" in setup.daemon.log()


def test_unknown_ca_is_refused_at_tls(setup: Setup) -> None:
    stranger = pki.make_client(pki.make_root("Other CA", "ecc"), "stranger")
    cert = pki.write(setup.workdir / "stranger.pem", stranger.cert_pem())
    key = pki.write(setup.workdir / "stranger.key", stranger.key_pem())
    with pytest.raises((ssl.SSLError, OSError, TimeoutError)):
        s = Sensor("stranger", setup.port, setup.local_ca, cert, key)
        try:
            if s.connect(timeout=3) != 0:
                raise ssl.SSLError("refused")
        finally:
            s.client.loop_stop()


def test_takeover_closes_the_older_connection(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    first = sensors(setup.sensor("twin", mqtt5=True))
    assert first.connect() == 0
    second = sensors(setup.sensor("twin", mqtt5=True))
    assert second.connect() == 0
    wait_until(lambda: bool(first.disconnects), 10, "the first connection to be closed")
    if PAHO2:
        assert first.disconnects[0] == 0x8E  # Session taken over
    conns = [c for c in setup.ctl("list-connections")["connections"] if c["clientId"] == "twin"]
    assert len(conns) == 1


def _raw_tls(setup: Setup, cn: str) -> ssl.SSLSocket:
    cert, key = setup.cert(cn)
    ctx = ssl.create_default_context(cafile=str(setup.local_ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", setup.port), timeout=10), server_hostname="127.0.0.1"
    )


def test_will_is_published_when_a_sensor_vanishes(setup: Setup) -> None:
    obs = setup.observe(f"{THING}/sensors/ghost/status")
    sock = _raw_tls(setup, "ghost")
    sock.sendall(
        encode(Connect("ghost", MQTT_311, will=Will("sensors/ghost/status", b"offline", 1)), MQTT_311)
    )
    assert Decoder(MQTT_311).feed(sock.recv(4))  # CONNACK
    sock.close()  # no DISCONNECT: the will goes out
    assert obs.wait()[0] == f"{THING}/sensors/ghost/status offline"
    obs.stop()


def test_qos2_from_a_sensor_arrives_upstream_as_qos1(
    setup: Setup, sensors: Callable[[Sensor], Sensor]
) -> None:
    obs = setup.observe(f"{THING}/sensors/q2/#")
    s = sensors(setup.sensor("q2", mqtt5=True))
    assert s.connect() == 0
    assert s.publish("sensors/q2/event", b"once", qos=2) == 0  # PUBREC, PUBREL, PUBCOMP completed
    assert obs.wait()[0] == f"{THING}/sensors/q2/event once"
    obs.stop()


def test_topic_aws_would_refuse_is_refused_at_ingress(
    setup: Setup, sensors: Callable[[Sensor], Sensor]
) -> None:
    s = sensors(setup.sensor("deep", mqtt5=True))
    assert s.connect() == 0
    code = s.publish("sensors/deep/a/b/c/d/e/f", b"x", qos=1)  # 8 slashes after the thing-name prefix
    if PAHO2:
        assert code == 0x90
    assert "more than 7 slashes" in setup.daemon.log()


def test_isolation_silent_and_oversized_clients(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    silent = _raw_tls(setup, "silent")  # never sends CONNECT
    t0 = time.monotonic()
    assert silent.recv(10) == b""  # closed by the gateway after connect_timeout (2 s here)
    assert 1.5 < time.monotonic() - t0 < 6
    big = _raw_tls(setup, "big")
    big.sendall(encode(Connect("big", MQTT_311), MQTT_311))
    big.recv(4)
    big.sendall(b"\x30\xff\xff\xff\x7f")  # announces a 256 MiB PUBLISH
    assert big.recv(10) == b""  # closed at once, nothing buffered
    s = sensors(setup.sensor("bystander"))
    assert s.connect() == 0 and s.publish("sensors/bystander/t", b"ok") == 0  # others unaffected


def test_list_connections_and_disconnect(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    s = sensors(setup.sensor("listed"))
    assert s.connect() == 0
    s.publish("sensors/listed/t", b"1")
    (conn,) = [c for c in setup.ctl("list-connections")["connections"] if c["clientId"] == "listed"]
    assert conn["commonName"] == "listed" and len(conn["certificateId"]) == 64
    assert conn["address"].startswith("127.0.0.1:") and conn["messagesIn"] >= 1 and conn["bytesIn"] > 0
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--socket",
         str(setup.workdir / "control.sock"), "disconnect", "--client-id", "listed"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and json.loads(result.stdout) == {"disconnected": "listed"}
    wait_until(lambda: bool(s.disconnects), 10, "disconnect")
    missing = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--socket", str(setup.workdir / "control.sock"),
         "disconnect", "--client-id", "nobody"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 1 and "no sensor connected with client id 'nobody'" in missing.stderr


def test_aws_iot_device_sdk_sensor(setup: Setup) -> None:
    """The AWS IoT Device SDK v2 works against the gateway as against AWS IoT Core."""
    from .conftest import REPO

    cert, key = setup.cert("sdk-1")
    obs = setup.observe(f"{THING}/sensors/sdk-1/#")
    # The SDK is a PyPI-only package: it runs from the dev venv even when the suite runs on Debian's Python.
    venv_python = str(REPO / ".venv" / "bin" / "python")
    argv = ["127.0.0.1", str(setup.port), str(setup.local_ca), str(cert), str(key), "sdk-1"]
    sdk = subprocess.Popen(
        [venv_python, "-m", "gatewayd_dev.aws_sensor", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert sdk.stdout is not None
        ready = json.loads(sdk.stdout.readline() or "{}")
        assert ready.get("event") == "ready", sdk.stderr.read() if sdk.stderr else ""
        assert obs.wait()[0] == f"{THING}/sensors/sdk-1/temperature 19.0"
        port = str(setup.stack.standin.observer_port)
        command = ["-t", f"{THING}/commands/sdk-1/blink", "-m", "twice"]
        deadline = time.monotonic() + 15
        out = ""
        while sdk.poll() is None and time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", *command], check=True)
            time.sleep(0.5)
        out = sdk.stdout.readline()
        assert json.loads(out)["commands"][0] == "commands/sdk-1/blink twice"
    finally:
        obs.stop()
        if sdk.poll() is None:
            sdk.kill()
        sdk.wait()


def test_retained_messages_for_local_subscribers(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    a = sensors(setup.sensor("ret-a"))
    assert a.connect() == 0
    info = a.client.publish("local/ret/setpoint", b"22", qos=1, retain=True)
    wait_until(lambda: info.mid in a.acks, 10, "PUBACK")
    b = sensors(setup.sensor("ret-b"))
    assert b.connect() == 0
    assert b.subscribe("local/ret/#") == [1]
    wait_until(lambda: bool(b.received), 10, "the retained message")
    assert b.received[0][:2] == ("local/ret/setpoint", b"22")


def test_persistent_session_gets_commands_sent_while_away(
    setup: Setup, sensors: Callable[[Sensor], Sensor]
) -> None:
    p = sensors(setup.sensor("persist", clean=False))
    assert p.connect() == 0
    assert p.subscribe("commands/persist/#") == [1]
    p.stop()
    time.sleep(0.5)
    port = str(setup.stack.standin.observer_port)
    command = ["-t", f"{THING}/commands/persist/update", "-m", "v2"]
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", *command], check=True)
    time.sleep(0.5)
    again = sensors(setup.sensor("persist", clean=False))
    assert again.connect() == 0
    wait_until(lambda: bool(again.received), 10, "the command kept for the session")
    assert again.received[0][:2] == ("commands/persist/update", b"v2")


def test_upstream_subscriptions_are_shared_and_counted(
    setup: Setup, sensors: Callable[[Sensor], Sensor]
) -> None:
    a, b = sensors(setup.sensor("share-a")), sensors(setup.sensor("share-b"))
    assert a.connect() == 0 and b.connect() == 0
    assert a.subscribe("commands/all/#") == [1] and b.subscribe("commands/all/#") == [1]
    assert setup.ctl("status")["upstreamSubscriptions"][f"{THING}/commands/all/#"] == 2
    a.client.unsubscribe("commands/all/#")
    wait_until(
        lambda: setup.ctl("status")["upstreamSubscriptions"].get(f"{THING}/commands/all/#") == 1, 10, "unref"
    )
    b.stop()  # a clean session ends with its connection: its subscriptions go too
    wait_until(
        lambda: f"{THING}/commands/all/#" not in setup.ctl("status")["upstreamSubscriptions"], 10, "unsub"
    )


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_sensor_that_does_not_read_cannot_grow_gateway_memory(
    setup: Setup, sensors: Callable[[Sensor], Sensor]
) -> None:
    reader = _raw_tls(setup, "nonreader")
    reader.sendall(encode(Connect("nonreader", MQTT_311), MQTT_311))
    reader.recv(4)
    from gatewayd.core.mqtt.packets import Subscribe, Subscription

    reader.sendall(encode(Subscribe(1, (Subscription("local/flood/#", 1),)), MQTT_311))
    reader.recv(5)  # SUBACK; from now on this sensor reads nothing
    before = _rss_kb(setup.daemon.pid)
    flooder = sensors(setup.sensor("flooder"))
    assert flooder.connect() == 0
    chunk = b"x" * 60_000
    for _ in range(300):  # 18 MB for a sensor whose queue holds 1 MiB
        flooder.client.publish("local/flood/data", chunk, qos=0)
    wait_until(lambda: flooder.client.want_write() is False, 30, "the flood to be sent")
    time.sleep(1.0)
    grown = _rss_kb(setup.daemon.pid) - before
    assert grown < 30_000, f"gateway RSS grew by {grown} kB"
    status = setup.ctl("status")
    gone = "nonreader" not in [c["clientId"] for c in setup.ctl("list-connections")["connections"]]
    assert gone or status["droppedForSensors"] > 0
    bystander = sensors(setup.sensor("calm"))
    assert bystander.connect() == 0 and bystander.publish("sensors/calm/t", b"fine") == 0
    reader.close()


def test_policy_changes_apply_on_reload(setup: Setup, sensors: Callable[[Sensor], Sensor]) -> None:
    import signal

    s = sensors(setup.sensor("reload-me", mqtt5=True))
    assert s.connect() == 0
    config = setup.workdir / "g.toml"
    original = config.read_text()
    try:
        text = original.replace(
            "[downstream.policy]\n", '[downstream.policy]\ndeny_publish = ["sensors/+/secret"]\n'
        )
        config.write_text(text)
        mark = len(setup.daemon.notify.messages)
        setup.daemon.signal(signal.SIGHUP)
        setup.daemon.notify.wait_for("READY", "1", after=mark)
        log_before = setup.daemon.log()
        code = s.publish("sensors/reload-me/secret", b"x")
        if PAHO2:
            assert code == 0x87
        wait_until(
            lambda: "may not publish to sensors/reload-me/secret" in setup.daemon.log(), 10, "the denial"
        )
        assert "may not publish to sensors/reload-me/secret" not in log_before
    finally:
        config.write_text(original)
        mark = len(setup.daemon.notify.messages)
        setup.daemon.signal(signal.SIGHUP)
        setup.daemon.notify.wait_for("READY", "1", after=mark)


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5.0"])
def test_qos2_to_a_sensor(setup: Setup, sensors: Callable[[Sensor], Sensor], mqtt5: bool) -> None:
    tag = "5" if mqtt5 else "3"
    receiver = sensors(setup.sensor(f"q2-rx-{tag}", mqtt5))
    assert receiver.connect() == 0
    assert receiver.subscribe(f"local/q2-{tag}/#", qos=2) == [2]
    sender = sensors(setup.sensor(f"q2-tx-{tag}", mqtt5))
    assert sender.connect() == 0
    assert sender.publish(f"local/q2-{tag}/x", b"exactly once", qos=2) == 0
    wait_until(lambda: bool(receiver.received), 10, "the QoS 2 message")
    time.sleep(0.5)  # a duplicate would arrive now
    assert receiver.received == [(f"local/q2-{tag}/x", b"exactly once", 2)]


def test_unix_socket_listener(devstack: DevStack, tmp_path: Path) -> None:
    import os
    import stat

    sock_path = tmp_path / "sensors.sock"
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # a socket file left behind by a crashed run
    stale.close()
    listener = {"address": f"unix:{sock_path}", "tls": False, "require_client_cert": False}
    config = write_config(
        tmp_path / "g.toml",
        standin_config(devstack, tmp_path, "gw-unix", downstream={"listener": [listener]}),
    )
    daemon = Gateway(config, tmp_path, env=gateway_env(devstack))
    try:
        daemon.wait_ready()
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock_path))
        client.sendall(encode(Connect("local-proc", MQTT_311), MQTT_311))
        assert Decoder(MQTT_311).feed(client.recv(4)) == [Connack(False, 0)]
        client.close()
    finally:
        daemon.stop()
