"""Hardware events (issue 9): real udev events from a umockdev testbed reach the running daemon's pyudev.

Real parts: the daemon (with umockdev's preload library, so its libudev sees the testbed's sysfs and events),
swtpm, the stand-in, paho as a network sensor, mosquitto_sub as the observer upstream, a pseudo-terminal pair
as the serial line. Mocked: only the sysfs/udev view of the devices (the TPM's node is a name udev announces;
TPM commands still go to swtpm).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import (
    Gateway,
    gateway_env,
    gatewayctl,
    provision,
    register_ca,
    standin_config,
    write_config,
)
from gatewayd_dev.observer import Observer
from gatewayd_dev.reconnect import reaction, wait_for_long_backoff
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack
from gatewayd_dev.udevbed import UdevBed

from .conftest import REPO

# A node no machine has, so "absent" holds even where a real TPM exists (the daemon also trusts the node).
TPM_NODE = "/dev/tpmrm7"
FTDI = {"ID_VENDOR_ID": "0403", "ID_MODEL_ID": "6001", "ID_SERIAL": "FTDI_FT232R_A10K1234"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = DevStack(tmp_path_factory.mktemp("hw-stack")).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sensor_ca() -> pki.Issued:
    return pki.make_root("Hardware Sensor CA", "ecc")


@pytest.fixture
def bed() -> Iterator[UdevBed]:
    b = UdevBed()
    try:
        yield b
    finally:
        b.close()


@dataclass
class GW:
    stack: DevStack
    bed: UdevBed
    workdir: Path
    config: Path
    tables: dict[str, Any]
    ca: pki.Issued
    daemon: Gateway | None = None
    sensors: list[Sensor] = field(default_factory=list)

    def start(self) -> Gateway:
        env = {**gateway_env(self.stack), **self.bed.env(), "PYTHONPATH": str(REPO)}
        self.daemon = Gateway(self.config, self.workdir, env=env)
        self.daemon.wait_ready()
        return self.daemon

    def ctl(self, command: str = "status", args: dict[str, Any] | None = None) -> Any:
        return request(self.workdir / "control.sock", command, args)

    def uplink(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl()["uplink"]
        return result

    def log(self) -> str:
        assert self.daemon is not None
        return self.daemon.log()

    def sensor(self, name: str) -> Sensor:
        issued = pki.make_client(self.ca, name)
        cert = pki.write(self.workdir / f"{name}.pem", issued.cert_pem())
        key = pki.write(self.workdir / f"{name}.key", issued.key_pem(), 0o600)
        port = int(self.tables["downstream"]["listener"][0]["port"])
        s = Sensor(name, port, self.workdir / "state" / "localca" / "ca.pem", cert, key)
        self.sensors.append(s)
        return s

    def serial(self) -> list[dict[str, Any]]:
        return [c for c in self.ctl("list-connections")["connections"] if c["transport"] == "serial"]

    def stop(self) -> None:
        for s in self.sensors:
            s.stop()
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def make_gw(
    stack: DevStack, bed: UdevBed, sensor_ca: pki.Issued, tmp_path: Path
) -> Iterator[Callable[..., GW]]:
    made: list[GW] = []

    def make(thing: str, start: bool = True, **sections: Any) -> GW:
        sections["downstream"] = {"auto_activate": True, **sections.get("downstream", {})}
        tables = standin_config(stack, tmp_path, thing, **sections)
        tables["downstream"]["policy"] = {"publish": ["sensors/${iot:ClientId}/#"]}
        config = write_config(tmp_path / "g.toml", tables)
        provision(stack, config)
        register_ca(config, sensor_ca, auto_registration=True)
        gw = GW(stack, bed, tmp_path, config, tables, sensor_ca)
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in made:
        gw.stop()


def _elapsed(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` holds (polled every 20 ms)."""
    start = time.monotonic()
    wait_until(check, timeout, what)
    return time.monotonic() - start


# ---------------------------------------------------------------- the TPM


def test_tpm_absent_at_start_then_announced(
    make_gw: Callable[..., GW], stack: DevStack, bed: UdevBed
) -> None:
    """No TPM device at start: the daemon is ready, serves and spools a sensor, says "waiting for TPM" in
    its status, STATUS= and journal; the moment udev announces the device, it connects and delivers."""
    gw = make_gw("gw-latetpm", identity={"tpm_device": TPM_NODE})
    up = gw.uplink()
    assert up["state"] == "waiting-for-tpm" and up["lastError"].startswith("waiting for TPM"), up
    assert TPM_NODE in up["lastError"] and up["connectAttempts"] == 0
    hw = gw.ctl()["hardware"]
    assert (
        hw["tpmDevice"] == TPM_NODE and hw["tpmPresent"] is False and hw["udevEvents"] and hw["netlinkEvents"]
    )
    assert gw.daemon is not None
    notify = gw.daemon.notify
    wait_until(
        lambda: any("waiting for TPM" in m.get("STATUS", "") for m in notify.poll()),
        10,
        "STATUS= waiting for TPM",
    )
    assert logevents.UPLINK_BLOCKED.id in gw.log() and "waiting for TPM" in gw.log()
    obs = Observer(stack, "gw-latetpm/sensors/#", gw.workdir / "obs.txt")
    try:
        s = gw.sensor("early")
        assert s.connect() == 0
        assert s.publish("sensors/early/t", b"before the TPM", qos=1) == 0  # PUBACK: stored in the spool
        assert gw.ctl()["spool"]["messages"] == 1
        time.sleep(1.0)
        assert gw.uplink()["state"] == "waiting-for-tpm" and obs.lines() == []
        bed.add("tpmrm", "tpmrm7", props={"DEVNAME": TPM_NODE, "MAJOR": "253", "MINOR": "65543"})
        took = _elapsed(lambda: gw.uplink()["state"] != "waiting-for-tpm", 5, "the uplink to leave waiting")
        print(f"\nTPM announced -> uplink acting: {took * 1000:.0f} ms")
        assert took < 1.0
        wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink")
        assert obs.wait(1)[0].endswith("before the TPM")
        assert logevents.TPM_ARRIVED.id in gw.log() and gw.ctl()["hardware"]["tpmPresent"] is True
    finally:
        obs.stop()


def test_tpm_removed_stops_the_uplink_cleanly_and_returned_resumes(
    make_gw: Callable[..., GW], stack: DevStack, bed: UdevBed
) -> None:
    tpm = bed.add("tpmrm", "tpmrm7", props={"DEVNAME": TPM_NODE})
    gw = make_gw("gw-tpmgone", identity={"tpm_device": TPM_NODE})
    wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink")
    standin_log = stack.standin.workdir / "mosquitto.log"
    bed.remove(tpm)
    took = _elapsed(lambda: gw.uplink()["state"] == "waiting-for-tpm", 5, "waiting for TPM")
    print(f"\nTPM removed -> uplink stopped: {took * 1000:.0f} ms")
    assert took < 1.0
    assert (
        logevents.TPM_REMOVED.id in gw.log() and "disconnected from AWS IoT to wait for the TPM" in gw.log()
    )
    # cleanly: the stand-in saw an MQTT DISCONNECT, not a connection that just broke
    wait_until(lambda: "gw-tpmgone disconnected" in standin_log.read_text(), 5, "the DISCONNECT")
    assert "Client gw-tpmgone closed its connection" not in standin_log.read_text()
    attempts = gw.uplink()["connectAttempts"]
    time.sleep(1.5)
    assert gw.uplink()["connectAttempts"] == attempts and gw.uplink()["state"] == "waiting-for-tpm"
    s = gw.sensor("meanwhile")
    assert s.connect() == 0 and s.publish("sensors/meanwhile/t", b"spooled", qos=1) == 0
    obs = Observer(stack, "gw-tpmgone/sensors/#", gw.workdir / "obs.txt")
    try:
        tpm = bed.add("tpmrm", "tpmrm7", props={"DEVNAME": TPM_NODE})
        wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink after the TPM returned")
        assert obs.wait(1)[0].endswith("spooled")
    finally:
        obs.stop()


# ---------------------------------------------------------------- the network


def test_interface_event_makes_the_waiting_uplink_connect_at_once(
    make_gw: Callable[..., GW], stack: DevStack, bed: UdevBed
) -> None:
    """The stand-in is away long enough for the backoff to grow; once it is back, the uplink would wait for
    its next attempt, but a network interface appearing makes it try at once. A burst of events never makes
    more than one CONNECT a second."""
    gw = make_gw("gw-netup")
    wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink")
    stack.standin.stop()
    try:
        wait_for_long_backoff(gw.uplink, 4)
        before = gw.uplink()["connectAttempts"]
        for i in range(10):  # a burst: 10 events in half a second
            bed.add("net", f"wlan{i}", props={"INTERFACE": f"wlan{i}", "IFINDEX": str(100 + i)})
            time.sleep(0.05)
        time.sleep(1.6)
        burst = gw.uplink()["connectAttempts"] - before
        print(f"\nCONNECT attempts during 10 interface events in 0.5 s (+1.6 s): {burst}")
        assert 1 <= burst <= 3, burst  # at once, then at most one a second
        wait_for_long_backoff(gw.uplink, 4)  # again, for the measurement below
    finally:
        stack.standin.start()
    time.sleep(1.0)  # the last attempt is a second old: the one-per-second rule does not delay the next
    r = reaction(gw.uplink, lambda: bed.add("net", "eth9", props={"INTERFACE": "eth9", "IFINDEX": "99"}))
    print("\n" + r.describe("interface added"))
    assert r.attempt < 1.0 and r.connected < r.backoff_left - 1
    assert logevents.NETWORK_CHANGED.id in gw.log() and "interface eth9 add" in gw.log()
    last = gw.ctl()["hardware"]["lastNetworkChange"]
    assert last["reason"] == "interface eth9 add" and "127.0.0.1" in last["addresses"], last


# ---------------------------------------------------------------- serial sensors


def test_serial_sensor_plugged_publishes_records_and_unplugged_closes(
    make_gw: Callable[..., GW], stack: DevStack, bed: UdevBed
) -> None:
    rule = {"match": FTDI, "client_id": "soil-1", "topic": "sensors/soil-1/telemetry", "format": "json",
            "max_record_bytes": 64, "baudrate": 115200}  # fmt: skip
    gw = make_gw("gw-serial", downstream={"serial": [rule]})
    wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink")
    obs = Observer(stack, "gw-serial/sensors/#", gw.workdir / "obs.txt")
    master, slave = os.openpty()
    other_master, other_slave = os.openpty()
    try:
        # a tty that matches no rule is left alone
        bed.add("tty", "ttyUSB1", props={"DEVNAME": os.ttyname(other_slave), "ID_VENDOR_ID": "1a86",
                                         "ID_MODEL_ID": "7523"})  # fmt: skip
        tty = bed.add("tty", "ttyUSB0", props={"DEVNAME": os.ttyname(slave), **FTDI})
        took = _elapsed(lambda: len(gw.serial()) == 1, 5, "the serial sensor")
        print(f"\nserial sensor plugged -> open: {took * 1000:.0f} ms")
        assert took < 1.0
        (conn,) = gw.serial()
        assert conn["clientId"] == "soil-1" and conn["device"] == os.ttyname(slave), conn
        assert conn["rule"] == "downstream.serial[0]"
        assert logevents.SERIAL_OPENED.id in gw.log() and "ttyUSB1" not in gw.log()
        os.write(master, b'{"moisture": 31}\n')
        os.write(master, b"garbage that is not json\n")
        os.write(master, b'{"pad": "' + b"x" * 100 + b'"}\n')  # longer than max_record_bytes
        os.write(master, b'{"moisture": 32}\r\n\n')
        os.write(master, b'{"moist')  # split across writes
        time.sleep(0.2)
        os.write(master, b'ure": 33}\n')
        lines = obs.wait(3)
        assert [line.split(" ", 1)[1] for line in lines] == [
            '{"moisture": 31}',
            '{"moisture": 32}',
            '{"moisture": 33}',
        ], lines
        assert all(line.startswith("gw-serial/sensors/soil-1/telemetry ") for line in lines)
        log = gw.log()
        assert logevents.SERIAL_RECORD_DROPPED.id in log and "not JSON" in log
        wait_until(lambda: gw.serial()[0]["dropped"] == 2, 15, "two dropped records")
        assert gw.serial()[0]["messagesIn"] == 3
        bed.remove(tty)
        took = _elapsed(lambda: gw.serial() == [], 5, "the serial sensor to close")
        print(f"serial sensor unplugged -> closed: {took * 1000:.0f} ms")
        assert took < 1.0
        assert logevents.SERIAL_CLOSED.id in gw.log() and "unplugged" in gw.log()
        assert gw.ctl()["uplink"]["state"] == "connected"  # nothing else was disturbed
    finally:
        obs.stop()
        for fd in (master, slave, other_master, other_slave):
            os.close(fd)


def test_serial_sensor_as_a_registry_certificate_follows_its_status(
    make_gw: Callable[..., GW], stack: DevStack, bed: UdevBed, sensor_ca: pki.Issued
) -> None:
    """A rule naming a registry certificate: records are published as its CN while it is ACTIVE and dropped
    while it is INACTIVE; a serial device present before the daemon starts is opened at start."""
    gw = make_gw("gw-serialcert", start=False)
    issued = pki.make_client(sensor_ca, "probe-7")
    pem = pki.write(gw.workdir / "probe-7.pem", issued.cert_pem())
    cid = gatewayctl(gw.config, "register-certificate", "--certificate-pem", str(pem), "--set-as-active")[
        "certificateId"
    ]
    rule = {"match": {"ID_SERIAL": "probe-7"}, "certificate_id": cid, "topic": "sensors/${iot:ClientId}/r",
            "format": "raw"}  # fmt: skip
    gw.tables["downstream"]["serial"] = [rule]
    write_config(gw.config, gw.tables)
    master, slave = os.openpty()
    obs = Observer(stack, "gw-serialcert/sensors/#", gw.workdir / "obs.txt")
    try:
        bed.add("tty", "ttyACM0", props={"DEVNAME": os.ttyname(slave), "ID_SERIAL": "probe-7"})
        gw.start()
        wait_until(lambda: gw.uplink()["state"] == "connected", 15, "the uplink")
        (conn,) = gw.serial()
        assert conn["clientId"] == "probe-7" and conn["certificateId"] == cid and conn["admitted"]
        os.write(master, b"raw reading 1\n")
        assert obs.wait(1) == ["gw-serialcert/sensors/probe-7/r raw reading 1"]  # as the certificate's CN
        gatewayctl(gw.config, "update-certificate", "--certificate-id", cid, "--new-status", "INACTIVE")
        assert gw.serial()[0]["admitted"] is False
        os.write(master, b"raw reading 2\n")
        wait_until(lambda: gw.serial()[0]["dropped"] == 1, 5, "the record dropped")
        gatewayctl(gw.config, "update-certificate", "--certificate-id", cid, "--new-status", "ACTIVE")
        os.write(master, b"raw reading 3\n")
        lines = obs.wait(2)
        assert [line.split(" ", 1)[1] for line in lines] == ["raw reading 1", "raw reading 3"], lines
    finally:
        obs.stop()
        os.close(master)
        os.close(slave)
