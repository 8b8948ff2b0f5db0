"""The unit file agrees with the daemon: notify type, SIGHUP reload, the config-error status, stop budget."""

from __future__ import annotations

import configparser
import re

from gatewayd.cli.gatewayd import EXIT_CONFIG
from gatewayd.service.daemon import SHUTDOWN_BUDGET

from .conftest import REPO


def unit() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / "gatewayd.service")
    return parser["Service"]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_matches_the_daemon() -> None:
    service = unit()
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert service["Restart"] == "on-failure"
    assert seconds(service["TimeoutStopSec"]) > SHUTDOWN_BUDGET
    assert seconds(service["WatchdogSec"]) >= 10
    # No ExecStartPre=check-config: it exits 1, not 78, and Restart=on-failure would loop on a bad config.
    assert "ExecStartPre" not in service
