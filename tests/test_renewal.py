"""Renewal with the `command` issuer against the stand-in: a new TPM key, a CSR, the certificate staged,
proven by a trial connection, promoted, the uplink switched over; failures discard what was made and the
gateway stays connected on its old identity; sensor messages published during a renewal all arrive
(issue 6, in progress).

Real parts: the daemon, swtpm, the stand-in (mosquitto, mutual TLS), a real issuing executable, paho sensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.observer import Observer
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack

from .conftest import REPO


@dataclass
class Renewing:
    stack: DevStack
    workdir: Path
    config: Path
    tables: dict[str, dict[str, Any]]
    daemon: Gateway

    def ctl(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return request(self.workdir / "control.sock", command, args)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl("status")
        return result

    def renewal(self) -> dict[str, Any]:
        result: dict[str, Any] = self.status()["uplink"]["renewal"]
        return result

    def renew(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl("identity", {"action": "renew", "now": True})
        return result

    def wait_idle(self, timeout: float = 60) -> dict[str, Any]:
        wait_until(lambda: self.renewal()["step"] == "IDLE", timeout, "the renewal to end")
        return self.renewal()

    def reconfigure(self, **renewal: Any) -> None:
        self.tables["renewal"].update(renewal)
        write_config(self.config, self.tables)
        # this reload's own line: lastReload.applied is already true from any earlier reload
        before = self.daemon.log().count("configuration reloaded")
        self.daemon.signal(1)
        wait_until(lambda: self.daemon.log().count("configuration reloaded") > before, 10, "reload")

    def files(self) -> tuple[list[str], list[str]]:
        ident = self.workdir / "state" / "identity"
        return sorted(p.name for p in (ident / "keys").iterdir()), sorted(
            p.name for p in (ident / "archive").iterdir()
        )

    def assert_nothing_added(self, before: tuple[list[str], list[str]]) -> None:
        """A failed renewal leaves no new key or staged version behind and keeps the live key.

        Not an equality: the previous version of an earlier renewal may be pruned meanwhile, when its
        rollback window (30 s here) ends during a slow failure.
        """
        keys, archive = self.files()
        live = str(self.ctl("identity", {"action": "show"})["key"]["number"])
        assert set(keys) <= set(before[0]) and set(archive) <= set(before[1]), (before, (keys, archive))
        assert live in keys, (live, keys)


@pytest.fixture(scope="module")
def gw(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Renewing]:
    workdir = tmp_path_factory.mktemp("renewal")
    tables = standin_config(devstack, workdir, "gw-renew", downstream={"auto_activate": True})
    tables["renewal"] = {
        "issuer": "command",
        "command": devstack.standin.issue_command("--minutes", "600"),
        "trial_timeout": "20s",
        "rollback_window": "30s",
    }
    config = write_config(workdir / "g.toml", tables)
    provision(devstack, config)
    env = {**gateway_env(devstack), "PYTHONPATH": str(REPO)}
    daemon = Gateway(config, workdir, env=env)
    try:
        daemon.wait_ready()
        g = Renewing(devstack, workdir, config, tables, daemon)
        wait_until(lambda: g.status()["uplink"]["state"] == "connected", 20, "uplink")
        yield g
    finally:
        daemon.stop()


def test_renewal_switches_over_without_losing_sensor_messages(gw: Renewing) -> None:
    before = gw.status()["uplink"]["certificateId"]
    keys_before, _ = gw.files()
    sensor_ca = pki.make_root("Renewal Sensor CA", "ecc")
    register_ca(gw.config, sensor_ca, auto_registration=True)
    issued = pki.make_client(sensor_ca, "s-renew")
    cert = pki.write(gw.workdir / "s.pem", issued.cert_pem())
    key = pki.write(gw.workdir / "s.key", issued.key_pem(), 0o600)
    port = gw.tables["downstream"]["listener"][0]["port"]
    obs = Observer(gw.stack, "gw-renew/sensors/s-renew/#", gw.workdir / "renew-obs.txt")
    events = Observer(gw.stack, "gatewayd/gw-renew/events/identity", gw.workdir / "identity-events.txt")
    sensor = Sensor("s-renew", port, gw.workdir / "state" / "localca" / "ca.pem", cert, key)
    try:
        assert sensor.connect() == 0
        assert gw.renew()["started"] is True
        sent = 0
        while gw.renewal()["step"] != "IDLE" or sent < 20:  # publish all through the renewal
            assert sensor.publish("sensors/s-renew/n", str(sent).encode(), qos=1, timeout=30) == 0
            sent += 1
            assert sent < 2000
        result = gw.wait_idle()
        assert result["last"]["result"] == "renewed", result
        wait_until(lambda: gw.status()["uplink"]["state"] == "connected", 20, "reconnected")
        after = gw.status()["uplink"]
        assert after["certificateId"] == result["last"]["certificateId"] != before
        lines = obs.wait(sent, timeout=30)
        got = [int(line.split(" ", 1)[1]) for line in lines]
        assert sorted(set(got)) == list(range(sent)), "a sensor message was lost during the renewal"
        print(
            f"\n{sent} sensor messages during the renewal, {len(got) - len(set(got))} duplicated, none lost"
        )
        # issue 18, point 5: the identity event names the certificate no longer used, for a cloud rule
        (line,) = events.wait()
        event = json.loads(line.split(" ", 1)[1])
        assert event["event"] == "promoted" and event["thingName"] == "gw-renew"
        assert event["oldCertificateId"] == event["unusedCertificateId"] == before
        assert event["newCertificateId"] == event["activeCertificateId"] == after["certificateId"]
    finally:
        sensor.stop()
        obs.stop()
        events.stop()
    keys_after, _ = gw.files()
    assert len(keys_after) == len(keys_before) + 1  # a new key (rotate_key), the old one kept for rollback
    shown = gw.ctl("identity", {"action": "show"})
    assert shown["pendingKey"] is None and not any(v["staged"] for v in shown["versions"])
    assert "renewal: certificate" in gw.daemon.log() and "promoted" in gw.daemon.log()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("exit", "exited with status 3"),
        ("garbage", "did not print a certificate"),
        ("other-key", "does not match the gateway's key"),
        ("expired", "expired at"),
    ],
)
def test_issuer_failures_discard_and_stay_connected(gw: Renewing, fault: str, reason: str) -> None:
    gw.wait_idle()
    before = gw.status()["uplink"]["certificateId"]
    files_before = gw.files()
    gw.reconfigure(command=gw.stack.standin.issue_command("--fault", fault))
    try:
        gw.renew()
        wait_until(lambda: (gw.renewal()["last"] or {}).get("reason", "").find(reason) >= 0, 60, reason)
        result = gw.wait_idle()
        assert result["last"]["result"] == "failed" and result["failedAttempts"] >= 1
        assert gw.status()["uplink"]["certificateId"] == before
        assert gw.status()["uplink"]["state"] == "connected"
        gw.assert_nothing_added(files_before)  # the new key and anything staged are gone
    finally:
        gw.reconfigure(command=gw.stack.standin.issue_command("--minutes", "600"))


def test_a_certificate_aws_would_refuse_fails_its_trial(gw: Renewing, tmp_path: Path) -> None:
    """A certificate from a CA the endpoint does not know: the trial fails, nothing goes live."""
    gw.wait_idle()
    other = pki.make_root("Unknown CA", "ecc")
    ca = pki.write(tmp_path / "other.pem", other.cert_pem())
    ca_key = pki.write(tmp_path / "other.key", other.key_pem(), 0o600)
    command = gw.stack.standin.issue_command()
    command[command.index("--ca-cert") + 1] = str(ca)
    command[command.index("--ca-key") + 1] = str(ca_key)
    before = gw.status()["uplink"]["certificateId"]
    files_before = gw.files()
    gw.reconfigure(command=command)
    events = Observer(gw.stack, "gatewayd/gw-renew/events/identity", gw.workdir / "abandoned.txt")
    try:
        gw.renew()
        wait_until(
            lambda: "trial connection failed" in ((gw.renewal()["last"] or {}).get("reason") or ""),
            60,
            "trial",
        )
        gw.wait_idle()
        gw.assert_nothing_added(files_before)
        wait_until(lambda: gw.status()["uplink"]["state"] == "connected", 20, "back on the old identity")
        assert gw.status()["uplink"]["certificateId"] == before
        assert "trial connection with certificate" in gw.daemon.log()
        # the certificate issued and never used (an orphan in AWS IoT, with fleet provisioning) is named
        (line,) = events.wait()
        event = json.loads(line.split(" ", 1)[1])
        assert event["event"] == "abandoned" and event["activeCertificateId"] == before
        assert event["unusedCertificateId"] not in (None, before) and "trial" in event["reason"]
    finally:
        events.stop()
        gw.reconfigure(command=gw.stack.standin.issue_command("--minutes", "600"))


def test_status_shows_the_schedule_and_renew_refuses_when_off(gw: Renewing) -> None:
    gw.wait_idle()
    renewal = gw.renewal()
    assert renewal["issuer"] == "command" and renewal["nextRenewal"] is not None
    state = json.loads((gw.workdir / "state" / "renewal.json").read_text())
    assert state["step"] == "IDLE"
    gw.reconfigure(issuer="")
    try:
        with pytest.raises(Exception, match="automatic renewal is off"):
            gw.renew()
    finally:
        gw.reconfigure(issuer="command")


def test_age_trigger_renews_a_certificate_far_from_expiry(gw: Renewing) -> None:
    """Issue 18, point 5: renewal.max_age renews a certificate that is far from expiry (10 h left of 10 h
    here, 2049 with AWS IoT) once it is older than max_age; status says why (dueBy)."""
    gw.wait_idle()
    assert gw.renewal()["dueBy"] == "expiry"  # 600-minute certificates, max_age 365 days by default
    gw.renew()  # a successful renewal first: earlier tests' failures leave a retry backoff pending
    assert gw.wait_idle()["last"]["result"] == "renewed"
    before = gw.status()["uplink"]["certificateId"]
    gw.reconfigure(max_age="20s")
    try:
        assert gw.renewal()["dueBy"] == "age"
        wait_until(lambda: gw.status()["uplink"]["certificateId"] != before, 90, "a renewal by age")
        gw.reconfigure(max_age="365d")  # else the new certificate would be renewed again in 20 s
        result = gw.wait_idle()
        assert result["last"]["result"] == "renewed", result
        assert result["dueBy"] == "expiry"
    finally:
        gw.reconfigure(max_age="365d")


def test_trial_with_its_own_client_id_keeps_the_uplink_running(gw: Renewing) -> None:
    gw.wait_idle()
    gw.reconfigure(trial_client_id="gw-renew-trial")
    try:
        before = gw.status()["uplink"]["certificateId"]
        log_before = len(gw.daemon.log())
        assert gw.renew()["started"] is True
        result = gw.wait_idle()
        assert result["last"]["result"] == "renewed" and result["last"]["certificateId"] != before
        wait_until(lambda: gw.status()["uplink"]["state"] == "connected", 20, "connected")
        during = gw.daemon.log()[log_before:]
        assert "to switch or prove the identity" in during  # one switch-over, after the promotion
        assert "Uplink suspended" not in during and "suspended" not in json.dumps(gw.status())
    finally:
        gw.reconfigure(trial_client_id="")


def test_rotate_key_false_reuses_the_live_key(gw: Renewing) -> None:
    gw.wait_idle()
    key_before = gw.ctl("identity", {"action": "show"})["key"]["number"]
    keys_before, _ = gw.files()
    gw.reconfigure(rotate_key=False)
    try:
        assert gw.renew()["started"] is True
        result = gw.wait_idle()
        assert result["last"]["result"] == "renewed", result
        shown = gw.ctl("identity", {"action": "show"})
        assert (
            shown["key"]["number"] == key_before and shown["certificateId"] == result["last"]["certificateId"]
        )
        before_failure = gw.files()
        keys_after = before_failure[0]
        assert (
            set(keys_after) <= set(keys_before) and str(key_before) in keys_after
        )  # no new key (old ones pruned)
        gw.reconfigure(command=gw.stack.standin.issue_command("--fault", "exit"))
        gw.renew()
        wait_until(lambda: (gw.renewal()["last"] or {}).get("result") == "failed", 60, "the failure")
        gw.wait_idle()
        gw.assert_nothing_added(before_failure)  # a failure never removes the key in use
        wait_until(lambda: gw.status()["uplink"]["state"] == "connected", 20, "connected")
    finally:
        gw.reconfigure(rotate_key=True, command=gw.stack.standin.issue_command("--minutes", "600"))
