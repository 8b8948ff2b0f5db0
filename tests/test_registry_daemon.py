"""The registry through `gatewayctl` against running daemons: the AWS IoT developer guide's certificate
workflow, the listener obeying every status at once (third-party clients disconnected within a second),
auto-registration, a transfer between two gateways, the offline fallback, and who may use the control socket.

Real parts: two daemons with TPM-held uplinks to the stand-in, mutual TLS on 127.0.0.1, gatewayctl as a
separate process, mosquitto_sub and paho-mqtt as sensors.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.core.commands import BY_NAME
from gatewayd.core.mqtt.codec import Decoder, encode
from gatewayd.core.mqtt.packets import MQTT_311, Connack, Connect
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import (
    Gateway,
    gateway_env,
    gatewayctl,
    provision,
    register_ca,
    standin_config,
    write_config,
)
from gatewayd_dev.observer import Observer
from gatewayd_dev.sensor import PAHO2, Sensor, wait_until
from gatewayd_dev.stack import DevStack

# How the AWS CLI prints a service's refusal (awscli's error handler: a blank line, then this).
AWS_ERROR = re.compile(
    r"\nAn error occurred \((?P<name>\w+)\) when calling the (?P<operation>\w+) operation: (?P<message>.+)\n"
)


def operation_of(command: str) -> str:
    return BY_NAME[command].operation


@dataclass
class Gw:
    thing: str
    workdir: Path
    config: Path
    port: int
    daemon: Gateway | None

    @property
    def ca_file(self) -> Path:
        return self.workdir / "state" / "localca" / "ca.pem"

    def ctl(self, *args: str) -> Any:
        return gatewayctl(self.config, *args)

    def fails(self, *args: str, code: int = 254) -> str:
        """Run gatewayctl expecting a refusal, nothing on stdout. A refusal by the registry (exit 254) is
        printed as the AWS CLI prints a service error; returned as "ExceptionName: message". Otherwise
        (252: usage) one line on stderr, returned as it is."""
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == code, result
        assert result.stdout == "", result
        if code == 254:
            aws = AWS_ERROR.fullmatch(result.stderr)
            assert aws and aws["operation"] == operation_of(args[0]), result.stderr
            return f"{aws['name']}: {aws['message']}"
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr.strip()

    def request(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return request(self.workdir / "control.sock", command, args)

    def files(self, pem_name: str) -> tuple[Path, Path]:
        return self.workdir / f"{pem_name}.pem", self.workdir / f"{pem_name}.key"

    def sensor(self, name: str, mqtt5: bool = True, client_id: str | None = None) -> Sensor:
        cert, key = self.files(name)
        return Sensor(client_id or name, self.port, self.ca_file, cert, key, mqtt5)


def _start(devstack: DevStack, workdir: Path, thing: str, uplink: bool = True, **downstream: Any) -> Gw:
    workdir.mkdir(parents=True, exist_ok=True)
    tables = standin_config(devstack, workdir, thing, downstream=downstream)
    tables["downstream.policy"] = {
        "publish": ["sensors/${iot:ClientId}/#"],
        "subscribe": ["commands/${iot:ClientId}/#", "$aws/events/certificates/registered/+"],
    }
    config = write_config(workdir / "g.toml", tables)
    if uplink:
        provision(devstack, config)
    daemon = Gateway(config, workdir, env=gateway_env(devstack))
    daemon.wait_ready()
    return Gw(thing, workdir, config, tables["downstream"]["listener"][0]["port"], daemon)


@pytest.fixture(scope="module")
def gw(devstack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    g = _start(devstack, tmp_path_factory.mktemp("registry-a"), "gw-reg-a")
    try:
        wait_until(lambda: g.request("status")["uplink"]["state"] == "connected", 20, "uplink")
        yield g
    finally:
        assert g.daemon is not None
        g.daemon.stop()


def _issue(gw: Gw, ca: pki.Issued, name: str) -> Path:
    issued = pki.make_client(ca, name)
    cert, key = gw.files(name)
    pki.write(cert, issued.cert_pem())
    pki.write(key, issued.key_pem(), 0o600)
    return cert


def _create(gw: Gw, name: str, *flags: str) -> dict[str, Any]:
    cert, key = gw.files(name)
    out: dict[str, Any] = gw.ctl(
        "create-keys-and-certificate",
        "--common-name",
        name,
        "--certificate-pem-outfile",
        str(cert),
        "--private-key-outfile",
        str(key),
        *flags,
    )
    return out


def _raw_311(gw: Gw, name: str) -> int:
    """CONNECT over 3.1.1 with our own codec (paho 2.x reports 3.1.1 codes as 5.0 ones); the CONNACK code."""
    cert, key = gw.files(name)
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", gw.port), 10), server_hostname="127.0.0.1"
    ) as s:
        s.settimeout(10)
        s.sendall(encode(Connect(name, MQTT_311), MQTT_311))
        data = s.recv(4)
        if not data:
            raise ConnectionResetError("closed without CONNACK")
        (connack,) = Decoder(MQTT_311).feed(data)
        assert isinstance(connack, Connack)
        return int(connack.reason_code)


def _status(gw: Gw, cid: str) -> str:
    return str(gw.ctl("describe-certificate", "--certificate-id", cid)["certificateDescription"]["status"])


def test_create_keys_and_certificate_then_connect(gw: Gw) -> None:
    out = _create(gw, "made-1", "--set-as-active")
    cert, key = gw.files("made-1")
    assert cert.read_text() == out["certificatePem"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_text() == out["keyPair"]["PrivateKey"]
    assert out["certificateArn"] == f"arn:gatewayd:gw-reg-a:cert/{out['certificateId']}"
    desc = gw.ctl("describe-certificate", "--certificate-id", out["certificateId"])["certificateDescription"]
    assert desc["status"] == "ACTIVE" and desc["validity"]["notAfter"] == "2049-12-31T23:59:59+00:00"
    s = gw.sensor("made-1")
    try:
        assert s.connect() == 0 and s.publish("sensors/made-1/t", b"1") == 0
    finally:
        s.stop()
    inactive = _create(gw, "made-2")
    assert _status(gw, inactive["certificateId"]) == "INACTIVE"
    s2 = gw.sensor("made-2")
    try:
        assert s2.connect() == 0x87  # INACTIVE: Not authorized
    finally:
        s2.stop()
    assert _raw_311(gw, "made-2") == 5  # 3.1.1: not authorized
    assert f"certificate {inactive['certificateId']} is INACTIVE" in gw.daemon.log()  # type: ignore[union-attr]


def test_create_certificate_from_csr_then_connect_with_the_sensors_own_key(gw: Gw) -> None:
    """Issue 18, point 4: the key stays with the sensor (a secure element); only its CSR travels."""
    name = "secure-1"
    cert, key_file = gw.files(name)
    key = pki.new_key("ecc")
    pki.write(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)  # fmt: skip
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )  # type: ignore[arg-type]
    csr_file = gw.workdir / f"{name}.csr"
    csr_file.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = gw.ctl(
        "create-certificate-from-csr", "--certificate-signing-request", f"file://{csr_file}",
        "--set-as-active", "--certificate-pem-outfile", str(cert),
    )  # fmt: skip
    assert set(out) == {"certificateArn", "certificateId", "certificatePem"}
    assert cert.read_text() == out["certificatePem"]
    s = gw.sensor(name)
    try:
        assert s.connect() == 0 and s.publish(f"sensors/{name}/t", b"1") == 0
    finally:
        s.stop()
    no_cn = gw.workdir / "no-cn.csr"
    no_cn.write_bytes(
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(pki.new_key("ecc"), hashes.SHA256())  # type: ignore[arg-type]
        .public_bytes(serialization.Encoding.PEM)
    )
    assert "has no CN" in gw.fails(
        "create-certificate-from-csr", "--certificate-signing-request", f"file://{no_cn}"
    )


def test_ca_workflow_and_every_input_check(gw: Gw) -> None:
    ca = pki.make_root("Plant CA", "ecc")
    ca_file = pki.write(gw.workdir / "plant-ca.pem", ca.cert_pem())
    code = gw.ctl("get-registration-code")["registrationCode"]
    wrong = pki.write(gw.workdir / "plant-wrong.pem", pki.make_client(ca, "not-the-code").cert_pem())
    impostor = pki.make_root("Plant CA", "ecc")
    forged = pki.write(gw.workdir / "plant-forged.pem", pki.make_client(impostor, code).cert_pem())
    args = ["register-ca-certificate", "--ca-certificate", str(ca_file), "--verification-certificate"]
    assert "RegistrationCodeValidationException: the verification" in gw.fails(*args, str(wrong))
    assert "proof of possession" in gw.fails(*args, str(forged))
    device = _issue(gw, ca, "plant-1")
    assert "not a CA certificate" in gw.fails(
        "register-ca-certificate", "--ca-certificate", str(device), "--verification-certificate", str(device)
    )
    junk = gw.workdir / "junk.pem"
    junk.write_text("hello\n")
    assert "PEM" in gw.fails(*args[:2], str(junk), args[3], str(device))
    missing = gw.workdir / "missing.pem"
    assert "cannot read" in gw.fails(*args[:2], f"file://{missing}", args[3], str(device), code=252)
    ca_id = register_ca(gw.config, ca, active=False)
    assert "ResourceAlreadyExistsException: CA certificate" in gw.fails(
        "register-ca-certificate",
        "--ca-certificate",
        f"file://{ca_file}",
        "--verification-certificate",
        str(pki.write(gw.workdir / "v2.pem", pki.make_client(ca, code).cert_pem())),
    )
    described = gw.ctl("describe-ca-certificate", "--certificate-id", ca_id)["certificateDescription"]
    assert described["status"] == "INACTIVE" and described["autoRegistrationStatus"] == "DISABLE"
    assert ca_id in [c["certificateId"] for c in gw.ctl("list-ca-certificates")["certificates"]]
    # a device certificate needs its CA registered and ACTIVE
    assert "CertificateStateException: CA certificate" in gw.fails(
        "register-certificate", "--certificate-pem", str(device)
    )
    gw.ctl("update-ca-certificate", "--certificate-id", ca_id, "--new-status", "ACTIVE")
    stranger = _issue(gw, pki.make_root("Other CA", "ecc"), "stranger")
    assert "CA is not registered" in gw.fails("register-certificate", "--certificate-pem", str(stranger))
    three_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = pki.make_client(ca, "old", validity=pki.Validity.days(1, three_days_ago))
    old = pki.write(gw.workdir / "old.pem", expired.cert_pem())
    assert "CertificateValidationException: the certificate expired at" in gw.fails(
        "register-certificate", "--certificate-pem", str(old)
    )
    cid = gw.ctl(
        "register-certificate",
        "--certificate-pem",
        f"file://{device}",
        "--ca-certificate-pem",
        str(ca_file),
        "--status",
        "ACTIVE",
    )["certificateId"]
    assert "already registered" in gw.fails("register-certificate", "--certificate-pem", str(device))
    assert "--status must be ACTIVE or INACTIVE" in gw.fails(
        "register-certificate", "--certificate-pem", str(_issue(gw, ca, "plant-2")), "--status", "REVOKED"
    )
    by_ca = gw.ctl("list-certificates-by-ca", "--ca-certificate-id", ca_id)["certificates"]
    assert [c["certificateId"] for c in by_ca] == [cid]
    delete_ca = ["delete-ca-certificate", "--certificate-id", ca_id]
    assert "CertificateStateException: an ACTIVE CA certificate cannot be deleted" in gw.fails(*delete_ca)
    gw.ctl("update-ca-certificate", "--certificate-id", ca_id, "--new-status", "INACTIVE")
    assert "referenced by 1 device certificate" in gw.fails(*delete_ca)
    assert "CertificateStateException: an ACTIVE certificate cannot be deleted" in gw.fails(
        "delete-certificate", "--certificate-id", cid
    )
    assert "ResourceNotFoundException: no certificate with id" in gw.fails(
        "describe-certificate", "--certificate-id", "0" * 64
    )
    assert "InvalidRequestException: --new-status must be one of" in gw.fails(
        "update-certificate", "--certificate-id", cid, "--new-status", "PENDING_TRANSFER"
    )
    gw.ctl("update-certificate", "--certificate-id", cid, "--new-status", "REVOKED")
    assert "CertificateStateException: the certificate is REVOKED, which is final" in gw.fails(
        "update-certificate", "--certificate-id", cid, "--new-status", "ACTIVE"
    )
    assert gw.ctl("delete-certificate", "--certificate-id", cid) == {}
    assert gw.ctl(*delete_ca) == {}
    assert "ResourceNotFoundException: no CA certificate" in gw.fails(
        "describe-ca-certificate", "--certificate-id", ca_id
    )


def test_list_certificates_pages(gw: Gw) -> None:
    """As `aws iot list-certificates`: every certificate by default (here 27, more than a page of 25),
    --max-items and NextToken / --starting-token to go on, --no-paginate for one raw page with nextMarker,
    --page-size only the size of each request."""
    for i in range(27):  # by the control socket: quicker than 27 gatewayctl processes
        gw.request("create-keys-and-certificate", {"commonName": f"paged-{i}"})
    everything = [c["certificateId"] for c in gw.ctl("list-certificates")["certificates"]]
    assert len(everything) == len(set(everything)) >= 27
    assert "NextToken" not in gw.ctl("list-certificates")
    oldest_first = gw.ctl("list-certificates", "--ascending-order", "--page-size", "4")
    assert [c["certificateId"] for c in oldest_first["certificates"]] == everything[::-1]
    collected: list[str] = []
    token: list[str] = []
    for _ in range(30):  # bounded: 10 at a time
        part = gw.ctl("list-certificates", "--max-items", "10", *token)
        assert len(part["certificates"]) <= 10
        collected += [c["certificateId"] for c in part["certificates"]]
        if "NextToken" not in part:
            break
        token = ["--starting-token", part["NextToken"]]
    assert collected == everything
    raw = gw.ctl("list-certificates", "--no-paginate")
    assert len(raw["certificates"]) == 25 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", raw["nextMarker"])
    rest = gw.ctl("list-certificates", "--no-paginate", "--starting-token", raw["nextMarker"])
    assert [c["certificateId"] for c in raw["certificates"] + rest["certificates"]] == everything
    item = raw["certificates"][0]
    assert set(item) == {"certificateArn", "certificateId", "status", "certificateMode", "creationDate"}
    assert dt.datetime.fromisoformat(item["creationDate"]).utcoffset() == dt.timedelta(0)
    assert len(gw.ctl("list-ca-certificates")["certificates"]) >= 1
    assert "InvalidRequestException: --page-size must be between 1 and 250" in gw.fails(
        "list-certificates", "--page-size", "0"
    )
    assert "invalid --starting-token" in gw.fails("list-certificates", "--starting-token", "no!")
    assert "--max-items must be at least 1" in gw.fails("list-certificates", "--max-items", "0", code=252)
    assert "unrecognized arguments: --marker" in gw.fails("list-certificates", "--marker", "x", code=252)


@pytest.mark.parametrize("how", ["deactivate", "revoke", "ca"])
def test_live_revocation_disconnects_a_third_party_client_within_a_second(
    gw: Gw, how: str, devstack: DevStack
) -> None:
    ca = pki.make_root(f"Live CA {how}", "ecc")
    ca_id = register_ca(gw.config, ca)
    name = f"live-{how}"
    cert = _issue(gw, ca, name)
    cid = gw.ctl("register-certificate", "--certificate-pem", str(cert), "--status", "ACTIVE")[
        "certificateId"
    ]
    _, key = gw.files(name)
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(gw.port),
            "--cafile",
            str(gw.ca_file),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "-i",
            name,
            "-t",
            f"commands/{name}/#",
            "-V",
            "mqttv311",
            "--will-topic",
            f"sensors/{name}/will",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wills = Observer(devstack, f"gw-reg-a/sensors/{name}/will", gw.workdir / f"wills-{name}.txt")
    try:
        wait_until(
            lambda: name in [c["clientId"] for c in gw.request("list-connections")["connections"]],
            10,
            "mosquitto_sub connected",
        )
        t0 = time.monotonic()
        if how == "ca":
            gw.request("update-ca-certificate", {"certificateId": ca_id, "newStatus": "INACTIVE"})
        else:
            new_status = {"deactivate": "INACTIVE", "revoke": "REVOKED"}[how]
            gw.request("update-certificate", {"certificateId": cid, "newStatus": new_status})
        gone = time.monotonic() - t0  # the command returns once the connection is closed
        assert name not in [c["clientId"] for c in gw.request("list-connections")["connections"]]
        sub.wait(10)  # mosquitto_sub notices, reconnects, is refused, and exits
        _, err = sub.communicate(timeout=5)
        assert sub.returncode != 0 and "not authorised" in err.lower(), err
        print(f"\n{how}: connection closed {gone * 1000:.0f} ms after the command was sent")
        assert gone < 1.0
        assert f"disconnecting sensor {name}:" in gw.daemon.log()  # type: ignore[union-attr]
        time.sleep(1.0)  # a will would be upstream well within this (issue 17, item 11: none is)
        assert wills.lines() == []
        paho5 = gw.sensor(name)  # the same certificate over MQTT 5.0
        try:
            assert paho5.connect() == 0x87
        finally:
            paho5.stop()
    finally:
        wills.stop()
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def test_a_connected_mqtt5_sensor_gets_disconnect_0x87(gw: Gw) -> None:
    out = _create(gw, "live-5", "--set-as-active")
    s = gw.sensor("live-5")
    try:
        assert s.connect() == 0
        gw.request("update-certificate", {"certificateId": out["certificateId"], "newStatus": "INACTIVE"})
        wait_until(lambda: bool(s.disconnects), 1.0, "DISCONNECT")
        if PAHO2:  # paho 1.6 reports the closed socket (7), not the DISCONNECT's reason code
            assert s.disconnects[0] == 0x87
    finally:
        s.stop()
    gw.ctl("update-certificate", "--certificate-id", out["certificateId"], "--new-status", "ACTIVE")
    again = gw.sensor("live-5")
    try:
        assert again.connect() == 0  # reactivated: admitted again without a restart
    finally:
        again.stop()


def test_certificate_registered_without_ca_is_trusted_at_once(gw: Gw) -> None:
    issued = pki.make_self_signed_client("selfie")
    cert, key = gw.files("selfie")
    pki.write(cert, issued.cert_pem())
    pki.write(key, issued.key_pem(), 0o600)
    with pytest.raises((ssl.SSLError, ConnectionError)) as refused:  # unknown to TLS before it is registered
        _raw_311(gw, "selfie")
    assert "unknown ca" in str(refused.value).lower() or isinstance(refused.value, ConnectionError)
    out = gw.ctl("register-certificate-without-ca", "--certificate-pem", str(cert), "--status", "ACTIVE")
    assert (
        gw.ctl("describe-certificate", "--certificate-id", out["certificateId"])["certificateDescription"][
            "certificateMode"
        ]
        == "SNI_ONLY"
    )
    s = gw.sensor("selfie")
    try:
        assert s.connect() == 0
    finally:
        s.stop()


JITR_MEMBERS = {
    "certificateId",
    "caCertificateId",
    "timestamp",
    "certificateStatus",
    "awsAccountId",
    "certificateRegistrationTimestamp",
}  # AWS IoT developer guide, "Just-in-time registration"


def test_auto_registration_jitr_then_activation(gw: Gw, devstack: DevStack) -> None:
    """Issue 18, point 3: the JITR event as AWS IoT publishes it, locally on
    $aws/events/certificates/registered/<caCertificateId> and upstream under the gateway's thing name, at
    the first connection and again at every attempt while PENDING_ACTIVATION; none once ACTIVE."""
    ca = pki.make_root("Auto CA", "ecc")
    ca_id = register_ca(gw.config, ca, auto_registration=True)
    _issue(gw, ca, "jitr-1")
    _create(gw, "agent-1", "--set-as-active")  # a local provisioning agent
    agent = gw.sensor("agent-1")
    obs = Observer(devstack, "gatewayd/gw-reg-a/events/certificates/registered/#", gw.workdir / "events.txt")
    try:
        assert agent.connect() == 0
        assert agent.subscribe("$aws/events/certificates/registered/+") == [1]
        before = time.time()
        for attempt in range(2):
            if attempt:
                time.sleep(1.1)  # at most one event a second per certificate
            s = gw.sensor("jitr-1")
            try:
                assert s.connect() == 0x87  # recorded PENDING_ACTIVATION and refused, as AWS JITR does
            finally:
                s.stop()
        lines = obs.wait(2)
        wait_until(lambda: len(agent.received) >= 2, 10, "two events at the local agent")
    finally:
        obs.stop()
        agent.stop()
    topics = {line.split(" ", 1)[0] for line in lines}
    assert topics == {f"gatewayd/gw-reg-a/events/certificates/registered/{ca_id}"}
    events = [json.loads(line.split(" ", 1)[1]) for line in lines]
    local = [(topic, json.loads(payload)) for topic, payload, _ in agent.received]
    assert [topic for topic, _ in local] == [f"$aws/events/certificates/registered/{ca_id}"] * 2
    assert [event for _, event in local] == events
    for event in events:
        assert set(event) == JITR_MEMBERS | {"gatewayThingName", "clientId"}
        assert event["caCertificateId"] == ca_id and event["certificateStatus"] == "PENDING_ACTIVATION"
        assert event["awsAccountId"] == "gw-reg-a" == event["gatewayThingName"]
        assert event["clientId"] == "jitr-1"
        assert before * 1000 - 1000 <= event["timestamp"] <= time.time() * 1000 + 1000
        assert isinstance(event["certificateRegistrationTimestamp"], int)
    assert events[0]["certificateRegistrationTimestamp"] == events[1]["certificateRegistrationTimestamp"]
    assert events[1]["timestamp"] > events[0]["timestamp"]
    cid = events[0]["certificateId"]
    assert _status(gw, cid) == "PENDING_ACTIVATION"
    assert f"auto-registered certificate {cid}" in gw.daemon.log()  # type: ignore[union-attr]
    gw.ctl("update-certificate", "--certificate-id", cid, "--new-status", "ACTIVE")
    obs = Observer(devstack, "gatewayd/gw-reg-a/events/certificates/registered/#", gw.workdir / "after.txt")
    try:
        time.sleep(1.1)
        s = gw.sensor("jitr-1")
        try:
            assert s.connect() == 0
        finally:
            s.stop()
        time.sleep(1)
        assert obs.lines() == []  # ACTIVE: no more events
    finally:
        obs.stop()


def test_auto_activate_set_by_reload(gw: Gw) -> None:
    ca = pki.make_root("JITP CA", "ecc")
    register_ca(gw.config, ca, auto_registration=True)
    _issue(gw, ca, "jitp-1")
    text = gw.config.read_text()
    gw.config.write_text(text.replace("[downstream]\n", "[downstream]\nauto_activate = true\n", 1))
    try:
        assert gw.daemon is not None
        gw.daemon.signal(1)  # SIGHUP
        wait_until(
            lambda: (
                "downstream.auto_activate" in (gw.request("status")["lastReload"] or {}).get("changed", [])
            ),
            10,
            "reload",
        )
        s = gw.sensor("jitp-1")
        try:
            assert s.connect() == 0  # admitted on its first connection
        finally:
            s.stop()
    finally:
        gw.config.write_text(text)
        gw.daemon.signal(1)  # type: ignore[union-attr]


def test_describe_endpoint(gw: Gw) -> None:
    out_file = gw.workdir / "endpoint-ca.pem"
    out = gw.ctl("describe-endpoint", "--ca-certificate-outfile", str(out_file))
    # issue 18, point 2: a host name sensors can connect to (the listener certificate's first name), no port
    assert out["endpointAddress"] == socket.gethostname() and ":" not in out["endpointAddress"]
    for endpoint_type in ("iot:Data-ATS", "iot:Data"):
        assert (
            gw.ctl("describe-endpoint", "--endpoint-type", endpoint_type)["endpointAddress"]
            == socket.gethostname()
        )
    assert "serves iot:Data-ATS and iot:Data only" in gw.fails(
        "describe-endpoint", "--endpoint-type", "iot:CredentialProvider"
    )
    assert out["endpoints"] == [
        {
            "address": "127.0.0.1",
            "port": gw.port,
            "transport": "tcp",
            "tls": True,
            "clientCertificateRequired": True,
        }
    ]
    assert out_file.read_text() == out["caCertificatePem"] == gw.ca_file.read_text()
    assert "is not a directory" in gw.fails(
        "describe-endpoint", "--ca-certificate-outfile", "/nonexistent/x.pem", code=252
    )


def test_status_counts_the_registry(gw: Gw) -> None:
    registry = gw.request("status")["registry"]
    assert registry["caCertificates"] >= 1 and registry["certificates"].get("ACTIVE", 0) >= 1


def test_transfer_between_two_gateways(gw: Gw, devstack: DevStack, tmp_path: Path) -> None:
    b = _start(devstack, tmp_path / "b", "gw-reg-b", uplink=False)
    try:
        out = _create(gw, "mover", "--set-as-active")
        cid = out["certificateId"]
        bundle = tmp_path / "bundle.json"
        transfer = [
            "transfer-certificate",
            "--certificate-id",
            cid,
            "--target-gateway",
            "gw-reg-b",
            "--outfile",
        ]
        assert "set it INACTIVE first" in gw.fails(*transfer, str(bundle))
        assert not bundle.exists()
        gw.ctl("update-certificate", "--certificate-id", cid, "--new-status", "INACTIVE")
        # 1. cancelled: the certificate is INACTIVE again at the source, the target never saw it
        assert gw.ctl(*transfer, str(bundle))["bundleFile"] == str(bundle)
        assert _status(gw, cid) == "PENDING_TRANSFER"
        gw.ctl("cancel-certificate-transfer", "--certificate-id", cid)
        assert _status(gw, cid) == "INACTIVE"
        # 2. rejected; transfer files are taken only from pinned peers (or with --expect-signer)
        source_ca = gw.ctl("describe-endpoint")["caCertificateId"]
        target_ca = b.ctl("describe-endpoint")["caCertificateId"]
        gw.ctl(*transfer, str(bundle), "--transfer-message", "for the barn")
        reply = tmp_path / "reply.json"
        reject = ["reject-certificate-transfer", "--bundle", str(bundle), "--reject-reason", "not ours"]
        assert "not a pinned peer gateway" in b.fails(*reject, "--reply-outfile", str(reply))
        rejected = b.ctl(*reject, "--expect-signer", source_ca, "--reply-outfile", str(reply))
        assert rejected["replyFile"] == str(reply) and reply.exists()
        complete = ["complete-certificate-transfer", "--reply", str(reply), "--expect-signer", target_ca]
        assert gw.ctl(*complete)["status"] == "INACTIVE"
        desc = gw.ctl("describe-certificate", "--certificate-id", cid)["certificateDescription"]
        assert desc["status"] == "INACTIVE" and desc["transferData"]["rejectReason"] == "not ours"
        # 3. tampered bundle, then accepted
        gw.ctl(*transfer, str(bundle), "--transfer-message", "second try")
        doc = json.loads(bundle.read_text())
        tampered = tmp_path / "tampered.json"
        tampered.write_text(json.dumps({**doc, "transferMessage": "edited"}))
        assert "altered after it was signed" in b.fails(
            "accept-certificate-transfer", "--bundle", str(tampered), "--reply-outfile", str(reply)
        )
        assert "meant for gateway gw-reg-b, this is gw-reg-a" in gw.fails(
            "accept-certificate-transfer", "--bundle", str(bundle), "--expect-signer", source_ca,
            "--reply-outfile", str(reply),
        )  # fmt: skip
        accepted = b.ctl(
            "accept-certificate-transfer",
            "--bundle",
            f"file://{bundle}",
            "--set-as-active",
            "--expect-signer",
            source_ca,
            "--reply-outfile",
            str(reply),
        )
        assert accepted["status"] == "ACTIVE" and accepted["previousOwnedBy"] == "gw-reg-a"
        done = gw.ctl(*complete)
        assert done == {"certificateId": cid, "transferred": True, "ownedBy": "gw-reg-b"}
        assert "no certificate with id" in gw.fails("describe-certificate", "--certificate-id", cid)
        on_b = b.ctl("describe-certificate", "--certificate-id", cid)["certificateDescription"]
        assert on_b["ownedBy"] == "gw-reg-b" and on_b["previousOwnedBy"] == "gw-reg-a"
        # the sensor now connects to gateway B, trusting B's local CA
        cert, key = gw.files("mover")
        s = Sensor("mover", b.port, b.ca_file, cert, key, True)
        try:
            assert s.connect() == 0
        finally:
            s.stop()
        s = gw.sensor("mover")
        try:
            assert s.connect() == 0x87  # and no longer to A
        finally:
            s.stop()
    finally:
        assert b.daemon is not None
        b.daemon.stop()


def test_registry_survives_a_restart_and_works_offline(devstack: DevStack, tmp_path: Path) -> None:
    g = _start(devstack, tmp_path / "r", "gw-reg-r", uplink=False)
    assert g.daemon is not None
    out = _create(g, "keeper", "--set-as-active")
    assert g.daemon.terminate() == 0
    g.daemon.stop()
    # no daemon: gatewayctl works on the state directory itself, under its lock
    assert _status(g, out["certificateId"]) == "ACTIVE"
    g.ctl("update-certificate", "--certificate-id", out["certificateId"], "--new-status", "INACTIVE")
    offline = _create(g, "offline-made")
    selfie = pki.make_self_signed_client("offline-selfie")
    cert, key = g.files("offline-selfie")
    pki.write(cert, selfie.cert_pem())
    pki.write(key, selfie.key_pem(), 0o600)
    g.ctl("register-certificate-without-ca", "--certificate-pem", str(cert), "--status", "ACTIVE")
    db = g.workdir / "state" / "registry.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    key = g.workdir / "state" / "localca" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    g.daemon = Gateway(g.config, g.workdir, env=gateway_env(devstack))
    try:
        g.daemon.wait_ready()
        assert _status(g, out["certificateId"]) == "INACTIVE"
        assert _status(g, offline["certificateId"]) == "INACTIVE"
        s = g.sensor("keeper")
        try:
            assert s.connect() == 0x87
        finally:
            s.stop()
        s = g.sensor("offline-selfie")  # trusted by TLS from the registry at start
        try:
            assert s.connect() == 0
        finally:
            s.stop()
    finally:
        g.daemon.stop()


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"command": "status"}\\n')
print(s.makefile().readline().strip())
"""


def _as_nobody(sock: Path) -> dict[str, Any]:
    """Ask for status as user nobody (group nogroup, no other groups), with Debian's own python3."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    drop = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    result = subprocess.run(
        [*sudo, *drop, "/usr/bin/python3", "-c", CLIENT, str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


@pytest.mark.parametrize("group", ["", "nogroup"], ids=["no-group", "nogroup-member"])
def test_control_socket_checks_peer_credentials(devstack: DevStack, tmp_path: Path, group: str) -> None:
    """A process that may open the socket file is still refused unless it is root, the daemon's user or in
    control_group (the socket file is made world-accessible here to prove the credential check itself)."""
    sockdir = Path(tempfile.mkdtemp(prefix="gatewayd-ctl-"))
    try:
        sockdir.chmod(0o755)
        tables = standin_config(devstack, tmp_path, "gw-ctl")
        tables["gateway"]["control_group"] = group
        tables["gateway"]["control_socket"] = str(sockdir / "control.sock")
        config = write_config(tmp_path / "g.toml", tables)
        daemon = Gateway(config, tmp_path, env=gateway_env(devstack))
        try:
            daemon.wait_ready()
            sock = sockdir / "control.sock"
            sock.chmod(0o666)
            reply = _as_nobody(sock)
            if group:
                assert reply["ok"] and reply["result"]["state"] == "running", reply
            else:
                assert not reply["ok"] and "permission denied" in reply["error"], reply
                assert "control socket: refused uid" in daemon.log()
            assert request(sock, "status")["state"] == "running"  # the daemon's own user may, always
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
