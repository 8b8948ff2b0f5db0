"""Under systemd, records reach journald with their structured fields and MESSAGE_IDs.

Uses a real systemd-journald, started in a private mount namespace so the host's journal is untouched.
Needs root (CI runs as root); a developer not running as root is asked for sudo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gatewayd.core import logevents
from gatewayd_dev.gateway import write_config

from .conftest import REPO, base_config


def run_in_namespace(tmp_path: Path) -> list[dict[str, Any]]:
    good = write_config(tmp_path / "good.toml", base_config(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nthing_name = 'bad name'\n")
    for sub in ("good", "bad"):
        (tmp_path / sub).mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env=PYTHONPATH"]
    result = subprocess.run(
        [
            *sudo,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "tests.helpers.journal_ns",
            str(tmp_path),
            str(good),
            str(bad),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, f"journal namespace run failed:\n{result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_structured_fields_and_message_ids_reach_journald(tmp_path: Path) -> None:
    entries = run_in_namespace(tmp_path)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_id.setdefault(entry.get("MESSAGE_ID", ""), []).append(entry)

    (started,) = by_id[logevents.STARTED.id]
    assert started["MESSAGE"] == "gatewayd 0.1.0 ready (thing gw-test)"
    assert started["GATEWAYD_COMPONENT"] == "daemon"
    assert started["GATEWAYD_THING_NAME"] == "gw-test"
    assert started["PRIORITY"] == str(int(logevents.STARTED.priority))  # NOTICE (logged at INFO)
    assert started["SYSLOG_IDENTIFIER"] == "gatewayd"
    assert started["CODE_FUNC"] == "run"

    for msg in (logevents.CONFIG_RELOADED, logevents.STOPPING, logevents.STOPPED):
        assert len(by_id[msg.id]) == 1, msg.name

    invalid = by_id[logevents.CONFIG_INVALID.id]
    assert len(invalid) == 2  # the bad thing name and the missing endpoint
    assert all(e["PRIORITY"] == "3" for e in invalid)
    assert {e["MESSAGE"] for e in invalid} == {
        f"invalid configuration: {tmp_path / 'bad.toml'}:upstream.endpoint: required key is missing",
        f"invalid configuration: {tmp_path / 'bad.toml'}:gateway.thing_name: "
        "must be 1-128 characters of letters, digits, ':', '_' or '-' (AWS IoT thing name rules)",
    }

    control = [e for e in entries if e.get("GATEWAYD_COMPONENT") == "control"]
    assert any(e["MESSAGE"].startswith("control socket listening on ") for e in control), control
    # Under systemd, nothing goes to stderr as plain lines (it would be a duplicate in the journal).
    assert all(e.get("_TRANSPORT") == "journal" for e in entries)
