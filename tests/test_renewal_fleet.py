"""Renewal with the aws-fleet-provisioning issuer over the gateway's own uplink, against the stand-in's
provisioning responder (AWS's topics and JSON): CreateCertificateFromCsr then RegisterThing with the ownership
token and the configured parameters; every rejection, silence and bad certificate leaves the gateway connected
on its old identity with nothing left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.service.control import request
from gatewayd_dev.gateway import Gateway, gateway_env, provision, standin_config, write_config
from gatewayd_dev.provisioner import CSR_TOPIC, Provisioner
from gatewayd_dev.sensor import Sensor, wait_until
from gatewayd_dev.stack import DevStack

THING = "gw-fleet"
TEMPLATE = "GatewayRenewal"


class Fleet:
    def __init__(self, workdir: Path, daemon: Gateway, responder: Provisioner) -> None:
        self.workdir, self.daemon, self.responder = workdir, daemon, responder

    def ctl(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return request(self.workdir / "control.sock", command, args)

    def renewal(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl("status")["uplink"]["renewal"]
        return result

    def renew_and_wait(self) -> dict[str, Any]:
        finished = self.renewal()["finishedSinceStart"]
        assert self.ctl("identity", {"action": "renew", "now": True})["started"]
        wait_until(lambda: self.renewal()["finishedSinceStart"] > finished, 60, "the renewal to end")
        last: dict[str, Any] = self.renewal()["last"]
        return last

    def certificate(self) -> str:
        return str(self.ctl("status")["uplink"]["certificateId"])

    def connected(self) -> bool:
        return bool(self.ctl("status")["uplink"]["state"] == "connected")


@pytest.fixture(scope="module")
def fleet(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    responder = Provisioner(devstack, TEMPLATE, THING, required_parameters=("SerialNumber",)).start()
    tables = standin_config(devstack, workdir, THING)
    tables["upstream"]["port"] = responder.port  # the responder's front: AWS answers only the asker
    tables["renewal"] = {
        "issuer": "aws-fleet-provisioning",
        "template_name": TEMPLATE,
        "issue_timeout": "3s",
        "trial_timeout": "20s",
    }
    config = write_config(workdir / "g.toml", tables)
    config.write_text(config.read_text() + '\n[renewal.parameters]\nSerialNumber = "0042"\nSite = "barn"\n')
    provision(devstack, config)
    daemon = Gateway(config, workdir, env=gateway_env(devstack))
    try:
        daemon.wait_ready()
        f = Fleet(workdir, daemon, responder)
        wait_until(f.connected, 20, "uplink")
        yield f
    finally:
        daemon.stop()
        responder.stop()


def test_renewal_through_fleet_provisioning(fleet: Fleet) -> None:
    fleet.responder.fault = None
    fleet.responder.requests.clear()
    before = fleet.certificate()
    last = fleet.renew_and_wait()
    assert last["result"] == "renewed", last
    wait_until(fleet.connected, 20, "reconnected")
    assert fleet.certificate() == last["certificateId"] != before
    topics = [t for t, _ in fleet.responder.requests]
    assert topics == [CSR_TOPIC, f"$aws/provisioning-templates/{TEMPLATE}/provision/json"]
    csr_request, register_request = (body for _, body in fleet.responder.requests)
    assert csr_request["certificateSigningRequest"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert register_request["parameters"] == {"SerialNumber": "0042", "Site": "barn"}
    assert fleet.responder.certificates[last["certificateId"]] == "ACTIVE"  # RegisterThing activated it
    subscriptions = fleet.ctl("status")["upstreamSubscriptions"]
    assert not any(s.startswith("$aws/") for s in subscriptions)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("reject-csr", "CreateCertificateFromCsr rejected: 400 InvalidCSR: The CSR was malformed"),
        ("reject-register", "RegisterThing rejected: 400 InvalidParametersException"),
        ("no-answer", "CreateCertificateFromCsr: no answer from AWS IoT within 3 s"),
        ("never-activate", "RegisterThing: no answer from AWS IoT within 3 s"),
        ("not-activated", "trial connection failed"),
        ("other-key", "does not match the gateway's key"),
        ("expired", "expired at"),
        ("wrong-thing", "RegisterThing provisioned thing 'someone-else', but this gateway is 'gw-fleet'"),
    ],
)
def test_every_service_failure_keeps_the_old_identity(fleet: Fleet, fault: str, reason: str) -> None:
    fleet.responder.fault = fault
    try:
        before = fleet.certificate()
        keys = sorted(p.name for p in (fleet.workdir / "state" / "identity" / "keys").iterdir())
        last = fleet.renew_and_wait()
        assert last["result"] == "failed" and reason in last["reason"], last
        wait_until(fleet.connected, 20, "the uplink on the old identity")
        assert fleet.certificate() == before
        assert sorted(p.name for p in (fleet.workdir / "state" / "identity" / "keys").iterdir()) == keys
    finally:
        fleet.responder.fault = None


def _client(devstack: DevStack, port: int, name: str) -> Sensor:
    """A paho client of the stand-in (its own device certificate) on the responder's endpoint."""
    files = devstack.standin.client_files(name)
    s = Sensor(name, port, devstack.standin.endpoint("rsa").root_file, files.cert, files.key)
    s.client.tls_insecure_set(True)  # the endpoint's certificate names the stand-in's host, not 127.0.0.1
    return s


def test_answers_go_only_to_the_connection_that_asked(fleet: Fleet, devstack: DevStack) -> None:
    """Issue 18, point 7: as AWS IoT, a provisioning answer reaches the connection that asked, and only if
    it subscribed to the answer's topic; another connection subscribed to the same topics gets nothing,
    even while the gateway renews through the same service."""
    fleet.responder.fault = None
    bystander = _client(devstack, fleet.responder.port, "bystander")
    asker = _client(devstack, fleet.responder.port, "asker")
    try:
        assert bystander.connect() == 0 and asker.connect() == 0
        answers = [
            f"{CSR_TOPIC}/accepted",
            f"{CSR_TOPIC}/rejected",
            "$aws/provisioning-templates/+/provision/json/+",
        ]
        assert bystander.subscribe_many(answers) == [1, 1, 1]
        undelivered = len(fleet.responder.undelivered)
        assert asker.publish(CSR_TOPIC, b"{}", qos=1) == 0  # not subscribed: AWS answers into the void
        wait_until(lambda: len(fleet.responder.undelivered) > undelivered, 10, "the answer nobody asked for")
        assert fleet.responder.undelivered[-1] == f"{CSR_TOPIC}/rejected"
        assert asker.subscribe(f"{CSR_TOPIC}/rejected") == [1]
        assert asker.publish(CSR_TOPIC, b"{}", qos=1) == 0
        wait_until(lambda: bool(asker.received), 10, "the answer to the asker")
        topic, payload, _ = asker.received[0]
        assert topic == f"{CSR_TOPIC}/rejected" and json.loads(payload)["errorCode"] == "InvalidCSR"
        last = fleet.renew_and_wait()  # the gateway's own requests and answers, on its own connection
        assert last["result"] == "renewed", last
        assert bystander.received == []  # nothing of the asker's nor of the gateway's
    finally:
        bystander.stop()
        asker.stop()


def test_an_ownership_token_expires_after_an_hour(fleet: Fleet) -> None:
    """RegisterThing with a token older than an hour is refused, as AWS IoT does (time is faked: every
    token is made to look an hour older)."""
    fleet.responder.token_age_offset = 3600
    try:
        before = fleet.certificate()
        last = fleet.renew_and_wait()
        assert last["result"] == "failed", last
        assert "RegisterThing rejected: 400 InvalidCertificateOwnershipToken" in last["reason"], last
        assert "expired" in last["reason"]
        wait_until(fleet.connected, 20, "the uplink on the old identity")
        assert fleet.certificate() == before
    finally:
        fleet.responder.token_age_offset = 0


def test_the_template_checks_its_parameters(fleet: Fleet) -> None:
    """A template parameter without a default that the gateway does not send: InvalidParametersException
    naming it (the gateway sends SerialNumber and Site, the template here also needs Region)."""
    fleet.responder.required_parameters = ("SerialNumber", "Region")
    try:
        last = fleet.renew_and_wait()
        assert last["result"] == "failed", last
        assert (
            "InvalidParametersException: template GatewayRenewal needs parameter(s) Region" in last["reason"]
        )
    finally:
        fleet.responder.required_parameters = ("SerialNumber",)
