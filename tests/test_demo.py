"""`make demo` (python -m gatewayd_dev.demo) runs until Ctrl-C and leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from gatewayd_dev.procs import pid_alive

from .conftest import REPO


def test_demo_runs_until_ctrl_c_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gatewayd_dev.demo", "--workdir", str(tmp_path / "run")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 60
            while "[sensors] valve-1 received commands/valve-1/set: 'open'" not in out.read_text():
                assert time.monotonic() < deadline, out.read_text()
                assert demo.poll() is None, out.read_text()
                time.sleep(0.1)
            pids = json.loads((tmp_path / "run" / "demo.json").read_text())["pids"]
            expected = {
                "swtpm",
                "dbus-daemon",
                "tpm2-abrmd",
                "mosquitto",
                "mosquitto_sub",
                "gatewayd",
                "sensors",
            }
            assert set(pids) == expected
            assert all(pid_alive(p) for p in pids.values())
            # The status it points at really answers.
            sock = str(tmp_path / "run" / "control.sock")
            ctl = subprocess.run(
                [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--socket", sock, "status"],
                capture_output=True,
                text=True,
            )
            assert ctl.returncode == 0, ctl.stderr
            st = json.loads(ctl.stdout)
            assert st["thingName"] == "demo-gateway" and st["uplink"]["state"] == "connected"
            assert st["sensors"] == 4
            uplink_pid = st["uplink"]["uplinkPid"]
            demo.send_signal(signal.SIGINT)  # Ctrl-C
            assert demo.wait(30) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    text = out.read_text()
    assert "gatewayd exited with status 0; no process left" in text, text
    assert "clean shutdown complete" in text
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert not pid_alive(uplink_pid)
    assert "Provisioning: key generated inside the software TPM" in text
    status = next(
        line
        for line in text.splitlines()
        if line.startswith("[at the stand-in] gatewayd/demo-gateway/status")
    )
    assert json.loads(status.split(" ", 4)[4])["state"] == "connected"
    assert "[at the stand-in] demo-gateway/sensors/temp-kitchen/reading" in text  # sensor -> AWS
    assert "[at the stand-in] demo-gateway/sensors/valve-1/state open" in text  # AWS -> sensor -> AWS


def test_demo_shows_a_renewal_after_a_forced_rollback_while_sensors_publish(tmp_path: Path) -> None:
    """`make demo` with --rollback (and one-minute certificates, to keep the test short): the first renewed
    certificate is refused by the stand-in once live, so the gateway rolls back; the retry renews; sensor
    readings reach the stand-in before, between and after."""
    out = tmp_path / "demo.out"
    args = ["--workdir", str(tmp_path / "run"), "--cert-minutes", "1", "--rollback", "--duration", "170"]
    with out.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gatewayd_dev.demo", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 180
            while "renewal complete" not in out.read_text():
                assert time.monotonic() < deadline, out.read_text()[-4000:]
                assert demo.poll() is None, out.read_text()[-4000:]
                time.sleep(0.5)
            demo.send_signal(signal.SIGINT)
            assert demo.wait(30) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
    text = out.read_text()
    rolled = text.index("renewal rolled back to version 1")
    complete = text.index("renewal complete")
    assert text.index("--rollback: the stand-in now refuses the renewed certificate") < rolled < complete
    readings = [
        i for i, line in enumerate(text.splitlines()) if line.startswith("[at the stand-in] demo-gateway/")
    ]
    lines = text.splitlines()
    rolled_line = next(i for i, line in enumerate(lines) if "renewal rolled back" in line)
    complete_line = next(i for i, line in enumerate(lines) if "renewal complete" in line)
    assert any(i < rolled_line for i in readings) and any(rolled_line < i < complete_line for i in readings)
    assert "no process left" in text
