"""The unit file agrees with the daemon: notify type, SIGHUP reload, the config-error status, stop budget."""

from __future__ import annotations

import configparser
import re
import subprocess

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


def test_unit_is_hardened_as_the_issue_requires() -> None:
    text = (REPO / "systemd" / "gatewayd.service").read_text()
    service = unit()
    assert service["User"] == "gatewayd" and service["SupplementaryGroups"] == "tss dialout"
    devices = re.findall(r"(?m)^DeviceAllow=(.*)$", text)
    assert devices == ["/dev/tpmrm0 rw", "char-ttyUSB rw", "char-ttyACM rw"]  # the TPM and USB serial only
    # the drivers that register those groups are loaded before the unit starts (else they are left out)
    wants = " ".join(re.findall(r"(?m)^Wants=(.*)$", text)).split()
    after = " ".join(re.findall(r"(?m)^After=(.*)$", text)).split()
    for module in ("usbserial", "cdc_acm"):
        assert f"modprobe@{module}.service" in wants and f"modprobe@{module}.service" in after
    # issue 16: after the clock is restored, never waiting for it to be synchronized or for the network
    assert "time-sync.target" in after and "network.target" in after
    assert "time-sync.target" not in wants  # ordered after it, never pulling in what makes it wait
    for waits in ("systemd-time-wait-sync.service", "network-online.target"):
        assert waits not in wants and waits not in after, waits
    assert service["DevicePolicy"] == "closed"
    assert service["CapabilityBoundingSet"] == ""
    assert service["AmbientCapabilities"] == ""
    assert service["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert re.findall(r"(?m)^SystemCallFilter=(.*)$", text) == ["@system-service", "~@privileged @resources"]
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "gatewayd",
        "StateDirectoryMode": "0700",
    }.items():
        assert service[key] == value, key


def test_offline_exposure_score_is_at_most_2() -> None:
    # The booted-system figure is printed by the system test (systest/); this is the same analysis offline.
    unit_file = REPO / "systemd" / "gatewayd.service"
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Overall exposure level for gatewayd\.service: (\d+\.\d+)", out)
    assert m, out
    assert float(m.group(1)) <= 2.0
