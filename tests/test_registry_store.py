"""The registry store: real SQLite files, AWS IoT's fields, rules enforced in the store, nothing partial."""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gatewayd.core.errors import RegistryError, TransitionRefused
from gatewayd.core.registry import Action, AutoRegistration, CaStatus, Status
from gatewayd.stores.registry import SCHEMA_VERSION, Registry
from gatewayd_dev import pki

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.db", owner="gw-1")


def test_file_is_private_wal_and_versioned(reg: Registry) -> None:
    assert stat.S_IMODE(reg.path.stat().st_mode) == 0o600
    assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reg.db.execute("INSERT INTO meta VALUES ('probe', 'x')")  # the WAL and its index exist once written
    for side in ("-wal", "-shm"):
        assert stat.S_IMODE(Path(f"{reg.path}{side}").stat().st_mode) == 0o600  # SQLite copies the db's mode
    assert reg.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path / "r.db", "gw").close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="schema version 99, newer than this gatewayd"):
        Registry(tmp_path / "r.db", "gw")


def test_certificate_fields_like_aws(reg: Registry) -> None:
    ca = pki.make_root("Sensor CA", "ecc")
    leaf = pki.make_client(ca, "s1")
    ca_row = reg.add_ca(ca.cert, CaStatus.ACTIVE, AutoRegistration.DISABLE, NOW)
    row = reg.add(leaf.cert, Status.ACTIVE, ca_row.certificate_id, NOW)
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert row.certificate_id == hashlib.sha256(der).hexdigest()
    assert row.owner == "gw-1" and row.previous_owner is None and row.common_name == "s1"
    assert row.ca_certificate_id == ca_row.certificate_id and row.status is Status.ACTIVE
    assert row.creation_date == row.last_modified == "2026-11-26T12:00:00Z"
    assert row.not_after.endswith("Z") and row.pem.startswith("-----BEGIN CERTIFICATE-----")


def test_duplicates_and_unknown_ids(reg: Registry) -> None:
    leaf = pki.make_client(pki.make_root("CA", "ecc"), "s1")
    reg.add(leaf.cert, Status.ACTIVE, None, NOW)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(leaf.cert, Status.ACTIVE, None, NOW)
    with pytest.raises(RegistryError, match="no certificate with id nope"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="no CA certificate with id"):
        reg.add(pki.make_client(pki.make_root("CA2", "ecc"), "s2").cert, Status.ACTIVE, "0" * 64, NOW)
    assert len(reg.page()[0]) == 1  # the refused insert wrote nothing


def test_status_changes_follow_the_rules_and_refusals_change_nothing(reg: Registry) -> None:
    cid = reg.add(
        pki.make_client(pki.make_root("CA", "ecc"), "s1").cert, Status.ACTIVE, None, NOW
    ).certificate_id
    later = NOW + dt.timedelta(hours=1)
    with pytest.raises(TransitionRefused, match="set it INACTIVE first"):
        reg.apply(cid, Action.TRANSFER, later)
    assert reg.get(cid).status is Status.ACTIVE and reg.get(cid).last_modified == "2026-11-26T12:00:00Z"
    assert reg.apply(cid, Action.DEACTIVATE, later).status is Status.INACTIVE  # type: ignore[union-attr]
    row = reg.apply(cid, Action.TRANSFER, later, {"target": "gw-2", "message": "hi"})
    assert (
        row is not None
        and row.status is Status.PENDING_TRANSFER
        and row.transfer_data == {"target": "gw-2", "message": "hi"}
    )
    cancelled = reg.apply(cid, Action.CANCEL_TRANSFER, later, {"target": "gw-2", "cancelled": True})
    assert cancelled is not None and cancelled.transfer_data == {"target": "gw-2", "cancelled": True}
    assert cancelled.status is Status.INACTIVE
    assert reg.apply(cid, Action.REVOKE, later).status is Status.REVOKED  # type: ignore[union-attr]
    with pytest.raises(TransitionRefused, match="REVOKED, which is final"):
        reg.apply(cid, Action.ACTIVATE, later)


def test_accepted_transfer_leaves_the_registry(reg: Registry) -> None:
    cid = reg.add(
        pki.make_client(pki.make_root("CA", "ecc"), "s1").cert, Status.INACTIVE, None, NOW
    ).certificate_id
    reg.apply(cid, Action.TRANSFER, NOW, {"target": "gw-2"})
    assert reg.apply(cid, Action.TRANSFER_ACCEPTED, NOW) is None
    assert reg.find(cid) is None


def test_delete_rules(reg: Registry) -> None:
    ca = pki.make_root("CA", "ecc")
    ca_id = reg.add_ca(ca.cert, CaStatus.ACTIVE, AutoRegistration.DISABLE, NOW).certificate_id
    cid = reg.add(pki.make_client(ca, "s1").cert, Status.ACTIVE, ca_id, NOW).certificate_id
    with pytest.raises(RegistryError, match="ACTIVE certificate cannot be deleted"):
        reg.delete(cid)
    with pytest.raises(RegistryError, match="referenced by 1 device certificate"):
        reg.delete_ca(ca_id)
    reg.apply(cid, Action.DEACTIVATE, NOW)
    reg.delete(cid)
    reg.delete_ca(ca_id)
    assert reg.cas() == [] and reg.page()[0] == []


def test_ca_updates(reg: Registry) -> None:
    ca_id = reg.add_ca(
        pki.make_root("CA", "ecc").cert, CaStatus.INACTIVE, AutoRegistration.DISABLE, NOW
    ).certificate_id
    row = reg.update_ca(ca_id, None, AutoRegistration.ENABLE, NOW + dt.timedelta(minutes=1))
    assert row.status is CaStatus.INACTIVE and row.auto_registration is AutoRegistration.ENABLE
    assert reg.update_ca(ca_id, CaStatus.ACTIVE, None, NOW).status is CaStatus.ACTIVE


def test_paging_both_ways_and_by_ca(reg: Registry) -> None:
    ca = pki.make_root("CA", "ecc")
    ca_id = reg.add_ca(ca.cert, CaStatus.ACTIVE, AutoRegistration.DISABLE, NOW).certificate_id
    made = []
    for i in range(7):
        issued = pki.make_client(ca, f"s{i}")
        made.append(
            reg.add(issued.cert, Status.ACTIVE, ca_id if i % 2 else None, NOW + dt.timedelta(seconds=i))
        )
    seen, marker = [], None
    while True:
        rows, marker = reg.page(page_size=3, marker=marker)
        seen += [r.common_name for r in rows]
        if marker is None:
            break
    assert seen == [f"s{i}" for i in reversed(range(7))]  # newest first, like ListCertificates
    rows, marker = reg.page(page_size=10, ascending=True)
    assert [r.common_name for r in rows] == [f"s{i}" for i in range(7)] and marker is None
    by_ca, _ = reg.page(page_size=10, ca_id=ca_id, ascending=True)
    assert [r.common_name for r in by_ca] == ["s1", "s3", "s5"]
    with pytest.raises(RegistryError, match="pageSize"):
        reg.page(page_size=0)
    with pytest.raises(RegistryError, match="invalid 'marker'"):
        reg.page(marker="garbage")


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    first = Registry(path, "gw")
    cid = first.add(
        pki.make_client(pki.make_root("CA", "ecc"), "s1").cert, Status.ACTIVE, None, NOW
    ).certificate_id
    first.close()
    assert Registry(path, "gw").get(cid).status is Status.ACTIVE
