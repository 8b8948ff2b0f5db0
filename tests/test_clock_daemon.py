"""Issue 16 on a live daemon: a gateway without a real-time clock boots 20 days behind, offline; NTP later
sets the clock forward, and a wrong clock is set back.

Real parts: the daemon and its uplink process (TPM key, mutual TLS), swtpm, the stand-in behind a proxy that
can take the network away, a paho sensor. The wall clock of the daemon and of every process it starts is moved
by gatewayd_dev/walltime.c (only CLOCK_REALTIME: monotonic clocks and sleeps stay real, as on a Pi); the
clock's synchronized state is a flag file (`[time] synchronized = PATH`), created when "NTP" has answered.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack
from gatewayd_dev.walltime import WallClock

from .conftest import REPO

DAY = 86400.0


class Clocked:
    def __init__(self, stack: DevStack, workdir: Path) -> None:
        self.stack, self.workdir = stack, workdir
        self.wall = WallClock(workdir / "walltime", offset=-20 * DAY)  # booted 20 days behind
        self.synced = workdir / "ntp-synchronized"  # absent: NTP has not answered yet
        self.proxy = RecordingProxy(stack.standin.endpoint("rsa").port)
        self.tables = standin_config(stack, workdir, "gw-clock", downstream={"auto_activate": True})
        self.tables["upstream"].update(port=self.proxy.port, reconnect_max_delay=2)
        self.tables["downstream"]["policy"] = {"publish": ["sensors/${iot:ClientId}/#"]}
        self.tables["time"] = {"synchronized": str(self.synced)}
        self.tables["spool"] = {"max_age": "30s"}  # the expiry sweep runs every 7.5 s
        self.tables["renewal"] = {"issuer": "command", "command": stack.standin.issue_command()}
        self.config = write_config(workdir / "g.toml", self.tables)
        provision(stack, self.config, days=365)  # renewal due at 67% of it: about 245 days from now
        self.ca = pki.make_root("Clock Sensor CA", "ecc")
        register_ca(self.config, self.ca, auto_registration=True)
        env = {**gateway_env(stack), **self.wall.env(), "PYTHONPATH": str(REPO)}
        self.daemon = Gateway(self.config, workdir, env=env)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = request(self.workdir / "control.sock", "status", None)
        return result

    def logged(self, message: logevents.Entry, after: int = 0, containing: str = "") -> list[str]:
        return [
            line
            for line in self.daemon.log()[after:].splitlines()
            if f"message_id={message.id}" in line and containing in line
        ]

    def wait_logged(self, message: logevents.Entry, after: int = 0, containing: str = "") -> str:
        wait_until(lambda: self.logged(message, after, containing), 15, f"{message.name} {containing}")
        return self.logged(message, after, containing)[0]

    def mark(self) -> int:
        return len(self.daemon.log())

    def sensor(self, name: str) -> Sensor:
        cert, key = pki.write_client(self.ca, self.workdir, name)
        port = int(self.tables["downstream"]["listener"][0]["port"])
        return Sensor(name, port, self.workdir / "state" / "localca" / "ca.pem", cert, key)

    def close(self) -> None:
        self.daemon.stop()
        self.proxy.close()


@pytest.fixture
def gw(devstack: DevStack, tmp_path: Path) -> Iterator[Clocked]:
    g = Clocked(devstack, tmp_path)
    try:
        g.daemon.wait_ready()
        yield g
    finally:
        g.close()


def test_a_gateway_booted_behind_loses_nothing_and_renews_nothing_by_a_wrong_clock(
    gw: Clocked, devstack: DevStack
) -> None:
    # Booted 20 days behind, not synchronized: the journal, STATUS= and `gatewayctl status` say so
    gw.wait_logged(logevents.CLOCK_UNSYNCHRONIZED)
    clock = gw.status()["clock"]
    assert clock["synchronized"] is False and clock["source"] == str(gw.synced)
    assert abs(time.time() - 20 * DAY - _epoch(clock["wallClock"])) < 60
    gw.daemon.notify.wait_for("STATUS", None)
    wait_until(
        lambda: any("clock not synchronized" in m.get("STATUS", "") for m in gw.daemon.notify.messages),
        10,
        "STATUS= naming the clock",
    )
    # The gateway's own certificate (made today) is "not valid before" by its clock: the uplink tries anyway,
    # and the stand-in's server certificate (made today too) fails verification: both reported as a likely
    # clock problem, not a certificate problem
    gw.wait_logged(logevents.CLOCK_SUSPECT, containing="own certificate")
    suspect = gw.wait_logged(logevents.CLOCK_SUSPECT, containing="certificate is not yet valid")
    assert (
        "the server's certificate is valid from" in suspect and "this gateway's clock says 2026-" in suspect
    )
    assert gw.status()["uplink"]["state"] != "connected"

    # Readings while offline: each acknowledged, on disk
    sensor = gw.sensor("clk-s1")
    sensor.connect()
    for n in range(20):
        sensor.publish("sensors/clk-s1/t", b"%d" % n, qos=1)
    assert gw.status()["spool"]["messages"] == 20

    # The network stays down (the proxy refuses); NTP sets the clock 20 days forward: one jump, logged once;
    # the next expiry sweeps (every 7.5 s with max_age 30 s) drop nothing, as the readings are seconds old
    gw.proxy.forward = False
    gw.proxy.cut()
    before = gw.mark()
    gw.wall.set(0.0)
    jumped = gw.wait_logged(logevents.CLOCK_JUMPED, before)
    assert "forward by 20.0 days" in jumped
    gw.wait_logged(logevents.LISTENER_CERT_REISSUED, before, containing="the clock jumped")
    time.sleep(9)
    assert len(gw.logged(logevents.CLOCK_JUMPED, before)) == 1
    assert gw.status()["spool"]["messages"] == 20
    assert not gw.logged(logevents.SPOOL_DROPPED, before)

    # A clock running 300 days ahead makes the renewal due by the clock: nothing starts while it is not
    # synchronized; status says it waits for the clock
    before = gw.mark()
    gw.wall.set(300 * DAY)
    gw.wait_logged(logevents.CLOCK_JUMPED, before, containing="forward by 300.0 days")
    wait_until(lambda: gw.status()["uplink"]["renewal"]["waitingForClock"], 15, "the renewal to wait")
    renewal = gw.status()["uplink"]["renewal"]
    assert renewal["step"] == "IDLE" and renewal["finishedSinceStart"] == 0
    assert not gw.logged(logevents.RENEWAL_STARTED)
    assert gw.status()["spool"]["messages"] == 20

    # ... and is set back: one jump back, nothing dropped, the listener certificate made again
    before = gw.mark()
    gw.wall.set(0.0)
    gw.wait_logged(logevents.CLOCK_JUMPED, before, containing="back by 300.0 days")
    gw.wait_logged(logevents.LISTENER_CERT_REISSUED, before, containing="the clock jumped")
    assert gw.status()["spool"]["messages"] == 20

    # The network comes back and NTP answers: synchronized, logged, the uplink connects at once and every
    # acknowledged reading arrives; the renewal is not due by the right clock
    observer = Observer(devstack, "gw-clock/sensors/#", gw.workdir / "obs.txt")
    try:
        before = gw.mark()
        gw.proxy.forward = True
        gw.synced.touch()
        gw.wait_logged(logevents.CLOCK_SYNCHRONIZED, before)
        wait_until(lambda: gw.status()["uplink"]["state"] == "connected", 15, "the uplink")
        lines = observer.wait(20, timeout=20)
    finally:
        observer.stop()
    assert sorted(int(line.split()[-1]) for line in lines) == list(range(20))
    status = gw.status()
    assert status["clock"]["synchronized"] is True and status["clock"]["jumps"] == 3
    assert status["uplink"]["renewal"]["waitingForClock"] is False
    assert status["uplink"]["renewal"]["step"] == "IDLE" and not gw.logged(logevents.RENEWAL_STARTED)
    assert not gw.logged(logevents.SPOOL_DROPPED)

    # A new sensor connection verifies the listener certificate made after the last jump
    late = gw.sensor("clk-s2")
    late.connect()
    late.publish("sensors/clk-s2/t", b"late", qos=1)
    sensor.stop()
    late.stop()


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
