"""`gatewayctl trust update`: a new CA bundle is proven by a trial connection before it is used, kept across
restarts, refused (nothing changes) when it cannot verify the endpoint, and `--from-config` returns to the
configured mode. Real parts: the daemon, its TPM-held uplink, the stand-in's RSA-rooted endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.service.control import request
from gatewayd_dev.gateway import Gateway, gateway_env, gatewayctl, provision, standin_config, write_config
from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack


class Gw:
    def __init__(self, stack: DevStack, workdir: Path, config: Path) -> None:
        self.stack, self.workdir, self.config = stack, workdir, config
        self.daemon = self.start()

    def start(self) -> Gateway:
        daemon = Gateway(self.config, self.workdir, env=gateway_env(self.stack))
        daemon.wait_ready()
        wait_until(lambda: self.uplink()["state"] == "connected", 20, "uplink")
        return daemon

    def uplink(self) -> dict[str, Any]:
        result: dict[str, Any] = request(self.workdir / "control.sock", "status")["uplink"]
        return result

    def fails(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=90, env={**os.environ, **gateway_env(self.stack)},
        )  # fmt: skip
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result
        return result.stderr


@pytest.fixture(scope="module")
def gw(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    workdir = tmp_path_factory.mktemp("trust-update")
    tables = standin_config(devstack, workdir, "gw-trust")  # rsa endpoint, validation_mode rsa
    tables["renewal"] = {"trial_timeout": "10s"}
    config = write_config(workdir / "g.toml", tables)
    provision(devstack, config)
    g = Gw(devstack, workdir, config)
    try:
        yield g
    finally:
        g.daemon.stop()


def test_a_bundle_that_cannot_verify_the_endpoint_is_refused(gw: Gw) -> None:
    before = gw.uplink()
    err = gw.fails("trust", "update", "--mode", "ecc")
    assert "the ecc bundle did not verify the endpoint" in err and "trust unchanged" in err
    after = gw.uplink()
    assert after["validationMode"] == "rsa" and after["trustedRoots"] == before["trustedRoots"]
    wait_until(lambda: gw.uplink()["state"] == "connected", 20, "back on the old bundle")
    assert not (gw.workdir / "state" / "trust" / "override.json").exists()
    assert "trust update to ecc refused" in gw.daemon.log()


def test_input_checks(gw: Gw) -> None:
    assert "needs --ca-file" in gw.fails("trust", "update", "--mode", "custom")
    assert "only with --mode custom or legacy" in gw.fails(
        "trust", "update", "--mode", "ecc", "--ca-file", "/etc/hostname"
    )
    assert "must be one of" in gw.fails("trust", "update", "--mode", "everything")
    assert "needs --mode M, --ca-file F or --from-config" in gw.fails("trust", "update")


def test_update_is_proven_used_and_kept_across_a_restart(gw: Gw) -> None:
    result = gatewayctl(gw.config, "trust", "update", "--mode", "all")
    assert result["validationMode"] == "all" and result["previousMode"] == "rsa"
    wait_until(lambda: gw.uplink()["state"] == "connected", 20, "connected with the new bundle")
    assert gw.uplink()["validationMode"] == "all"
    assert set(gw.uplink()["trustedRoots"]) == {"Stand-in Root CA RSA", "Stand-in Root CA ECC"}  # dev catalog
    gw.daemon.stop()
    gw.daemon = gw.start()
    assert gw.uplink()["validationMode"] == "all"
    assert "set by `gatewayctl trust update` instead of the config's rsa" in gw.daemon.log()
    custom = gatewayctl(
        gw.config, "trust", "update", "--ca-file", str(gw.stack.standin.workdir / "root-rsa.pem")
    )
    assert custom["validationMode"] == "custom"
    back = gatewayctl(gw.config, "trust", "update", "--from-config")
    assert back["validationMode"] == "rsa" and back["fromConfig"] is True
    assert not (gw.workdir / "state" / "trust" / "override.json").exists()
    wait_until(lambda: gw.uplink()["state"] == "connected", 20, "connected on the configured bundle")
