"""The mutual-TLS uplink with a TPM-held key, against the AWS IoT Core stand-in: connects, refuses and says
why, reconnects, and never makes more than one CONNECT per second."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, gatewayctl, provision, standin_config, write_config
from gatewayd_dev.procs import pid_alive
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.stack import DevStack


class GW:
    """A provisioned (or not) gateway directory plus its running daemon."""

    def __init__(self, stack: DevStack, workdir: Path, name: str, endpoint: str, **sections: Any) -> None:
        self.stack = stack
        self.workdir = workdir
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            workdir / "g.toml", standin_config(stack, workdir, name, endpoint, **sections)
        )
        self.daemon: Gateway | None = None

    def provision(self, days: float = 30, new_key: bool = True) -> dict[str, Any]:
        return provision(self.stack, self.config, days, new_key)

    def start(self) -> Gateway:
        self.daemon = Gateway(self.config, self.workdir, env=gateway_env(self.stack))
        self.daemon.wait_ready()
        return self.daemon

    def status(self) -> dict[str, Any]:
        result = request(self.workdir / "control.sock", "status")
        assert isinstance(result, dict)
        return result

    def wait_uplink(self, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            uplink = self.status()["uplink"]
            if check(uplink):
                return uplink
            if time.monotonic() > deadline:
                log = self.daemon.log() if self.daemon else ""
                raise AssertionError(f"uplink never matched; last: {uplink}\n{log[-3000:]}")
            time.sleep(0.05)

    def wait_connected(self, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_uplink(lambda u: u["state"] == "connected", timeout)

    def log(self) -> str:
        assert self.daemon is not None
        return self.daemon.log()

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def make_gw(devstack: DevStack, tmp_path: Path) -> Iterator[Callable[..., GW]]:
    made: list[GW] = []

    def make(name: str, endpoint: str = "rsa", stack: DevStack | None = None, **sections: Any) -> GW:
        gw = GW(stack or devstack, tmp_path / name, name, endpoint, **sections)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def observe(stack: DevStack, topic: str, count: int = 1, timeout: int = 15) -> list[str]:
    """A real third-party client (mosquitto_sub) at the stand-in's back office."""
    port = str(stack.standin.observer_port)
    result = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", topic, "-C", str(count), "-W", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    return result.stdout.splitlines()


# ------------------------------------------------------------------ connects


@pytest.mark.parametrize(
    ("endpoint", "key_type"),
    [("rsa", "ecc-p256"), ("ecc", "ecc-p256"), ("ecc", "rsa-2048"), ("rsa", "ecc-p384")],
)
def test_connects_in_the_mode_of_its_endpoint(
    make_gw: Callable[..., GW], endpoint: str, key_type: str
) -> None:
    gw = make_gw(
        f"gw-{endpoint}-{key_type}", endpoint, identity={"key_type": key_type}, status={"interval": 1}
    )
    shown = gw.provision()
    daemon = gw.start()
    uplink = gw.wait_connected()
    assert uplink["validationMode"] == ("ecc" if endpoint == "ecc" else "rsa")
    assert uplink["trustedRoots"] == [f"Stand-in Root CA {'ECC' if endpoint == 'ecc' else 'RSA'}"]
    assert uplink["certificateId"] == shown["certificateId"]
    assert 29 < uplink["certificateDaysLeft"] <= 30
    status = json.loads(observe(gw.stack, f"gatewayd/{gw.name}/status")[0])
    assert status["thingName"] == gw.name and status["state"] == "connected"
    assert 29 < status["certificateDaysLeft"] <= 30 and status["uptimeSeconds"] >= 0
    assert any(
        re.fullmatch(
            r"Connected to standin-ats\S+ since \S+Z; trust (rsa|ecc); certificate \w{12} 30 days left",
            m.get("STATUS", ""),
        )
        for m in daemon.notify.messages + daemon.notify.poll()
    )
    assert logevents.UPLINK_CONNECTED.id in gw.log()


def test_cross_signed_chain_validates_without_starfield(make_gw: Callable[..., GW]) -> None:
    """AWS's chains are cross-signed by Starfield; the Amazon root alone is enough (see core/trust.py)."""
    gw = make_gw("gw-cross", "cross")
    gw.provision()
    gw.start()
    gw.wait_connected()


def test_connects_after_certificate_installed_through_running_daemon(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-late")
    gw.start()
    blocked = gw.wait_uplink(lambda u: u["state"] == "blocked")
    assert "no certificate installed" in blocked["lastError"]
    shown = gw.provision()  # create-key, create-csr and install-certificate go through the running daemon
    assert gw.wait_connected()["certificateId"] == shown["certificateId"]
    offline_free = gatewayctl(gw.config, "identity", "show", env=gateway_env(gw.stack))
    assert offline_free["certificateId"] == shown["certificateId"]


def test_identity_show_offline_matches_online(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-show")
    shown = gw.provision()  # daemon not running: gatewayctl works on the state directory
    offline = gatewayctl(gw.config, "identity", "show", env=gateway_env(gw.stack))
    gw.start()
    online = gatewayctl(gw.config, "identity", "show", env=gateway_env(gw.stack))
    for key in (
        "certificateId",
        "subject",
        "issuer",
        "serial",
        "notBefore",
        "notAfter",
        "keyBackend",
        "tpmParent",
    ):
        assert offline[key] == online[key] == shown[key]
    assert offline["versions"] == online["versions"]


# ------------------------------------------------------------------ refuses, and says why


@pytest.mark.parametrize(
    ("endpoint", "mode", "reason"),
    [
        ("ecc", "rsa", "server certificate rejected: unable to get local issuer certificate"),
        ("wrongname", "rsa", "server certificate rejected: Hostname mismatch"),
        ("expired", "rsa", "server certificate rejected: certificate has expired"),
    ],
)
def test_refuses_an_untrusted_endpoint_and_logs_why(
    make_gw: Callable[..., GW], endpoint: str, mode: str, reason: str
) -> None:
    gw = make_gw(f"gw-refuse-{endpoint}", endpoint, upstream={"validation_mode": mode})
    gw.provision()
    gw.start()
    uplink = gw.wait_uplink(lambda u: reason in u["lastError"])
    assert uplink["connectedSince"] is None
    failed = [line for line in gw.log().splitlines() if logevents.UPLINK_CONNECT_FAILED.id in line]
    assert failed and reason in failed[0]
    assert logevents.UPLINK_CONNECTED.id not in gw.log()


def test_refuses_its_own_expired_certificate(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-expired")
    gw.provision(days=(3 / 0.9) / 86400)  # back-dated by a tenth of its life: expires 3 s from now
    time.sleep(3.5)
    gw.start()
    uplink = gw.wait_uplink(lambda u: u["state"] == "blocked")
    assert "expired at" in uplink["lastError"] and "install a new one" in uplink["lastError"]
    assert logevents.UPLINK_BLOCKED.id in gw.log()


def test_refuses_a_certificate_that_does_not_match_its_key(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-mismatch")
    gw.provision()
    version = gw.workdir / "state" / "identity" / "archive" / "1"
    other = pki.make_client(gw.stack.standin.device_ca, gw.name).cert_pem()  # right CA, wrong key
    for name in ("cert.pem", "fullchain.pem"):  # damage on disk, bypassing install's checks
        (version / name).write_bytes(other)
    gw.start()
    uplink = gw.wait_uplink(lambda u: u["state"] == "blocked")
    assert "does not match its key" in uplink["lastError"]


# ------------------------------------------------------------------ ALPN on 443


ALPN_SERVER = """
import json, os, socket, ssl, sys
host, port, chain, key, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(chain, key)
ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
srv = socket.create_server((host, port))
print("listening", flush=True)
srv.settimeout(30)
raw, _ = srv.accept()
tls = ctx.wrap_socket(raw, server_side=True)
with open(out + ".tmp", "w") as f:  # renamed into place: the test never reads a half-written file
    json.dump({"alpn": tls.selected_alpn_protocol()}, f)
os.rename(out + ".tmp", out)
tls.recv(1024)
tls.sendall(bytes([0x20, 2, 0, 0]))  # CONNACK accepted
tls.recv(1024)
"""


@pytest.mark.parametrize(("port", "expected"), [(443, "x-amzn-mqtt-ca"), (0, None)])
def test_alpn_is_sent_on_443_only(
    make_gw: Callable[..., GW], devstack: DevStack, tmp_path: Path, port: int, expected: str | None
) -> None:
    import random

    # A random address of 127/8, so port 443 is free there whatever else runs on this machine.
    host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    if port == 0:
        port = 20000 + random.randint(0, 20000)  # nothing listens on this fresh address
    d = devstack.standin.workdir
    out = tmp_path / f"alpn-{port}.json"
    # Binding port 443 needs root: as root directly, otherwise through sudo -n.
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    server = subprocess.Popen(
        [*sudo, sys.executable, "-c", ALPN_SERVER, host, str(port), str(d / "server-rsa-chain.pem"),
         str(d / "server-rsa.key"), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening", server.stderr
        gw = make_gw(f"gw-alpn-{port}", upstream={"port": port, "connect_address": host})
        gw.provision()
        gw.start()
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(out.read_text()) == {"alpn": expected}
    finally:
        server.kill()
        server.wait()


# ------------------------------------------------------------------ reconnects, backoff, supervision


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[DevStack]:
    """A private stack for tests that stop or restart its parts."""
    stack = DevStack(tmp_path / "own-stack").start()
    try:
        yield stack
    finally:
        stack.stop()


def test_reconnects_after_the_broker_restarts(make_gw: Callable[..., GW], own_stack: DevStack) -> None:
    gw = make_gw("gw-restart", stack=own_stack, status={"interval": 1})
    gw.provision()
    gw.start()
    gw.wait_connected()
    own_stack.standin.stop()
    lost = gw.wait_uplink(lambda u: u["state"] != "connected")
    assert lost["connectedSince"] is None
    assert logevents.UPLINK_DISCONNECTED.id in gw.log()
    time.sleep(2)
    own_stack.standin.start()
    gw.wait_connected(timeout=30)
    assert json.loads(observe(own_stack, f"gatewayd/{gw.name}/status")[0])["state"] == "connected"


def test_never_more_than_one_connect_per_second(make_gw: Callable[..., GW], devstack: DevStack) -> None:
    proxy = RecordingProxy(devstack.standin.endpoint("rsa").port)
    try:
        proxy.forward = False  # every attempt fails at once: the fastest a client could retry
        gw = make_gw("gw-backoff", upstream={"port": proxy.port, "reconnect_max_delay": 2})
        gw.provision()
        gw.start()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            time.sleep(0.2)
        gaps = [b - a for a, b in zip(proxy.accepts, proxy.accepts[1:], strict=False)]
        assert len(proxy.accepts) >= 4, proxy.accepts
        assert min(gaps) >= 0.95, f"CONNECTs closer than one second apart: {gaps}"
        # Let it connect, then kill the uplink process: the restarted one also waits its second.
        proxy.forward = True
        gw.wait_connected(timeout=15)
        pid = gw.status()["uplink"]["uplinkPid"]
        before = len(proxy.accepts)
        os.kill(pid, signal.SIGKILL)
        new = gw.wait_uplink(lambda u: u["state"] == "connected" and u["uplinkPid"] not in (None, pid), 20)
        assert not pid_alive(pid) and pid_alive(new["uplinkPid"])
        assert proxy.accepts[before] - proxy.accepts[before - 1] >= 0.95
    finally:
        proxy.close()


def test_waits_for_the_tpm_and_keeps_running(make_gw: Callable[..., GW], own_stack: DevStack) -> None:
    gw = make_gw("gw-notpm", stack=own_stack)
    gw.provision()
    own_stack.tpm.stop_abrmd()
    daemon = gw.start()  # starts anyway: downstream work does not need the TPM
    uplink = gw.wait_uplink(lambda u: u["state"] == "waiting-for-tpm")
    assert "waiting for TPM" in uplink["lastError"]
    assert any(
        "waiting for TPM" in m.get("STATUS", "") for m in daemon.notify.messages + daemon.notify.poll()
    )
    blocked = [line for line in gw.log().splitlines() if logevents.UPLINK_BLOCKED.id in line]
    assert len(blocked) == 1  # said once, not on every retry
    own_stack.tpm.start_abrmd()
    daemon.signal(signal.SIGHUP)  # "try again now" (udev will do this on its own later)
    gw.wait_connected(timeout=20)
    assert daemon.proc.alive()


def test_backoff_is_full_jitter_with_a_one_second_floor() -> None:
    import random

    from gatewayd.core.backoff import MIN_INTERVAL, Backoff

    rng = random.Random(7)
    b = Backoff(cap=30)
    now = 100.0
    for _ in range(200):
        delay = b.delay(now, rng.random())
        assert 0 <= delay <= 30
        now += delay
        if b.last_attempt is not None:
            assert now - b.last_attempt >= MIN_INTERVAL - 1e-9
        b.attempted(now)
        b.failed()
    assert b.delay(now, 0.0) == MIN_INTERVAL  # even with zero jitter, one second after the last attempt
    b.succeeded()
    assert b.delay(now + 5, 0.9) == 0.0  # after a success, reconnect at once (a second has passed)


# ------------------------------------------------------------------ start-up checks and warnings


def test_client_id_is_the_thing_name(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-clientid")
    gw.provision()
    gw.start()
    gw.wait_connected()
    log = (gw.stack.standin.workdir / "mosquitto.log").read_text()
    assert re.search(r"New client connected from 127\.0\.0\.1:\d+ as gw-clientid ", log), log[-2000:]


def test_an_uplink_directory_left_without_search_permission_is_repaired(make_gw: Callable[..., GW]) -> None:
    """gatewayd 0.1.0 could create STATE_DIR/uplink 0600 (a umask race with the control socket); the
    daemon then could never connect. It now repairs the directory."""
    gw = make_gw("gw-heal")
    gw.provision()
    broken = gw.workdir / "state" / "uplink"
    broken.mkdir(mode=0o700)
    broken.chmod(0o600)
    gw.start()
    gw.wait_connected()
    assert broken.stat().st_mode & 0o777 == 0o700


def test_file_backend_works_and_warns_at_every_start(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-filekey", identity={"key_backend": "file"})
    shown = gw.provision()
    assert shown["keyBackend"] == "file" and "tpmParent" not in shown
    gw.start()
    gw.wait_connected()
    assert gw.log().count(logevents.INSECURE_KEY_BACKEND.id) == 1
    gw.stop()
    gw.start()  # the log file is appended to
    gw.wait_connected()
    assert gw.log().count(logevents.INSECURE_KEY_BACKEND.id) == 2


def test_root_expiry_is_warned_in_log_and_status(make_gw: Callable[..., GW]) -> None:
    gw = make_gw("gw-rootwarn", upstream={"root_expiry_warning_days": 100000})
    gw.provision()
    daemon = gw.start()
    uplink = gw.wait_connected()
    (warning,) = uplink["rootWarnings"]
    assert warning["root"] == "Stand-in Root CA RSA" and warning["daysLeft"] > 3000
    assert logevents.TRUST_ROOT_EXPIRING.id in gw.log()
    daemon.notify.wait_for("STATUS")
    assert any(
        "root CA Stand-in Root CA RSA expires in" in m.get("STATUS", "") for m in daemon.notify.messages
    )


def test_missing_amazon_root_stops_the_start_with_78(make_gw: Callable[..., GW], tmp_path: Path) -> None:
    only_starfield = tmp_path / "bundle.pem"
    gw = make_gw("gw-noroot", upstream={"system_ca_bundle": str(only_starfield)})
    only_starfield.write_bytes((gw.stack.standin.workdir / "starfield-root.pem").read_bytes())
    daemon = Gateway(gw.config, gw.workdir, env=gateway_env(gw.stack))
    gw.daemon = daemon
    assert daemon.proc.popen.wait(15) == 78
    assert "Stand-in Root CA RSA (SHA-256 " in daemon.log() and "is not in" in daemon.log()


def test_create_csr_out_writes_the_file(make_gw: Callable[..., GW]) -> None:
    from cryptography import x509

    gw = make_gw("gw-csrout", identity={"common_name": "custom-cn"})
    env = gateway_env(gw.stack)
    gatewayctl(gw.config, "identity", "create-key", env=env)
    out = gw.workdir / "gw.csr"
    result = gatewayctl(gw.config, "identity", "create-csr", "--out", str(out), env=env)
    assert result["csrFile"] == str(out) and out.read_text() == result["csrPem"]
    csr = x509.load_pem_x509_csr(out.read_bytes())
    assert csr.is_signature_valid and csr.subject.rfc4514_string() == "CN=custom-cn"
