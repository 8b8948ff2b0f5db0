"""Crash safety of renewal: for every step, SIGKILL the daemon with the renewal paused exactly there (debug
checkpoints), restart it, and check that the gateway connects with a valid identity (old or new), the renewal
resumes or restarts cleanly, and no TPM object or key file leaks. Also: a promoted certificate that cannot
connect within the rollback window is rolled back.

Real parts: the daemon, swtpm + abrmd, the stand-in, a real issuing command.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from gatewayd.adapters import tpm
from gatewayd.service.control import request
from gatewayd.service.upstream.renewal import Renewer
from gatewayd_dev.gateway import Gateway, gateway_env, provision, standin_config, write_config
from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack

from .conftest import REPO

RESUMED = {"staged", "trial", "promoting", "promoted"}  # a staged certificate exists: proven again, promoted


def _setup(devstack: DevStack, workdir: Path, **renewal: Any) -> tuple[Path, dict[str, str]]:
    tables = standin_config(devstack, workdir, "gw-crash")
    tables["renewal"] = {
        "issuer": "command",
        "command": devstack.standin.issue_command("--minutes", "600"),
        "trial_timeout": "20s",
        "rollback_window": "20s",
        **renewal,
    }
    config = write_config(workdir / "g.toml", tables)
    provision(devstack, config)
    return config, {**gateway_env(devstack), "PYTHONPATH": str(REPO)}


def _ctl(workdir: Path, command: str, args: dict[str, Any] | None = None) -> Any:
    return request(workdir / "control.sock", command, args)


def _renewal(workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = _ctl(workdir, "status")["uplink"]["renewal"]
    return result


def _connected(workdir: Path) -> bool:
    return bool(_ctl(workdir, "status")["uplink"]["state"] == "connected")


def _no_leftovers(workdir: Path) -> None:
    shown = _ctl(workdir, "identity", {"action": "show"})
    assert shown["pendingKey"] is None and not any(v["staged"] for v in shown["versions"]), shown
    used = {v["key"] for v in shown["versions"]}
    keys = {int(p.name) for p in (workdir / "state" / "identity" / "keys").iterdir() if p.name.isdigit()}
    assert keys == used, f"key files {sorted(keys)} but versions use {sorted(used)}"
    hidden = [p.name for p in (workdir / "state" / "identity").rglob(".*tmp*")]
    assert hidden == []


@pytest.mark.parametrize("checkpoint", Renewer.CHECKPOINTS)
def test_sigkill_at_each_step(
    devstack: DevStack, tmp_path: Path, checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in devstack.tpm.env().items():  # this process counts the TPM's persistent handles
        monkeypatch.setenv(key, value)
    config, env = _setup(devstack, tmp_path)
    handles_before = tpm.persistent_handles(devstack.tpm.tcti)
    debug = {"GATEWAYD_DEBUG_COMMANDS": "1", "GATEWAYD_DEBUG_RENEWAL_HOLD": checkpoint}
    daemon = Gateway(config, tmp_path, env={**env, **debug})
    try:
        daemon.wait_ready()
        wait_until(lambda: _connected(tmp_path), 20, "uplink")
        old = _ctl(tmp_path, "status")["uplink"]["certificateId"]
        assert _ctl(tmp_path, "identity", {"action": "renew", "now": True})["started"]
        wait_until(lambda: _renewal(tmp_path).get("heldAt") == checkpoint, 30, f"the renewal at {checkpoint}")
        daemon.signal(signal.SIGKILL)
        wait_until(lambda: not daemon.proc.alive(), 10, "the daemon to die")
    finally:
        daemon.stop()
    daemon = Gateway(config, tmp_path, env=env)
    try:
        daemon.wait_ready()
        wait_until(lambda: _renewal(tmp_path)["step"] == "IDLE", 60, "the renewal to settle")
        wait_until(lambda: _connected(tmp_path), 30, "the uplink after the restart")
        last = _renewal(tmp_path)["last"]
        now = _ctl(tmp_path, "status")["uplink"]["certificateId"]
        if checkpoint in RESUMED:
            assert last["result"] == "renewed" and now == last["certificateId"] != old, last
        else:
            assert last["result"] == "failed" and "interrupted in step" in last["reason"], last
            assert now == old
        _no_leftovers(tmp_path)
        assert tpm.persistent_handles(devstack.tpm.tcti) == handles_before
        # and the next renewal works
        _ctl(tmp_path, "identity", {"action": "renew", "now": True})
        wait_until(
            lambda: (_renewal(tmp_path)["last"] or {}).get("certificateId") not in (None, "", now),
            60,
            "renewal",
        )
        wait_until(lambda: _renewal(tmp_path)["step"] == "IDLE", 60, "the second renewal to end")
        assert _renewal(tmp_path)["last"]["result"] == "renewed"
        _no_leftovers(tmp_path)
    finally:
        daemon.stop()


def test_rollback_when_the_promoted_certificate_cannot_connect(devstack: DevStack, tmp_path: Path) -> None:
    """Held right after promotion, the endpoint goes away: the new certificate cannot connect within the
    rollback window, so the previous one is restored; once the endpoint is back, the gateway connects
    with it."""
    config, env = _setup(devstack, tmp_path, rollback_window="5s")
    debug = {"GATEWAYD_DEBUG_COMMANDS": "1", "GATEWAYD_DEBUG_RENEWAL_HOLD": "promoted"}
    daemon = Gateway(config, tmp_path, env={**env, **debug})
    try:
        daemon.wait_ready()
        wait_until(lambda: _connected(tmp_path), 20, "uplink")
        old = _ctl(tmp_path, "status")["uplink"]["certificateId"]
        _ctl(tmp_path, "identity", {"action": "renew", "now": True})
        wait_until(lambda: _renewal(tmp_path).get("heldAt") == "promoted", 30, "promotion")
        devstack.standin.stop()
        try:
            _ctl(tmp_path, "debug-renewal-release")
            wait_until(lambda: _renewal(tmp_path)["step"] == "IDLE", 30, "the rollback")
            last = _renewal(tmp_path)["last"]
            assert (
                last["result"] == "rolled-back"
                and "did not connect within the rollback window" in last["reason"]
            )
            assert "renewal rolled back to version 1" in daemon.log()
            assert f"identity event rolledBack: certificate {old} in use" in daemon.log()
        finally:
            devstack.standin.start()
        _ctl(tmp_path, "identity", {"action": "show"})
        wait_until(lambda: _connected(tmp_path), 30, "reconnected with the previous certificate")
        assert _ctl(tmp_path, "status")["uplink"]["certificateId"] == old
    finally:
        daemon.stop()
