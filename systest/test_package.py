"""The .deb as a user installs and runs it: `apt install ./gatewayd_*.deb` in a clean booted Debian, one
drop-in, `systemctl start gatewayd`, journald, reload, the watchdog, gatewayctl, an upgrade, remove and purge.

The tests of one target run in order on one container (each builds on the previous one's state).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.core import logevents
from gatewayd_dev.gateway import write_config

from .conftest import Debs, Target

THING = "gw-systest"
SYSTEMD_STARTED = "39f53479d3a045ac8e11786248231fbf"  # systemd's "unit started" job-done message
MODULES = "paho.mqtt, cryptography, tpm2_pytss, pyudev, systemd.journal, gatewayd"
STATE: dict[str, dict[str, Any]] = {}  # what one test of a target leaves for the next ones


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, explain: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{explain()}")
        time.sleep(0.5)


def why_not_connected(t: Target) -> str:
    """For a timed-out wait for the uplink: its status and the daemon's last log lines."""
    status = t.container.run(["gatewayctl", "status"], check=False)
    uplink = json.loads(status.stdout).get("uplink") if status.returncode == 0 else status.stderr
    logs = t.container.run(["journalctl", "--no-pager", "-u", "gatewayd", "-n", "40"], check=False).stdout
    return f"\nuplink: {uplink}\njournal:\n{logs}"


def ctl(t: Target, *args: str) -> Any:
    return json.loads(t.container.run(["gatewayctl", *args]).stdout)


def prop(t: Target, name: str) -> str:
    return t.container.run(["systemctl", "show", "-P", name, "gatewayd.service"]).stdout.strip()


def journal(t: Target, *args: str) -> list[dict[str, Any]]:
    out = t.container.run(["journalctl", "--no-pager", "-o", "json", *args]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def uplink_connected(t: Target) -> bool:
    result = t.container.run(["gatewayctl", "status"], check=False)
    return result.returncode == 0 and json.loads(result.stdout)["uplink"]["state"] == "connected"


def install(t: Target, deb: Any) -> None:
    t.container.write(f"/root/{deb.name}", deb.read_bytes())
    t.container.run(["apt-get", "install", "-y", "-q", f"/root/{deb.name}"], timeout=1200)


def put_config(t: Target, path: str, tables: dict[str, dict[str, Any]]) -> None:
    """A TOML drop-in written into the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        t.container.write(path, write_config(Path(tmp) / "x.toml", tables).read_bytes())


def installed_version(t: Target) -> str:
    return t.container.run(["dpkg-query", "-W", "-f=${Version}", "gatewayd"]).stdout


def test_apt_installs_the_package_with_debians_own_dependencies(target: Target, debs: Debs) -> None:
    t = target
    t.container.run(["apt-get", "update", "-q"], timeout=600)
    install(t, debs.previous)
    assert installed_version(t) == debs.previous_version
    # Enabled for the next boot, not started: it has no identity or endpoint yet.
    assert t.container.run(["systemctl", "is-enabled", "gatewayd"]).stdout.strip() == "enabled"
    assert t.container.run(["systemctl", "is-active", "gatewayd"], check=False).stdout.strip() == "inactive"
    groups = t.container.run(["id", "-nG", "gatewayd"]).stdout.split()
    assert "tss" in groups and "dialout" in groups, groups  # the TPM; USB serial sensors
    for path in ("/usr/bin/gatewayd", "/usr/bin/gatewayctl", "/usr/share/man/man8/gatewayd.8.gz",
                 "/usr/share/man/man8/gatewayctl.8.gz", "/usr/share/man/man5/gatewayd.toml.5.gz",
                 "/usr/lib/systemd/catalog/gatewayd.catalog"):  # fmt: skip
        assert t.container.exists(path), path
    assert t.container.is_dir("/etc/gatewayd/gatewayd.toml.d")
    conffiles = t.container.run(["dpkg-query", "-W", "-f=${Conffiles}", "gatewayd"]).stdout
    assert "/etc/gatewayd/gatewayd.toml " in conffiles
    # Every library from Debian's packages, none from PyPI.
    where = t.container.run(
        ["python3", "-c", f"import {MODULES}\nfor m in ({MODULES}): print(m.__file__)"]
    ).stdout.split()
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in where), where
    # The systemd package's trigger compiled the message catalog.
    listed = t.container.run(["journalctl", "--list-catalog", logevents.STARTED.id]).stdout
    assert "STARTED" in listed


def test_one_drop_in_a_certificate_and_systemctl_start(target: Target) -> None:
    t = target
    ep = t.standin.endpoint("rsa")
    t.container.write("/etc/gatewayd/standin-root.pem", ep.root_file.read_bytes())
    put_config(
        t,
        "/etc/gatewayd/gatewayd.toml.d/50-systest.toml",
        {
            "gateway": {"thing_name": THING},
            "identity": {"tcti": "tabrmd:bus_type=system"},
            "upstream": {
                "endpoint": ep.hostname,
                "port": ep.port,
                "connect_address": t.host_address,
                "validation_mode": "custom",
                "ca_file": "/etc/gatewayd/standin-root.pem",
            },
            "downstream": {"listener": [{"address": "127.0.0.1", "port": t.listener_port}]},
            "status": {"interval": 5},
        },
    )
    # Test-only unit settings: the debug control command that stalls the event loop, a short watchdog.
    t.container.write(
        "/etc/systemd/system/gatewayd.service.d/systest.conf",
        "[Service]\nEnvironment=GATEWAYD_DEBUG_COMMANDS=1\nWatchdogSec=6s\nRestartSec=1s\n",
    )
    t.container.run(["systemctl", "daemon-reload"])
    t.container.run(["gatewayd", "check-config"])

    # Provisioning by hand, as the README says, before the daemon ever ran (as root, offline).
    t.container.run(["gatewayctl", "identity", "create-key"], timeout=180)
    t.container.run(["gatewayctl", "identity", "create-csr", "--out", "/root/gateway.csr"], timeout=180)
    cert = t.standin.sign_csr(t.container.read("/root/gateway.csr"))
    t.container.write("/root/gateway.pem", cert)
    installed = ctl(t, "identity", "install-certificate", "/root/gateway.pem")

    t.container.run(["systemctl", "start", "gatewayd"], timeout=180)
    assert t.container.run(["systemctl", "is-active", "gatewayd"]).stdout.strip() == "active"
    # systemd considered the unit started only after the daemon's READY=1 (logged as STARTED just then).
    entries = journal(t, "-b", f"MESSAGE_ID={logevents.STARTED.id}", "+", f"MESSAGE_ID={SYSTEMD_STARTED}")
    ready = [e for e in entries if e.get("MESSAGE_ID") == logevents.STARTED.id]
    started = [
        e for e in entries if e.get("MESSAGE_ID") == SYSTEMD_STARTED and e.get("UNIT") == "gatewayd.service"
    ]
    assert ready and started, entries
    assert int(ready[0]["__MONOTONIC_TIMESTAMP"]) <= int(started[0]["__MONOTONIC_TIMESTAMP"])
    # The state directory came from StateDirectory=: 0700, handed to the daemon's user with what root wrote.
    assert t.container.run(["stat", "-c", "%U %a", "/var/lib/gatewayd"]).stdout.split() == ["gatewayd", "700"]
    assert t.container.run(["find", "/var/lib/gatewayd", "!", "-user", "gatewayd"]).stdout == ""
    wait_until("the uplink to connect", lambda: uplink_connected(t), 90, lambda: why_not_connected(t))
    status = ctl(t, "status")
    assert status["thingName"] == THING
    assert status["uplink"]["certificateId"] == installed["certificateId"]
    # The clock's state is read inside the unit's sandbox (ProtectClock=yes refuses even a read-only
    # adjtimex: the daemon falls back to timedated over D-Bus) without the daemon being harmed by it
    assert status["clock"]["source"] == "auto" and isinstance(status["clock"]["synchronized"], bool)
    STATE[t.name] = {"certificateId": installed["certificateId"]}


def test_journal_has_structured_fields_and_catalog_text(target: Target) -> None:
    t = target
    entries = journal(t, "-u", "gatewayd", f"MESSAGE_ID={logevents.STARTED.id}")
    assert entries, "no STARTED entry"
    e = entries[-1]
    assert e["SYSLOG_IDENTIFIER"] == "gatewayd"
    assert e["GATEWAYD_COMPONENT"] == "daemon"
    assert e["GATEWAYD_THING_NAME"] == THING
    assert e["PRIORITY"] == str(logevents.STARTED.priority.value)
    assert e["CODE_FILE"].endswith(".py") and e["CODE_FUNC"]
    explained = t.container.run(["journalctl", "--no-pager", "-x", "-u", "gatewayd"]).stdout
    assert logevents.STARTED.summary in explained
    assert "Subject: STARTED" in explained
    # Under the hardened unit the daemon subscribed to udev and rtnetlink (AF_NETLINK allowed).
    assert not journal(t, "-u", "gatewayd", f"MESSAGE_ID={logevents.HARDWARE_EVENTS_UNAVAILABLE.id}")


def test_gatewayctl_status_as_root_and_refused_for_others(target: Target) -> None:
    t = target
    assert ctl(t, "status")["state"]
    refused = t.container.run(["runuser", "-u", "nobody", "--", "gatewayctl", "status"], check=False)
    assert refused.returncode == 1, refused
    assert "ermission denied" in refused.stderr, refused.stderr


def test_systemctl_reload_applies_a_change(target: Target) -> None:
    t = target
    pid = prop(t, "MainPID")
    put_config(t, "/etc/gatewayd/gatewayd.toml.d/60-reload.toml", {"logging": {"level": "debug"}})
    t.container.run(["systemctl", "reload", "gatewayd"])

    def reloaded() -> bool:
        last = ctl(t, "status").get("lastReload") or {}
        return bool(last.get("applied")) and "logging.level" in last.get("changed", [])

    wait_until("the reload to apply logging.level", reloaded, 30)
    assert prop(t, "MainPID") == pid
    assert journal(t, "-u", "gatewayd", f"MESSAGE_ID={logevents.CONFIG_RELOADED.id}")


def test_watchdog_kills_a_hung_event_loop_and_systemd_restarts_it(target: Target) -> None:
    t = target
    pid, restarts = prop(t, "MainPID"), int(prop(t, "NRestarts"))
    # The daemon's event loop blocks for 60 s (a debug command enabled only by the test's unit drop-in).
    t.container.run(["setsid", "-f", "timeout", "70", "gatewayctl", "debug-stall-loop", "--seconds", "60"])
    wait_until(
        "the watchdog to kill and systemd to restart gatewayd",
        lambda: int(prop(t, "NRestarts")) > restarts and prop(t, "ActiveState") == "active",
        60,
    )
    assert prop(t, "MainPID") != pid
    logs = t.container.run(["journalctl", "--no-pager", "-u", "gatewayd", "-b"]).stdout
    assert "Watchdog timeout" in logs
    wait_until("the uplink to reconnect", lambda: uplink_connected(t), 90, lambda: why_not_connected(t))


def test_offline_registry_command_as_root_keeps_files_the_daemons(target: Target) -> None:
    t = target
    t.container.run(["systemctl", "stop", "gatewayd"], timeout=60)
    outfiles = ["--certificate-pem-outfile", "/root/s1.pem", "--private-key-outfile", "/root/s1.key"]
    made = ctl(t, "create-keys-and-certificate", "--set-as-active", *outfiles)
    assert t.container.run(["find", "/var/lib/gatewayd", "!", "-user", "gatewayd"]).stdout == ""
    t.container.run(["systemctl", "start", "gatewayd"], timeout=180)
    described = ctl(t, "describe-certificate", "--certificate-id", made["certificateId"])
    assert described["certificateDescription"]["status"] == "ACTIVE"
    STATE[t.name]["sensor"] = made["certificateId"]


def test_exposure_score_at_most_2(target: Target) -> None:
    t = target
    out = t.container.run(["systemd-analyze", "security", "--no-pager", "gatewayd.service"]).stdout
    m = re.search(r"Overall exposure level for gatewayd\.service: (\d+\.\d+)", out)
    assert m, out[-2000:]
    score = float(m.group(1))
    print(f"\n[{t.name}] systemd-analyze security gatewayd.service: exposure {score}")
    assert score <= 2.0


def test_an_invalid_config_exits_78_and_systemd_does_not_restart_it(target: Target) -> None:
    t = target
    bad = "/etc/gatewayd/gatewayd.toml.d/65-bad.toml"
    put_config(t, bad, {"upstream": {"port": 0}})
    restarts = int(prop(t, "NRestarts"))
    assert t.container.run(["systemctl", "restart", "gatewayd"], check=False, timeout=120).returncode != 0
    time.sleep(3)  # RestartSec=1s in the test's drop-in: a restart would have happened by now
    assert prop(t, "ActiveState") == "failed"
    assert prop(t, "ExecMainStatus") == "78"
    assert int(prop(t, "NRestarts")) == restarts
    assert journal(t, "-u", "gatewayd", f"MESSAGE_ID={logevents.CONFIG_INVALID.id}")
    t.container.remove(bad)
    t.container.run(["systemctl", "reset-failed", "gatewayd"])
    t.container.run(["systemctl", "start", "gatewayd"], timeout=120)
    wait_until("the uplink to connect", lambda: uplink_connected(t), 90, lambda: why_not_connected(t))


def test_a_listener_below_1024_needs_the_documented_capability_drop_in(target: Target) -> None:
    t = target
    low = "/etc/gatewayd/gatewayd.toml.d/70-lowport.toml"
    put_config(t, low, {"downstream": {"listener": [{"address": "127.0.0.1", "port": 883}]}})
    failed = t.container.run(["systemctl", "restart", "gatewayd"], check=False, timeout=120)
    assert failed.returncode != 0
    logs = t.container.run(["journalctl", "--no-pager", "-u", "gatewayd", "-n", "50"]).stdout
    assert "needs CAP_NET_BIND_SERVICE" in logs
    # The README's drop-in for the unit.
    caps = "/etc/systemd/system/gatewayd.service.d/lowport.conf"
    grant = "AmbientCapabilities=CAP_NET_BIND_SERVICE\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
    t.container.write(caps, "[Service]\n" + grant)
    t.container.run(["systemctl", "daemon-reload"])
    t.container.run(["systemctl", "reset-failed", "gatewayd"])
    t.container.run(["systemctl", "restart", "gatewayd"], timeout=120)
    probe = "import socket; socket.create_connection(('127.0.0.1', 883), 5).close()"
    t.container.run(["python3", "-c", probe])  # listening (checked inside: a VM has its own network)
    t.container.remove(low)
    t.container.remove(caps)
    t.container.run(["systemctl", "daemon-reload"])
    t.container.run(["systemctl", "restart", "gatewayd"], timeout=120)
    wait_until("the uplink to connect", lambda: uplink_connected(t), 90, lambda: why_not_connected(t))


def test_upgrade_keeps_config_identity_and_registry(target: Target, debs: Debs) -> None:
    t = target
    conffile = "/etc/gatewayd/gatewayd.toml"
    t.container.write(conffile, t.container.read(conffile) + b"\n# a local change the upgrade must keep\n")
    before_conf = t.container.read(conffile)
    dropin = t.container.read("/etc/gatewayd/gatewayd.toml.d/50-systest.toml")
    registry = ctl(t, "list-certificates")["certificates"]
    pid = prop(t, "MainPID")

    install(t, debs.current)

    assert installed_version(t) == debs.current_version
    assert t.container.read(conffile) == before_conf
    assert t.container.read("/etc/gatewayd/gatewayd.toml.d/50-systest.toml") == dropin
    assert t.container.run(["find", "/etc/gatewayd", "-name", "*.dpkg-*"]).stdout == ""
    wait_until("the restart", lambda: prop(t, "ActiveState") == "active" and prop(t, "MainPID") != pid, 60)
    wait_until(
        "the uplink to connect after the upgrade",
        lambda: uplink_connected(t),
        90,
        lambda: why_not_connected(t),
    )
    assert ctl(t, "identity", "show")["certificateId"] == STATE[t.name]["certificateId"]
    assert ctl(t, "list-certificates")["certificates"] == registry
    assert any(c["certificateId"] == STATE[t.name]["sensor"] for c in registry)


def test_remove_keeps_state_and_purge_deletes_it(target: Target) -> None:
    t = target
    t.container.run(["apt-get", "remove", "-y", "-q", "gatewayd"], timeout=300)
    assert prop(t, "ActiveState") in ("inactive", "")
    assert t.container.is_dir("/var/lib/gatewayd/identity")
    assert t.container.exists("/var/lib/gatewayd/registry.db")
    assert t.container.exists("/etc/gatewayd/gatewayd.toml")
    t.container.run(["apt-get", "purge", "-y", "-q", "gatewayd"], timeout=300)
    assert not t.container.exists("/var/lib/gatewayd")
    assert not t.container.exists("/etc/gatewayd/gatewayd.toml")
    # Drop-ins the administrator (or fleet tooling) wrote are theirs: purge leaves them.
    assert t.container.exists("/etc/gatewayd/gatewayd.toml.d/50-systest.toml")
    assert t.container.run(["id", "gatewayd"], check=False).returncode == 0  # system users stay
