"""Link and address changes (issue 9), run by tests/test_network.py inside a network namespace of its own
(`unshare --net`), where these tests may add and remove interfaces and addresses freely.

Real parts: the daemon, swtpm, the stand-in (all inside the namespace), a veth pair, `ip` for the changes
(the kernel sends the rtnetlink events), mosquitto_pub and paho as sensors.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gatewayd.core import logevents
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.reconnect import reaction, wait_for_long_backoff
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack

REPO = Path(__file__).resolve().parents[2]
UPLINK_ADDRESS = "10.77.0.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10)


@pytest.fixture(scope="module", autouse=True)
def own_namespace() -> Iterator[None]:
    """Refuse to change the host's network: these tests run only in a namespace made for them."""
    if os.environ.get("GATEWAYD_NETNS") != "1" or os.stat("/proc/self/ns/net").st_ino == _init_netns():
        pytest.fail(
            "run through tests/test_network.py (unshare --net), never in the host's network namespace"
        )
    ip("link", "add", "gw0", "type", "veth", "peer", "name", "gw1")
    ip("link", "set", "gw0", "up")
    ip("link", "set", "gw1", "up")
    ip("addr", "add", f"{UPLINK_ADDRESS}/24", "dev", "gw0")
    yield
    ip("link", "del", "gw0")


def _init_netns() -> int | None:
    try:
        return os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return None  # not readable without root: the environment variable must do


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = DevStack(tmp_path_factory.mktemp("netns-stack")).start()
    try:
        yield s
    finally:
        s.stop()


class GW:
    def __init__(self, stack: DevStack, workdir: Path, config: Path, tables: dict[str, Any]) -> None:
        env = {**gateway_env(stack), "PYTHONPATH": str(REPO)}
        self.workdir, self.tables = workdir, tables
        self.daemon = Gateway(config, workdir, env=env)
        self.daemon.wait_ready()

    def ctl(self, command: str = "status") -> Any:
        return request(self.workdir / "control.sock", command, None)

    def uplink(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl()["uplink"]
        return result

    def log(self) -> str:
        return self.daemon.log()


@pytest.fixture
def make_gw(stack: DevStack, tmp_path: Path) -> Iterator[Callable[..., GW]]:
    made: list[GW] = []

    def make(thing: str, **sections: Any) -> GW:
        tables = standin_config(stack, tmp_path, thing, **sections)
        config = write_config(tmp_path / "g.toml", tables)
        provision(stack, config)
        gw = GW(stack, tmp_path, config, tables)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.daemon.stop()


def test_address_gone_drops_the_connection_and_its_return_reconnects_at_once(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    proxy = RecordingProxy(stack.standin.endpoint("rsa").port, host=UPLINK_ADDRESS)
    try:
        gw = make_gw("gw-addr", upstream={"port": proxy.port, "connect_address": UPLINK_ADDRESS})
        wait_until(lambda: gw.uplink()["state"] == "connected", 20, "the uplink")
        start = time.monotonic()
        ip("addr", "del", f"{UPLINK_ADDRESS}/24", "dev", "gw0")
        wait_until(lambda: gw.uplink()["state"] != "connected", 5, "the uplink to drop the dead connection")
        took = time.monotonic() - start
        print(f"\naddress removed -> connection dropped: {took * 1000:.0f} ms")
        assert took < 1.0
        assert f"the local address {UPLINK_ADDRESS} is gone" in gw.log()
        assert logevents.NETWORK_CHANGED.id in gw.log()
        wait_for_long_backoff(gw.uplink, 4)
        time.sleep(1.0)  # the one-per-second rule is not what this measures
        r = reaction(gw.uplink, lambda: ip("addr", "add", f"{UPLINK_ADDRESS}/24", "dev", "gw0"))
        print(r.describe("address back"))
        assert r.attempt < 1.0 and r.connected < r.backoff_left - 1
    finally:
        proxy.close()


def test_link_up_makes_the_waiting_uplink_connect_at_once_and_leaves_a_connection_alone(
    make_gw: Callable[..., GW], stack: DevStack
) -> None:
    proxy = RecordingProxy(stack.standin.endpoint("rsa").port, host=UPLINK_ADDRESS)
    try:
        gw = make_gw("gw-link", upstream={"port": proxy.port, "connect_address": UPLINK_ADDRESS})
        wait_until(lambda: gw.uplink()["state"] == "connected", 20, "the uplink")
        attempts = gw.uplink()["connectAttempts"]
        ip("link", "set", "gw1", "down")  # a change on a link the connection does not depend on
        ip("link", "set", "gw1", "up")
        time.sleep(1.0)
        assert gw.uplink()["state"] == "connected" and gw.uplink()["connectAttempts"] == attempts
        assert "link state" in gw.log()
        proxy.forward = False  # the endpoint refuses: the backoff grows
        proxy.cut()
        wait_for_long_backoff(gw.uplink, 4)
        proxy.forward = True
        time.sleep(1.0)  # the one-per-second rule is not what this measures
        r = reaction(gw.uplink, lambda: ip("link", "set", "gw1", "down"))
        print("\n" + r.describe("link down"))
        assert r.attempt < 1.0 and r.connected < r.backoff_left - 1
        gaps = [b - a for a, b in zip(proxy.accepts, proxy.accepts[1:], strict=False)]
        assert min(gaps) >= 0.95, f"CONNECTs closer than one second apart: {gaps}"
    finally:
        ip("link", "set", "gw1", "up")
        proxy.close()


def _san_addresses(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(a) for a in san.get_values_for_type(x509.IPAddress)}


def test_listener_certificate_follows_the_addresses_without_dropping_sensors(
    make_gw: Callable[..., GW], stack: DevStack, tmp_path: Path
) -> None:
    ca = pki.make_root("Netns Sensor CA", "ecc")
    listener = {"address": "0.0.0.0", "port": _free_port(), "tls": True, "require_client_cert": True}
    gw = make_gw("gw-sans", downstream={"listener": [listener], "auto_activate": True})
    register_ca(gw.workdir / "g.toml", ca, auto_registration=True)
    server_pem = tmp_path / "state" / "localca" / "server.pem"
    ca_pem = tmp_path / "state" / "localca" / "ca.pem"
    assert UPLINK_ADDRESS in _san_addresses(server_pem) and "10.77.0.9" not in _san_addresses(server_pem)
    issued = pki.make_client(ca, "kept")
    cert = pki.write(tmp_path / "kept.pem", issued.cert_pem())
    key = pki.write(tmp_path / "kept.key", issued.key_pem(), 0o600)
    kept = Sensor("kept", listener["port"], ca_pem, cert, key)
    try:
        assert kept.connect() == 0
        ip("addr", "add", "10.77.0.9/24", "dev", "gw0")
        wait_until(lambda: logevents.LISTENER_CERT_REISSUED.id in gw.log(), 5, "the re-issued certificate")
        assert "10.77.0.9" in _san_addresses(server_pem)
        # a sensor that checks the gateway's address against the certificate (mosquitto_pub does)
        argv = ["mosquitto_pub", "-h", "10.77.0.9", "-p", str(listener["port"]), "-i", "kept2", "-q", "1"]
        argv += ["-t", "sensors/kept2/t", "-m", "hello", "--cafile", str(ca_pem)]
        issued2 = pki.make_client(ca, "kept2")
        argv += ["--cert", str(pki.write(tmp_path / "k2.pem", issued2.cert_pem()))]
        argv += ["--key", str(pki.write(tmp_path / "k2.key", issued2.key_pem(), 0o600))]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        # the sensor connected before the change is still connected and served
        assert any(c["clientId"] == "kept" for c in gw.ctl("list-connections")["connections"])
        assert kept.publish("sensors/kept/t", b"still here", qos=1) == 0
        ip("addr", "del", "10.77.0.9/24", "dev", "gw0")
        wait_until(lambda: "10.77.0.9" not in _san_addresses(server_pem), 5, "the certificate without it")
    finally:
        kept.stop()


def _free_port() -> int:
    from gatewayd_dev.procs import free_port

    return free_port()
