"""The registry's AWS-CLI-shaped operations on a real store and local CA: the AWS IoT developer guide's
workflow (create, register a CA with proof of possession, register device certificates, activate,
deactivate, revoke, list, delete), with every input check."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gatewayd.core.errors import GatewaydError, RegistryError, TransitionRefused
from gatewayd.core.registry import Action
from gatewayd.service.downstream.registry import Admission, RegistryService
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.registry import Registry
from gatewayd_dev import pki


def _der(pem_text: str) -> bytes:
    return x509.load_pem_x509_certificate(pem_text.encode()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def svc(tmp_path: Path) -> RegistryService:
    ca = LocalCA(tmp_path, "gw-1")
    ca.ensure()
    return RegistryService(Registry(tmp_path / "registry.db", "gw-1"), ca, "gw-1")


def test_create_keys_and_certificate(svc: RegistryService) -> None:
    out = svc.create_keys_and_certificate("sensor-1", set_as_active=True)
    cert = x509.load_pem_x509_certificate(out["certificatePem"].encode())
    assert out["certificateId"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert out["certificateArn"] == f"arn:gatewayd:gw-1:cert/{out['certificateId']}"
    key = serialization.load_pem_private_key(out["keyPair"]["PrivateKey"].encode(), None)
    assert (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        == out["keyPair"]["PublicKey"]
    )
    desc = svc.describe_certificate(out["certificateId"])["certificateDescription"]
    assert (
        desc["status"] == "ACTIVE"
        and desc["ownedBy"] == "gw-1"
        and desc["validity"]["notAfter"] == "2049-12-31T23:59:59+00:00"
    )
    assert svc.admission(_der(out["certificatePem"])) == Admission(True)
    assert pki.cn(cert) == out["commonName"] == "sensor-1"
    generated = svc.create_keys_and_certificate()
    assert re.fullmatch(r"sensor-[0-9a-f]{12}", generated["commonName"])
    assert (
        svc.describe_certificate(generated["certificateId"])["certificateDescription"]["status"] == "INACTIVE"
    )
    with pytest.raises(RegistryError, match="1-64 printable"):
        svc.create_keys_and_certificate("x" * 65)


def test_register_ca_with_proof_of_possession_then_device_certificates(svc: RegistryService) -> None:
    fleet_ca = pki.make_root("Fleet CA", "ecc")
    code = svc.get_registration_code()["registrationCode"]
    assert svc.get_registration_code()["registrationCode"] == code  # stable
    wrong_cn = pki.make_client(fleet_ca, "not-the-code").cert_pem().decode()
    with pytest.raises(RegistryError, match="CN is not this gateway's registration code"):
        svc.register_ca_certificate(fleet_ca.cert_pem().decode(), wrong_cn)
    impostor = pki.make_root("Fleet CA", "ecc")  # same name, other key
    forged = pki.make_client(impostor, code).cert_pem().decode()
    with pytest.raises(RegistryError, match="not signed by the CA's key"):
        svc.register_ca_certificate(fleet_ca.cert_pem().decode(), forged)
    with pytest.raises(RegistryError, match="not a CA certificate"):
        svc.register_ca_certificate(pki.make_client(fleet_ca, "leaf").cert_pem().decode(), forged)
    good = pki.make_client(fleet_ca, code).cert_pem().decode()
    ca_id = svc.register_ca_certificate(fleet_ca.cert_pem().decode(), good)["certificateId"]
    assert svc.describe_ca_certificate(ca_id)["certificateDescription"]["status"] == "INACTIVE"
    device = pki.make_client(fleet_ca, "dev-1").cert_pem().decode()
    with pytest.raises(RegistryError, match="is INACTIVE, not ACTIVE"):
        svc.register_certificate(device)
    svc.update_ca_certificate(ca_id, new_status="ACTIVE")
    cid = svc.register_certificate(device, status="ACTIVE")["certificateId"]
    assert svc.describe_certificate(cid)["certificateDescription"]["caCertificateId"] == ca_id
    assert svc.list_certificates(ca_id=ca_id)["certificates"][0]["certificateId"] == cid
    with pytest.raises(RegistryError, match="already registered"):
        svc.register_ca_certificate(fleet_ca.cert_pem().decode(), good)


def test_admission_follows_status_and_ca_status(svc: RegistryService) -> None:
    fleet_ca = pki.make_root("Fleet CA", "ecc")
    code = svc.get_registration_code()["registrationCode"]
    ca_id = svc.register_ca_certificate(
        fleet_ca.cert_pem().decode(), pki.make_client(fleet_ca, code).cert_pem().decode(), set_as_active=True
    )["certificateId"]
    dev = pki.make_client(fleet_ca, "dev")
    cid = svc.register_certificate(dev.cert_pem().decode(), status="ACTIVE")["certificateId"]
    der = _der(dev.cert_pem().decode())
    assert svc.admission(der) == Admission(True)
    svc.update_ca_certificate(ca_id, new_status="INACTIVE")
    assert svc.admission(der) == Admission(False, 0x87, f"the CA {ca_id} of certificate {cid} is INACTIVE")
    svc.update_ca_certificate(ca_id, new_status="ACTIVE")
    svc.update_certificate(cid, "REVOKED")
    assert svc.admission(der) == Admission(False, 0x87, f"certificate {cid} is REVOKED")
    with pytest.raises(TransitionRefused, match="final"):
        svc.update_certificate(cid, "ACTIVE")
    stranger = pki.make_client(pki.make_root("Other CA", "ecc"), "x").cert_pem().decode()
    sid = hashlib.sha256(_der(stranger)).hexdigest()
    assert svc.admission(_der(stranger)) == Admission(False, 0x87, f"certificate {sid} is not registered")
    assert svc.admission(None) == Admission(True)


def test_a_revocation_outlives_the_deletion_of_the_certificate(svc: RegistryService, tmp_path: Path) -> None:
    """Issue 17, item 9: with auto-registration and auto_activate, a deleted REVOKED certificate came back
    ACTIVE at its next connection."""
    svc.settings = dataclasses.replace(svc.settings, auto_activate=True)
    fleet_ca = pki.make_root("Fleet CA", "ecc")
    code = svc.get_registration_code()["registrationCode"]
    svc.register_ca_certificate(
        fleet_ca.cert_pem().decode(), pki.make_client(fleet_ca, code).cert_pem().decode(),
        set_as_active=True, allow_auto_registration=True,
    )  # fmt: skip
    dev = pki.make_client(fleet_ca, "dev")
    der = _der(dev.cert_pem().decode())
    cid = hashlib.sha256(der).hexdigest()
    assert svc.admission(der).admitted  # registered just in time, ACTIVE
    svc.update_certificate(cid, "REVOKED")
    svc.delete_certificate(cid)
    refused = Admission(False, 0x87, f"certificate {cid} was revoked (and deleted since)")
    assert svc.admission(der) == refused
    assert svc.registry.find(cid) is None  # not auto-registered again
    reopened = RegistryService(Registry(tmp_path / "registry.db", "gw-1"), svc.local_ca, "gw-1")
    reopened.settings = svc.settings
    assert reopened.admission(der) == refused  # remembered on disk
    reopened.register_certificate(dev.cert_pem().decode(), status="ACTIVE")  # an operator's explicit act
    assert reopened.admission(der).admitted


# The tables as schema version 1 had them (gatewayd 0.1's first registry), to migrate from.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ca_certificates (certificate_id TEXT PRIMARY KEY, pem TEXT NOT NULL, status TEXT NOT NULL,
    auto_registration TEXT NOT NULL, owner TEXT NOT NULL, subject TEXT NOT NULL, creation_date TEXT NOT NULL,
    last_modified TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL);
CREATE TABLE certificates (certificate_id TEXT PRIMARY KEY, pem TEXT NOT NULL, status TEXT NOT NULL,
    owner TEXT NOT NULL, previous_owner TEXT,
    ca_certificate_id TEXT REFERENCES ca_certificates(certificate_id), subject TEXT NOT NULL,
    common_name TEXT NOT NULL, creation_date TEXT NOT NULL, last_modified TEXT NOT NULL,
    not_before TEXT NOT NULL, not_after TEXT NOT NULL, transfer_data TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_registry_of_schema_1_is_migrated(tmp_path: Path) -> None:
    """Schema 1 -> 3: the revoked table, and customerVersion/generationId for rows already there."""
    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript(SCHEMA_1)
    when = "2026-01-02T03:04:05Z"
    db.execute(
        "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        ("a" * 64, "PEM", "ACTIVE", "gw-1", None, None, "CN=s", "s", when, when, when, when, None),
    )
    db.commit()
    db.close()
    again = Registry(tmp_path / "old.db", "gw-1")
    assert again.was_revoked("0" * 64) is False
    assert again.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    row = again.get("a" * 64)
    assert row.customer_version == 1 and len(row.generation_id) == 36 and row.creation_date == when
    changed = again.apply("a" * 64, Action.DEACTIVATE, dt.datetime.now(dt.UTC))
    assert changed is not None and changed.customer_version == 2 and len(changed.generation_id) == 36
    again.close()
    assert Registry(tmp_path / "old.db", "gw-1").get("a" * 64).customer_version == 2  # opened again: as is


def test_register_without_ca_and_input_checks(svc: RegistryService) -> None:
    self_signed = pki.make_root("x", "ecc")
    leaf = pki.make_client(self_signed, "standalone").cert_pem().decode()
    cid = svc.register_certificate_without_ca(leaf)["certificateId"]
    assert svc.describe_certificate(cid)["certificateDescription"]["certificateMode"] == "SNI_ONLY"
    expired = pki.make_client(
        self_signed, "old", validity=pki.Validity.days(1, dt.datetime.now(dt.UTC) - dt.timedelta(days=5))
    )
    for data, reason in [
        ("garbage", "no PEM certificate found"),
        (expired.cert_pem().decode(), "expired at"),
        (self_signed.cert_pem().decode(), "that is a CA certificate"),
        (leaf, "already registered"),
    ]:
        with pytest.raises(RegistryError, match=reason):
            svc.register_certificate_without_ca(data)
    with pytest.raises(RegistryError, match="'status' must be ACTIVE or INACTIVE"):
        svc.register_certificate_without_ca(pki.make_client(self_signed, "y").cert_pem().decode(), "REVOKED")
    with pytest.raises(RegistryError, match="CA is not registered"):
        svc.register_certificate(pki.make_client(pki.make_root("z", "ecc"), "q").cert_pem().decode())
    with pytest.raises(GatewaydError, match="'newStatus' must be one of"):
        svc.update_certificate(cid, "PENDING_TRANSFER")


def test_date_refusals_name_an_unsynchronized_clock(svc: RegistryService) -> None:
    """Issue 16: a certificate refused for its dates by a clock not known to be right says so."""
    root = pki.make_root("r", "ecc")
    later = pki.make_client(
        root, "later", validity=pki.Validity.days(30, dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    )
    with pytest.raises(RegistryError) as plain:
        svc.register_certificate_without_ca(later.cert_pem().decode())
    assert "not valid before" in str(plain.value) and "synchronized" not in str(plain.value)
    svc.clock_trusted = lambda: False
    with pytest.raises(RegistryError, match="not valid before .* which is not synchronized and may be wrong"):
        svc.register_certificate_without_ca(later.cert_pem().decode())


def test_delete_and_list(svc: RegistryService) -> None:
    ids = [
        svc.create_keys_and_certificate(f"s{i}", set_as_active=i % 2 == 0)["certificateId"] for i in range(3)
    ]
    listed = svc.list_certificates(page_size=2)
    assert len(listed["certificates"]) == 2 and "nextMarker" in listed
    rest = svc.list_certificates(page_size=2, marker=listed["nextMarker"])
    assert len(rest["certificates"]) == 1 and "nextMarker" not in rest
    with pytest.raises(RegistryError, match="ACTIVE certificate cannot be deleted"):
        svc.delete_certificate(ids[0])
    svc.delete_certificate(ids[1])
    assert {c["certificateId"] for c in svc.list_certificates()["certificates"]} == {ids[0], ids[2]}
    (local,) = svc.list_ca_certificates()["certificates"]
    with pytest.raises(RegistryError, match="ACTIVE CA certificate cannot be deleted"):
        svc.delete_ca_certificate(local["certificateId"])


def test_a_common_name_the_listener_would_refuse_is_refused_at_creation(svc: RegistryService) -> None:
    """Issue 17, item 4: create-keys-and-certificate accepted a CN with "${" (TemplateError at CONNECT)."""
    for cn in ("${iot:ClientId}", "a/b", "+", "#"):
        with pytest.raises(RegistryError, match="'commonName' contains"):
            svc.create_keys_and_certificate(cn)


def _csr(key: Any, cn: str | None) -> str:
    names = [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)] if cn is not None else []
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_create_certificate_from_csr_keeps_the_key_with_the_sensor(svc: RegistryService) -> None:
    """Issue 18, point 4 (AWS CreateCertificateFromCsr): the sensor's key never leaves it."""
    key = ec.generate_private_key(ec.SECP256R1())
    out = svc.create_certificate_from_csr(_csr(key, "secure-1"), set_as_active=True)
    assert set(out) == {"certificateArn", "certificateId", "certificatePem"}  # AWS's output shape
    cert = x509.load_pem_x509_certificate(out["certificatePem"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert pki.cn(cert) == "secure-1"
    assert svc.admission(cert.public_bytes(serialization.Encoding.DER)).admitted
    inactive = svc.create_certificate_from_csr(_csr(rsa.generate_private_key(65537, 2048), "rsa-1"))
    assert (
        svc.describe_certificate(inactive["certificateId"])["certificateDescription"]["status"] == "INACTIVE"
    )
    for csr_pem, why in [
        ("not a csr", "not a PEM certificate signing request"),
        (_csr(ec.generate_private_key(ec.SECP256R1()), None), "has no CN"),
        (_csr(ec.generate_private_key(ec.SECP256R1()), "a/b"), "CN contains '/'"),
        (_csr(rsa.generate_private_key(65537, 1024), "weak"), "1024 bits: 2048 at least"),
        (_csr(ec.generate_private_key(ec.SECP256K1()), "k1"), "P-256 or P-384 only"),
    ]:
        with pytest.raises(RegistryError, match=re.escape(why)):
            svc.create_certificate_from_csr(csr_pem)
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1()), "forged").encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # one bit of the signature: not made with the CSR's key any more
    broken = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(RegistryError, match="signature does not verify"):
        svc.create_certificate_from_csr(broken)


def test_jitr_event_at_registration_and_at_every_attempt_while_pending(svc: RegistryService) -> None:
    """AWS JITR: the event at the first connection and again at each attempt while PENDING_ACTIVATION, at
    most one a second per certificate here; none once ACTIVE."""
    ca = pki.make_root("Auto CA", "ecc")
    code = svc.get_registration_code()["registrationCode"]
    ca_id = svc.register_ca_certificate(
        ca.cert_pem().decode(), pki.make_client(ca, code).cert_pem().decode(), True, True
    )["certificateId"]
    der = _der(pki.make_client(ca, "jitr-1").cert_pem().decode())
    first = svc.admission(der, "jitr-1")
    assert not first.admitted and first.event is not None
    event = first.event
    assert event["caCertificateId"] == ca_id and event["certificateStatus"] == "PENDING_ACTIVATION"
    assert event["awsAccountId"] == "gw-1" and isinstance(event["timestamp"], int)
    assert svc.admission(der, "jitr-1").event is None  # within a second: no second event
    time.sleep(1.05)
    again = svc.admission(der, "jitr-1").event
    assert again is not None and again["certificateId"] == event["certificateId"]
    assert again["certificateRegistrationTimestamp"] == event["certificateRegistrationTimestamp"]
    svc.update_certificate(event["certificateId"], "ACTIVE")
    time.sleep(1.05)
    assert svc.admission(der, "jitr-1") == Admission(True)  # ACTIVE: admitted, no event
