"""The real daemon as a subprocess, watched through a test NOTIFY_SOCKET: READY, STATUS, WATCHDOG, STOPPING,
SIGHUP with good and bad configs, and exit statuses."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core import logevents
from gatewayd.core.errors import ControlError
from gatewayd.service.control import request
from gatewayd_dev.gateway import Gateway, loopback_listener, write_config

from .conftest import base_config

Start = Callable[..., Gateway]


def status(tmp_path: Path) -> dict[str, Any]:
    result = request(tmp_path / "control.sock", "status")
    assert isinstance(result, dict)
    return result


def wait_log(gw: Gateway, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gw.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the daemon's log:\n{gw.log()}")


def test_ready_only_after_components_started(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    gw = start_gateway(make_config())
    ready = gw.wait_ready()
    # READY=1 came with a STATUS a person can read, after "Starting"; then (or already) why the uplink waits.
    assert ready["STATUS"].startswith("Uplink ")
    deadline = time.monotonic() + 15
    while not any(m.get("STATUS", "").startswith("Uplink blocked") for m in gw.notify.messages):
        assert time.monotonic() < deadline, gw.notify.messages
        time.sleep(0.05)
    blocked = next(m for m in gw.notify.messages if m.get("STATUS", "").startswith("Uplink blocked"))
    assert re.fullmatch(
        r"Uplink blocked since \S+Z: no certificate installed: run `gatewayctl identity create-key`.*"
        r"; trust rsa",
        blocked["STATUS"],
    ), blocked
    first_status = next(m for m in gw.notify.messages if "STATUS" in m)
    assert first_status["STATUS"] == "Starting" and "READY" not in first_status
    # The control socket was serving before READY was sent: it answers at once.
    assert status(tmp_path)["state"] == "running"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert logevents.STARTED.id in gw.log()


def test_sigterm_sends_stopping_and_exits_0_quickly(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    gw = start_gateway(make_config())
    gw.wait_ready()
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    stopping = gw.notify.wait_for("STOPPING", "1")
    assert stopping["STATUS"] == "Stopping"
    assert gw.proc.popen.wait(10) == 0
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "control.sock").exists()  # closed and removed cleanly
    log = gw.log()
    assert logevents.STOPPING.id in log and logevents.STOPPED.id in log


def test_sigint_is_a_clean_stop_too(make_config: Callable[..., Path], start_gateway: Start) -> None:
    gw = start_gateway(make_config())
    gw.wait_ready()
    gw.signal(signal.SIGINT)
    assert gw.proc.popen.wait(10) == 0


def test_watchdog_pings_at_half_the_interval_and_stop_when_the_loop_stalls(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    gw = start_gateway(make_config(), watchdog_usec=400_000, env={"GATEWAYD_DEBUG_COMMANDS": "1"})
    gw.wait_ready()
    gw.notify.collect(1.2)
    pings = [float(m["_t"]) for m in gw.notify.messages if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 4, gw.notify.messages
    gaps = [b - a for a, b in itertools.pairwise(pings[1:])]
    assert all(0.1 < g < 0.35 for g in gaps), gaps  # every 0.2 s = WATCHDOG_USEC / 2

    # Block the event loop for 1.5 s; poll the notify socket meanwhile to time-stamp pings as they arrive.
    before = len(gw.notify.messages)
    stall = threading.Thread(
        target=request, args=(tmp_path / "control.sock", "debug-stall-loop", {"seconds": 1.5})
    )
    stall.start()
    while stall.is_alive():
        gw.notify.poll()
        time.sleep(0.01)
    stall.join()
    gw.notify.collect(0.6)
    around = [float(m["_t"]) for m in gw.notify.messages[before - 1 :] if m.get("WATCHDOG") == "1"]
    longest = max(b - a for a, b in itertools.pairwise(around))
    assert longest >= 1.3, f"pings kept coming while the loop was blocked: {around}"
    assert around[-1] > time.monotonic() - 0.5, "pings did not resume after the stall"


def test_debug_commands_are_off_by_default(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    gw = start_gateway(make_config())
    gw.wait_ready()
    with pytest.raises(ControlError, match="unknown command 'debug-stall-loop'"):
        request(tmp_path / "control.sock", "debug-stall-loop", {"seconds": 1})


def test_no_watchdog_pings_without_watchdog_usec(
    make_config: Callable[..., Path], start_gateway: Start
) -> None:
    gw = start_gateway(make_config())
    gw.wait_ready()
    time.sleep(0.5)
    gw.notify.poll()
    assert not [m for m in gw.notify.messages if "WATCHDOG" in m]


def test_sighup_applies_live_keys_and_reports_restart_keys(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    config = make_config()
    gw = start_gateway(config)
    gw.wait_ready()
    request(tmp_path / "control.sock", "status")
    assert "control request status" not in gw.log()  # info level: no debug lines yet

    write_config(
        config, base_config(tmp_path, logging={"level": "debug"}, gateway={"thing_name": "gw-renamed"})
    )
    mark = len(gw.notify.messages)
    gw.signal(signal.SIGHUP)
    reloading = gw.notify.wait_for("RELOADING", "1", after=mark)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    gw.notify.wait_for("READY", "1", after=gw.notify.messages.index(reloading))

    st = status(tmp_path)
    assert st["thingName"] == "gw-test"
    assert st["lastReload"]["applied"] is True
    assert st["lastReload"]["changed"] == ["logging.level"]
    assert st["lastReload"]["restartNeeded"] == ["gateway.thing_name"]
    log = wait_log(gw, "control request status")  # debug level now live
    restart_line = next(line for line in log.splitlines() if logevents.CONFIG_RESTART_REQUIRED.id in line)
    assert "gateway.thing_name changed ('gw-test' -> 'gw-renamed') but needs a restart" in restart_line
    assert "config_key=gateway.thing_name" in restart_line
    assert logevents.CONFIG_RELOADED.id in log


def test_sighup_with_invalid_config_keeps_running_config(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    config = make_config()
    gw = start_gateway(config)
    gw.wait_ready()
    config.write_text(config.read_text() + "\n[logging]\nlevel = 'loud'\n[nonsense]\nx = 1\n")
    mark = len(gw.notify.messages)
    gw.signal(signal.SIGHUP)
    ready = gw.notify.wait_for("READY", "1", after=mark)
    assert "last reload refused (2 problems)" in ready["STATUS"]
    st = status(tmp_path)
    assert st["lastReload"] == {"at": st["lastReload"]["at"], "applied": False, "problems": 2}
    assert st["state"] == "running" and gw.proc.alive()
    log = wait_log(gw, "nonsense: unknown section")
    refused = [line for line in log.splitlines() if logevents.CONFIG_RELOAD_REFUSED.id in line]
    assert len(refused) == 2
    assert any(f"{config}:logging.level: 'loud' is not one of" in line for line in refused)
    # Still the old config: a later valid reload works from it.
    write_config(config, base_config(tmp_path, logging={"level": "warning"}))
    mark = len(gw.notify.messages)
    gw.signal(signal.SIGHUP)
    gw.notify.wait_for("READY", "1", after=mark + 1)
    assert status(tmp_path)["lastReload"]["changed"] == ["logging.level"]


def test_invalid_config_at_start_exits_78_with_every_problem(tmp_path: Path, start_gateway: Start) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[gateway]\nthing_name = 'bad name'\n[upstream]\nport = 0\n")
    gw = start_gateway(config)
    assert gw.proc.popen.wait(10) == 78
    log = gw.log()
    problems = [line for line in log.splitlines() if logevents.CONFIG_INVALID.id in line]
    assert len(problems) == 3, log  # thing_name invalid, endpoint missing, port out of range
    gw.notify.poll()
    assert not [m for m in gw.notify.messages if "READY" in m]


def test_second_daemon_on_same_state_dir_or_socket_exits_1_and_first_keeps_running(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    config = make_config()
    first = start_gateway(config)
    first.wait_ready()
    same_state = start_gateway(config)
    assert same_state.proc.popen.wait(10) == 1
    assert (
        f"{tmp_path / 'state' / 'identity'} is in use by another process (is gatewayd running?)"
        in same_state.log()
    )
    same_port = start_gateway(make_config("port.toml", gateway={"state_dir": str(tmp_path / "state2")}))
    assert same_port.proc.popen.wait(10) == 1
    assert (
        "cannot open the sensor listener:" in same_port.log() and "address already in use" in same_port.log()
    )
    other = {"listener": [loopback_listener()]}
    same_socket = start_gateway(
        make_config("sock.toml", gateway={"state_dir": str(tmp_path / "state3")}, downstream=other)
    )
    assert same_socket.proc.popen.wait(10) == 1
    assert "another gatewayd is already answering on" in same_socket.log()
    assert first.proc.alive() and status(tmp_path)["pid"] == first.pid


def test_stale_socket_from_a_killed_daemon_is_replaced(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    config = make_config()
    first = start_gateway(config)
    first.wait_ready()
    first.signal(signal.SIGKILL)
    first.proc.popen.wait(5)
    assert (tmp_path / "control.sock").exists()
    second = start_gateway(config)
    second.wait_ready()
    assert status(tmp_path)["pid"] == second.pid


def _gatewayctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", *args], capture_output=True, text=True
    )


def test_gatewayctl_status_by_socket_and_by_config(
    tmp_path: Path, make_config: Callable[..., Path], start_gateway: Start
) -> None:
    import json

    config = make_config()
    gw = start_gateway(config)
    gw.wait_ready()
    for args in (["--socket", str(tmp_path / "control.sock")], ["--config", str(config)]):
        result = _gatewayctl(*args, "status")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == gw.pid


def test_gatewayctl_without_daemon_fails_with_one_line(tmp_path: Path) -> None:
    result = _gatewayctl("--socket", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1
    assert (
        result.stderr == f"gatewayctl: no control socket at {tmp_path / 'none.sock'}: is gatewayd running?\n"
    )
    assert result.stdout == ""


def test_unusable_state_dir_is_one_clear_error(tmp_path: Path, start_gateway: Start) -> None:
    (tmp_path / "afile").write_text("")
    config = write_config(
        tmp_path / "g.toml", base_config(tmp_path, gateway={"state_dir": str(tmp_path / "afile/s")})
    )
    gw = start_gateway(config)
    assert gw.proc.popen.wait(10) == 1
    log = gw.log()
    assert f"cannot use state directory {tmp_path / 'afile/s'}: Not a directory" in log
    assert "Traceback" not in log
    assert logevents.FATAL_ERROR.id in log


def test_unusable_control_socket_dir_is_one_clear_error(tmp_path: Path, start_gateway: Start) -> None:
    (tmp_path / "afile").write_text("")
    sock = tmp_path / "afile" / "c.sock"
    config = write_config(tmp_path / "g.toml", base_config(tmp_path, gateway={"control_socket": str(sock)}))
    gw = start_gateway(config)
    assert gw.proc.popen.wait(10) == 1
    assert f"cannot listen on {sock}: " in gw.log() and "Traceback" not in gw.log()


def test_gatewayctl_usage_error_is_one_line() -> None:
    result = _gatewayctl("bogus")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("gatewayctl: argument COMMAND")
