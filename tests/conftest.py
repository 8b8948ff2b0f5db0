"""Shared fixtures: the real dev stack, temp configs, and real gatewayd processes that are always stopped."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tpm2_pytss.types  # noqa: F401  before any test module imports hypothesis: see below

from gatewayd_dev.gateway import Gateway, loopback_listener, write_config

# Debian bookworm: importing hypothesis (6.67) before tpm2-pytss (1.2) leaves tpm2-pytss objects without
# their C data ("'TPM2B_PUBLIC' object has no attribute '_cdata'"). The daemon never imports hypothesis; the
# test process does both, so tpm2-pytss is imported first, here.
from gatewayd_dev.sensor import Sensor
from gatewayd_dev.stack import DevStack

REPO = Path(__file__).resolve().parent.parent

# tests/netns changes interfaces and addresses: it runs only inside the network namespace that
# tests/test_network.py makes for it (which sets GATEWAYD_NETNS=1).
collect_ignore = [] if os.environ.get("GATEWAYD_NETNS") == "1" else ["netns"]


@pytest.fixture(scope="session")
def devstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One software TPM and one AWS IoT stand-in for the whole session (tests must not restart them)."""
    stack = DevStack(tmp_path_factory.mktemp("devstack")).start()
    try:
        yield stack
    finally:
        stack.stop()


_LISTENERS: dict[Path, dict[str, Any]] = {}


def base_config(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = _LISTENERS.setdefault(
        tmp_path, loopback_listener()
    )  # the same port for every config of a test
    tables: dict[str, dict[str, Any]] = {
        "gateway": {
            "thing_name": "gw-test",
            "state_dir": str(tmp_path / "state"),
            "control_socket": str(tmp_path / "control.sock"),
        },
        "upstream": {"endpoint": "standin-ats.iot.local.gatewayd.test", "port": 8883},
        "downstream": {"listener": [listener]},
        # whatever the test machine's NTP state: tests of an unsynchronized clock say so themselves
        "time": {"synchronized": "always"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    return tables


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "gatewayd.toml", **sections: dict[str, Any]) -> Path:
        return write_config(tmp_path / name, base_config(tmp_path, **sections))

    return make


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start real gatewayd processes; every one is stopped by PID at teardown, pass or fail."""
    started: list[Gateway] = []

    def start(config: Path, **kw: Any) -> Gateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        gw = Gateway(config, workdir, **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def sensors() -> Iterator[Callable[[Sensor], Sensor]]:
    """Track the test's sensors (gatewayd_dev.sensor.Sensor): each is stopped when the test ends."""
    made: list[Sensor] = []

    def track(s: Sensor) -> Sensor:
        made.append(s)
        return s

    yield track
    for s in made:
        with contextlib.suppress(Exception):  # already gone
            s.stop()
