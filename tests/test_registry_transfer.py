"""Transfers between two gateways' registries (AWS IoT's TransferCertificate / Accept / Reject / Cancel), the
signed transfer files, auto-registration (JITR and JITP-like), and the command layer's input checks.

Two real registries and local CAs in two state directories; only the clock is faked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatewayd.core.config import Config, DownstreamSection, GatewaySection, UpstreamSection
from gatewayd.core.errors import GatewaydError, RegistryError, TransitionRefused
from gatewayd.service.downstream.registry import RegistryService
from gatewayd.service.downstream.registry_commands import run_command
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.registry import Registry
from gatewayd_dev import pki


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)  # moved forward by the tests that need it

    def __call__(self) -> dt.datetime:
        return self.now


def _service(root: Path, thing: str, clock: Clock, **downstream: Any) -> RegistryService:
    root.mkdir()
    ca = LocalCA(root, thing)
    ca.ensure()
    svc = RegistryService(Registry(root / "registry.db", thing), ca, thing, now=clock)
    svc.configure(
        Config(
            GatewaySection(thing), UpstreamSection("x.example"), downstream=DownstreamSection(**downstream)
        )
    )
    return svc


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _pin(svc: RegistryService, *peers: RegistryService) -> None:
    """Pin peer gateways by their local CA's id (downstream.transfer_peers), as an operator does."""
    ids = tuple(p.describe_endpoint()["caCertificateId"] for p in peers)
    svc.settings = dataclasses.replace(svc.settings, transfer_peers=svc.settings.transfer_peers + ids)


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> tuple[RegistryService, RegistryService]:
    a, b = _service(tmp_path / "a", "gw-a", clock), _service(tmp_path / "b", "gw-b", clock)
    _pin(a, b)
    _pin(b, a)
    return a, b


def _der(pem_text: str) -> bytes:
    return x509.load_pem_x509_certificate(pem_text.encode()).public_bytes(serialization.Encoding.DER)


def _status(svc: RegistryService, cid: str) -> str:
    return str(svc.describe_certificate(cid)["certificateDescription"]["status"])


def _text(doc: dict[str, Any]) -> str:
    return json.dumps(doc)


def _inactive(svc: RegistryService) -> tuple[str, str]:
    out = svc.create_keys_and_certificate("mover")
    return out["certificateId"], out["certificatePem"]


def test_accepted_transfer_moves_the_certificate(pair: tuple[RegistryService, RegistryService]) -> None:
    a, b = pair
    cid, pem_text = _inactive(a)
    out = a.transfer_certificate(cid, "gw-b", "to the barn")
    assert out["transferredCertificateArn"] == f"arn:gatewayd:gw-a:cert/{cid}"
    desc = a.describe_certificate(cid)["certificateDescription"]
    assert desc["status"] == "PENDING_TRANSFER"
    assert desc["transferData"]["transferMessage"] == "to the barn"
    assert desc["transferData"]["targetGateway"] == "gw-b"
    assert a.admission(_der(pem_text)).admitted is False
    accepted = b.accept_certificate_transfer(_text(out["bundle"]), set_as_active=True)
    assert accepted["status"] == "ACTIVE" and accepted["previousOwnedBy"] == "gw-a"
    assert accepted["signerCertificateId"] == a.describe_endpoint()["caCertificateId"]
    on_b = b.describe_certificate(cid)["certificateDescription"]
    assert on_b["ownedBy"] == "gw-b" and on_b["previousOwnedBy"] == "gw-a"
    assert on_b["transferData"]["transferMessage"] == "to the barn" and "acceptDate" in on_b["transferData"]
    assert b.admission(_der(pem_text)).admitted  # the target's TLS trusts it as registered without its CA
    assert pem_text in b.trust_anchors()
    done = a.complete_certificate_transfer(_text(accepted["reply"]))
    assert done == {"certificateId": cid, "transferred": True, "ownedBy": "gw-b"}
    with pytest.raises(RegistryError, match="no certificate with id"):
        a.describe_certificate(cid)
    with pytest.raises(RegistryError, match="no certificate with id"):  # replaying the reply changes nothing
        a.complete_certificate_transfer(_text(accepted["reply"]))
    with pytest.raises(RegistryError, match="already answered here"):  # nor does replaying the bundle
        b.accept_certificate_transfer(_text(out["bundle"]))


def test_rejected_transfer_returns_the_certificate_inactive(
    pair: tuple[RegistryService, RegistryService],
) -> None:
    a, b = pair
    cid, _ = _inactive(a)
    bundle = a.transfer_certificate(cid, "gw-b")["bundle"]
    rejected = b.reject_certificate_transfer(_text(bundle), "not ours")
    assert b.list_certificates()["certificates"] == []  # the target keeps nothing
    assert a.complete_certificate_transfer(_text(rejected["reply"]))["status"] == "INACTIVE"
    data = a.describe_certificate(cid)["certificateDescription"]["transferData"]
    assert data["rejectReason"] == "not ours" and "rejectDate" in data
    assert _status(a, cid) == "INACTIVE"


def test_cancelled_transfer_refuses_a_late_reply(pair: tuple[RegistryService, RegistryService]) -> None:
    a, b = pair
    cid, _ = _inactive(a)
    bundle = a.transfer_certificate(cid, "gw-b")["bundle"]
    a.cancel_certificate_transfer(cid)
    assert _status(a, cid) == "INACTIVE"
    reply = b.accept_certificate_transfer(_text(bundle))["reply"]
    with pytest.raises(RegistryError, match="not PENDING_TRANSFER: the reply is stale"):
        a.complete_certificate_transfer(_text(reply))
    # transferred again: the reply to the first transfer is stale, not applicable to the second
    a.transfer_certificate(cid, "gw-b")
    with pytest.raises(RegistryError, match="answers an earlier transfer"):
        a.complete_certificate_transfer(_text(reply))
    assert _status(a, cid) == "PENDING_TRANSFER"
    with pytest.raises(RegistryError, match="not PENDING_TRANSFER") as cancelled:
        a.cancel_certificate_transfer(_inactive(a)[0])
    assert cancelled.value.code == "TransferAlreadyCompletedException"  # as AWS answers


def test_transfer_refusals_change_nothing(pair: tuple[RegistryService, RegistryService]) -> None:
    a, _ = pair
    active = a.create_keys_and_certificate("busy", set_as_active=True)["certificateId"]
    with pytest.raises(TransitionRefused, match="ACTIVE certificate cannot be transferred"):
        a.transfer_certificate(active, "gw-b")
    cid, _ = _inactive(a)
    with pytest.raises(RegistryError, match="to itself"):
        a.transfer_certificate(cid, "gw-a")
    with pytest.raises(RegistryError, match="thing name rules"):
        a.transfer_certificate(cid, "no spaces allowed")
    with pytest.raises(RegistryError, match="128 characters"):
        a.transfer_certificate(cid, "gw-b", "m" * 129)
    with pytest.raises(RegistryError, match="no certificate with id"):
        a.transfer_certificate("0" * 64, "gw-b")
    assert _status(a, cid) == "INACTIVE" and _status(a, active) == "ACTIVE"


def test_altered_stale_and_misdirected_bundles_are_refused(
    tmp_path: Path, pair: tuple[RegistryService, RegistryService], clock: Clock
) -> None:
    a, b = pair
    c = _service(tmp_path / "c", "gw-c", clock)
    _pin(c, a)
    cid, _ = _inactive(a)
    bundle = a.transfer_certificate(cid, "gw-b")["bundle"]
    for field, value in (
        ("targetGateway", "gw-c"),
        ("expires", "2099-01-01T00:00:00Z"),
        ("transferMessage", "x"),
    ):
        altered = {**bundle, field: value}
        with pytest.raises(RegistryError, match="altered after it was signed"):
            b.accept_certificate_transfer(_text(altered))
    other = pki.make_client(pki.make_root("Evil", "ecc"), "evil").cert_pem().decode()
    with pytest.raises(RegistryError, match="altered after it was signed"):
        b.accept_certificate_transfer(_text({**bundle, "certificatePem": other}))
    with pytest.raises(RegistryError, match="meant for gateway gw-b, this is gw-c"):
        c.accept_certificate_transfer(_text(bundle))
    with pytest.raises(RegistryError, match="not JSON"):
        b.accept_certificate_transfer("garbage")
    with pytest.raises(RegistryError, match="not a gatewayd-certificate-transfer/1 file"):
        b.accept_certificate_transfer(_text({"format": "other"}))
    with pytest.raises(RegistryError, match="carries no signature"):
        b.accept_certificate_transfer(_text({k: v for k, v in bundle.items() if k != "signature"}))
    with pytest.raises(RegistryError, match="signed by"):
        b.accept_certificate_transfer(_text(bundle), expect_signer="0" * 64)
    clock.now += dt.timedelta(days=7, seconds=1)
    with pytest.raises(RegistryError, match="stale: it expired at"):
        b.accept_certificate_transfer(_text(bundle))
    with pytest.raises(RegistryError, match="stale"):
        b.reject_certificate_transfer(_text(bundle))
    assert b.list_certificates()["certificates"] == []
    assert _status(a, cid) == "PENDING_TRANSFER"


def test_altered_and_misdirected_replies_are_refused(
    tmp_path: Path, pair: tuple[RegistryService, RegistryService], clock: Clock
) -> None:
    a, b = pair
    c = _service(tmp_path / "c", "gw-c", clock)
    _pin(c, b)
    cid, _ = _inactive(a)
    bundle = a.transfer_certificate(cid, "gw-b")["bundle"]
    reply = b.reject_certificate_transfer(_text(bundle), "no")["reply"]
    with pytest.raises(RegistryError, match="altered after it was signed"):
        a.complete_certificate_transfer(_text({**reply, "decision": "ACCEPTED"}))
    with pytest.raises(RegistryError, match="meant for gateway gw-a, this is gw-c"):
        c.complete_certificate_transfer(_text(reply))
    with pytest.raises(RegistryError, match="not a gatewayd-certificate-transfer-reply/1 file"):
        a.complete_certificate_transfer(_text(bundle))
    with pytest.raises(RegistryError, match="signed by"):
        a.complete_certificate_transfer(_text(reply), expect_signer="0" * 64)
    # a reply signed by a third gateway, claiming to come from the target: not a pinned peer of the source
    forged = c._reply({**bundle, "signerCertificateId": "x"}, "ACCEPTED")
    with pytest.raises(RegistryError, match="not a pinned peer gateway"):
        a.complete_certificate_transfer(_text(forged))
    _pin(a, c)  # even pinned, it does not answer this transfer
    with pytest.raises(RegistryError, match="comes from gw-c, but the transfer was to gw-b"):
        a.complete_certificate_transfer(_text(forged))
    assert _status(a, cid) == "PENDING_TRANSFER"
    target_ca = b.describe_endpoint()["caCertificateId"]
    assert a.complete_certificate_transfer(_text(reply), expect_signer=target_ca)["status"] == "INACTIVE"


def test_transferred_certificate_links_to_a_ca_registered_on_the_target(
    pair: tuple[RegistryService, RegistryService],
) -> None:
    a, b = pair
    fleet = pki.make_root("Fleet CA", "ecc")
    for svc in (a, b):
        code = svc.get_registration_code()["registrationCode"]
        svc.register_ca_certificate(
            fleet.cert_pem().decode(), pki.make_client(fleet, code).cert_pem().decode(), True
        )
    cid = a.register_certificate(pki.make_client(fleet, "d1").cert_pem().decode())["certificateId"]
    bundle = a.transfer_certificate(cid, "gw-b")["bundle"]
    b.accept_certificate_transfer(_text(bundle))
    desc = b.describe_certificate(cid)["certificateDescription"]
    assert desc["caCertificateId"] == pki.fingerprint(fleet.cert)  # the target's own registration of the CA
    assert desc["certificateMode"] == "DEFAULT" and desc["status"] == "INACTIVE"


@pytest.mark.parametrize("auto_activate", [False, True], ids=["jitr", "jitp"])
def test_auto_registration(tmp_path: Path, clock: Clock, auto_activate: bool) -> None:
    svc = _service(tmp_path / "g", "gw-1", clock, auto_activate=auto_activate)
    fleet = pki.make_root("Fleet CA", "ecc")
    code = svc.get_registration_code()["registrationCode"]
    verification = pki.make_client(fleet, code).cert_pem().decode()
    ca_id = svc.register_ca_certificate(fleet.cert_pem().decode(), verification, True, True)["certificateId"]
    device = pki.make_client(fleet, "d1").cert_pem().decode()
    first = svc.admission(_der(device), "d1")
    assert first.admitted is auto_activate
    status = "ACTIVE" if auto_activate else "PENDING_ACTIVATION"
    assert first.event is not None and first.event["certificateStatus"] == status
    assert first.event["caCertificateId"] == ca_id and first.event["clientId"] == "d1"
    cid = first.event["certificateId"]
    assert _status(svc, cid) == status
    second = svc.admission(_der(device), "d1")
    assert second.admitted is auto_activate and second.event is None  # recorded once
    if not auto_activate:
        assert second.why == f"certificate {cid} is PENDING_ACTIVATION"
        svc.update_certificate(cid, "ACTIVE")
        assert svc.admission(_der(device), "d1").admitted
    # auto-registration off, or the CA inactive: an unregistered certificate stays out and unrecorded
    svc.update_ca_certificate(ca_id, new_auto_registration_status="DISABLE")
    other = pki.make_client(fleet, "d2").cert_pem().decode()
    assert svc.admission(_der(other), "d2").event is None
    svc.update_ca_certificate(ca_id, new_status="INACTIVE", new_auto_registration_status="ENABLE")
    assert svc.admission(_der(other), "d2").event is None
    assert len(svc.list_certificates()["certificates"]) == 1


def test_commands_check_their_arguments(pair: tuple[RegistryService, RegistryService]) -> None:
    a, _ = pair
    with pytest.raises(RegistryError, match="'certificateId' is required"):
        run_command(a, "describe-certificate", {})
    with pytest.raises(RegistryError, match="'pageSize' must be a whole number"):
        run_command(a, "list-certificates", {"pageSize": "ten"})
    with pytest.raises(RegistryError, match="'setAsActive' must be true or false"):
        run_command(a, "create-keys-and-certificate", {"setAsActive": "yes"})
    with pytest.raises(RegistryError, match="give 'newStatus' or 'newAutoRegistrationStatus'"):
        run_command(a, "update-ca-certificate", {"certificateId": "0" * 64})
    with pytest.raises(RegistryError, match="invalid value"):
        fleet = pki.make_root("F", "ecc")
        code = a.get_registration_code()["registrationCode"]
        ca_id = a.register_ca_certificate(
            fleet.cert_pem().decode(), pki.make_client(fleet, code).cert_pem().decode()
        )["certificateId"]
        run_command(a, "update-ca-certificate", {"certificateId": ca_id, "newStatus": "MAYBE"})
    with pytest.raises(RegistryError, match="unknown registry command"):
        run_command(a, "delete-everything", {})
    with pytest.raises(GatewaydError, match="not settable"):
        run_command(a, "update-certificate", {"certificateId": "0" * 64, "newStatus": "PENDING_TRANSFER"})
    listed = run_command(a, "list-certificates", {"pageSize": 5, "ascendingOrder": True})
    assert listed == {"certificates": []}


def test_transfer_files_only_from_pinned_peers_and_only_once(tmp_path: Path, clock: Clock) -> None:
    """Issue 17, item 10: a bundle signed by an attacker's own key was accepted with --set-as-active and its
    certificate connected; the same bundle was accepted again after delete (replay)."""
    a, b = _service(tmp_path / "a", "gw-a", clock), _service(tmp_path / "b", "gw-b", clock)
    attacker = _service(tmp_path / "evil", "gw-a", clock)  # claims to be gw-a, signs with its own CA
    cid, _ = _inactive(attacker)
    forged = attacker.transfer_certificate(cid, "gw-b")["bundle"]
    with pytest.raises(RegistryError, match="not a pinned peer gateway"):
        b.accept_certificate_transfer(_text(forged), set_as_active=True)
    with pytest.raises(RegistryError, match="not a pinned peer gateway"):
        b.reject_certificate_transfer(_text(forged))
    _pin(b, a)  # the real gw-a only
    with pytest.raises(RegistryError, match="not a pinned peer gateway"):
        b.accept_certificate_transfer(_text(forged), set_as_active=True)
    assert b.list_certificates()["certificates"] == []
    real, _ = _inactive(a)
    bundle = a.transfer_certificate(real, "gw-b")["bundle"]
    b.accept_certificate_transfer(_text(bundle))
    b.delete_certificate(real)  # INACTIVE: deletable
    with pytest.raises(RegistryError, match="already answered here: a bundle is used once"):
        b.accept_certificate_transfer(_text(bundle))
    with pytest.raises(RegistryError, match="already answered here"):
        b.reject_certificate_transfer(_text(bundle))
    # unpinned, but checked by hand for this one command
    other = _service(tmp_path / "c", "gw-c", clock)
    third, _ = _inactive(other)
    signer = other.describe_endpoint()["caCertificateId"]
    assert (
        b.accept_certificate_transfer(
            _text(other.transfer_certificate(third, "gw-b")["bundle"]), expect_signer=signer
        )["certificateId"]
        == third
    )
