"""The dev stack itself: a real software TPM behind abrmd, and the mutual-TLS AWS IoT stand-in."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest

from gatewayd_dev.procs import pid_alive
from gatewayd_dev.stack import DevStack
from gatewayd_dev.standin import mqtt_tls_probe


def test_softtpm_answers_through_abrmd(devstack: DevStack) -> None:
    result = subprocess.run(
        ["tpm2_getcap", "properties-fixed"],
        env={**os.environ, **devstack.tpm.env()},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert 'value: "2.0"' in result.stdout  # TPM2_PT_FAMILY_INDICATOR


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_endpoint_accepts_device_certificate_with_its_own_root(devstack: DevStack, kind: str) -> None:
    endpoint = devstack.standin.endpoint(kind)
    client = devstack.standin.client_files(f"probe-{kind}")
    assert mqtt_tls_probe(endpoint.port, endpoint.hostname, endpoint.root_file, client, f"probe-{kind}") == 0


@pytest.mark.parametrize(("kind", "other"), [("rsa", "ecc"), ("ecc", "rsa")])
def test_endpoint_is_not_trusted_under_the_other_root(devstack: DevStack, kind: str, other: str) -> None:
    endpoint = devstack.standin.endpoint(kind)
    client = devstack.standin.client_files("probe-cross")
    with pytest.raises(ssl.SSLCertVerificationError):
        mqtt_tls_probe(endpoint.port, endpoint.hostname, devstack.standin.endpoint(other).root_file, client)


def test_endpoint_name_is_verified(devstack: DevStack) -> None:
    endpoint = devstack.standin.endpoint("rsa")
    client = devstack.standin.client_files("probe-name")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        mqtt_tls_probe(endpoint.port, "other-ats.iot.local.gatewayd.test", endpoint.root_file, client)


def test_client_certificate_is_required(devstack: DevStack) -> None:
    endpoint = devstack.standin.endpoint("ecc")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mqtt_tls_probe(endpoint.port, endpoint.hostname, endpoint.root_file, None)


def test_client_certificate_from_a_foreign_ca_is_refused(devstack: DevStack, tmp_path: Path) -> None:
    from gatewayd_dev import pki
    from gatewayd_dev.standin import ClientFiles

    foreign_ca = pki.make_root("Foreign CA", "ecc")
    issued = pki.make_client(foreign_ca, "intruder")
    client = ClientFiles(
        pki.write(tmp_path / "c.pem", issued.cert_pem()), pki.write(tmp_path / "c.key", issued.key_pem())
    )
    endpoint = devstack.standin.endpoint("rsa")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mqtt_tls_probe(endpoint.port, endpoint.hostname, endpoint.root_file, client)


def test_observer_listener_is_plain_loopback(devstack: DevStack) -> None:
    result = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(devstack.standin.observer_port), "-t", "t", "-m", "x"],
        capture_output=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr


def test_stack_stops_every_process_and_restart_keeps_ports(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "s").start()
    try:
        port = stack.standin.endpoint("rsa").port
        old_pid = stack.standin.pids()[0]
        stack.standin.restart()
        assert stack.standin.endpoint("rsa").port == port
        assert not pid_alive(old_pid)
        client = stack.standin.client_files("after-restart")
        ep = stack.standin.endpoint("rsa")
        assert mqtt_tls_probe(ep.port, ep.hostname, ep.root_file, client) == 0
        pids = list(stack.pids().values())
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    finally:
        stack.stop()
    assert not [p for p in pids if pid_alive(p)]


def test_children_die_with_their_parent(tmp_path: Path) -> None:
    """Even if the test process is SIGKILLed, the stack's processes do not outlive it (PR_SET_PDEATHSIG)."""
    import json
    import signal
    import sys
    import time

    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from gatewayd_dev.stack import DevStack\n"
        f"s = DevStack(Path({str(tmp_path / 'k')!r})).start()\n"
        "print(json.dumps(list(s.pids().values())), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pids = json.loads(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    deadline = time.monotonic() + 5
    while [p for p in pids if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if pid_alive(p)]
