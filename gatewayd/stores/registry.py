"""The sensor certificate registry on disk: SQLite in WAL mode, one writer, versioned schema, mode 0600.

Rows carry AWS IoT's fields (DescribeCertificate / DescribeCACertificate). Every change is one transaction
that checks the rules of gatewayd.core.registry first: a refused change writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gatewayd.core.errors import GatewaydError
from gatewayd.core.registry import Action, AutoRegistration, CaStatus, Status, deletable, transition
from gatewayd.stores.x509util import certificate_id, not_after, not_before, pem

SCHEMA_VERSION = 2  # 2: the revoked table

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ca_certificates (
    certificate_id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    auto_registration TEXT NOT NULL,
    owner TEXT NOT NULL,
    subject TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL
);
CREATE TABLE certificates (
    certificate_id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT NOT NULL,
    previous_owner TEXT,
    ca_certificate_id TEXT REFERENCES ca_certificates(certificate_id),
    subject TEXT NOT NULL,
    common_name TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    transfer_data TEXT
);
CREATE INDEX certificates_by_ca ON certificates(ca_certificate_id);
CREATE INDEX certificates_by_creation ON certificates(creation_date, certificate_id);
"""

# Certificates deleted while REVOKED: a revocation outlives the record, so auto-registration never brings
# the certificate back (an operator's explicit registration does, and clears it).
_REVOKED = """
CREATE TABLE IF NOT EXISTS revoked (certificate_id TEXT PRIMARY KEY, revoked_at TEXT NOT NULL)
"""
# Transfer ids this gateway accepted or rejected: a bundle is answered once, never replayed.
_TRANSFERS = """
CREATE TABLE IF NOT EXISTS transfers_answered (transfer_id TEXT PRIMARY KEY, answered_at TEXT NOT NULL)
"""


class RegistryError(GatewaydError):
    """A registry request was refused; nothing was written. The message is one line for gatewayctl."""


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CertificateRow:
    certificate_id: str
    pem: str
    status: Status
    owner: str
    previous_owner: str | None
    ca_certificate_id: str | None
    subject: str
    common_name: str
    creation_date: str
    last_modified: str
    not_before: str
    not_after: str
    transfer_data: dict[str, Any] | None


@dataclass(frozen=True)
class CaRow:
    certificate_id: str
    pem: str
    status: CaStatus
    auto_registration: AutoRegistration
    owner: str
    subject: str
    creation_date: str
    last_modified: str
    not_before: str
    not_after: str


class Registry:
    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        new = not path.exists()
        if new:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
            os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed change survives a power cut
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self._write():
            has_meta = self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if not has_meta:
                for statement in filter(str.strip, (_SCHEMA + ";" + _REVOKED + ";" + _TRANSFERS).split(";")):
                    self.db.execute(statement)  # not executescript(): it would commit the open transaction
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            (version,) = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if int(version) > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path} has schema version {version}, newer than this gatewayd ({SCHEMA_VERSION})"
                )
            if int(version) < 2:
                self.db.execute(_REVOKED)
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            self.db.execute(_TRANSFERS)  # schema 2 includes it (added to 2 before any release)

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction; BEGIN IMMEDIATE takes the single writer's lock at once."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ CA certificates

    def add_ca(
        self, cert: x509.Certificate, status: CaStatus, auto: AutoRegistration, now: dt.datetime
    ) -> CaRow:
        cid = certificate_id(cert)
        with self._write():
            if self.db.execute("SELECT 1 FROM ca_certificates WHERE certificate_id=?", (cid,)).fetchone():
                raise RegistryError(f"CA certificate {cid} is already registered")
            self.db.execute(
                "INSERT INTO ca_certificates VALUES (?,?,?,?,?,?,?,?,?,?)",
                (cid, pem(cert).decode(), status.value, auto.value, self.owner, cert.subject.rfc4514_string(),
                 _iso(now), _iso(now), _iso(not_before(cert)), _iso(not_after(cert))),
            )  # fmt: skip
        return self.ca(cid)

    def ca(self, cid: str) -> CaRow:
        row = self.db.execute("SELECT * FROM ca_certificates WHERE certificate_id=?", (cid,)).fetchone()
        if row is None:
            raise RegistryError(f"no CA certificate with id {cid}")
        return CaRow(row[0], row[1], CaStatus(row[2]), AutoRegistration(row[3]), *row[4:])

    def cas(self) -> list[CaRow]:
        ids = self.db.execute(
            "SELECT certificate_id FROM ca_certificates ORDER BY creation_date, certificate_id"
        )
        return [self.ca(cid) for (cid,) in ids.fetchall()]

    def update_ca(
        self, cid: str, status: CaStatus | None, auto: AutoRegistration | None, now: dt.datetime
    ) -> CaRow:
        with self._write():
            current = self.ca(cid)
            sql = (
                "UPDATE ca_certificates SET status=?, auto_registration=?, last_modified=? "
                "WHERE certificate_id=?"
            )
            new_status, new_auto = (status or current.status).value, (auto or current.auto_registration).value
            self.db.execute(sql, (new_status, new_auto, _iso(now), cid))
        return self.ca(cid)

    def delete_ca(self, cid: str) -> None:
        with self._write():
            self.ca(cid)
            (count,) = self.db.execute(
                "SELECT COUNT(*) FROM certificates WHERE ca_certificate_id=?", (cid,)
            ).fetchone()
            if count:
                raise RegistryError(f"CA certificate {cid} is referenced by {count} device certificate(s)")
            self.db.execute("DELETE FROM ca_certificates WHERE certificate_id=?", (cid,))

    # ------------------------------------------------------------------ device certificates

    def add(
        self,
        cert: x509.Certificate,
        status: Status,
        ca_id: str | None,
        now: dt.datetime,
        previous_owner: str | None = None,
        transfer_data: dict[str, Any] | None = None,
    ) -> CertificateRow:
        cid = certificate_id(cert)
        cn_attrs = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        cn = str(cn_attrs[0].value) if cn_attrs else ""
        with self._write():
            if self.db.execute("SELECT 1 FROM certificates WHERE certificate_id=?", (cid,)).fetchone():
                raise RegistryError(f"certificate {cid} is already registered")
            self.db.execute("DELETE FROM revoked WHERE certificate_id=?", (cid,))  # registered on purpose
            if ca_id is not None:
                self.ca(ca_id)
            self.db.execute(
                "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (cid, pem(cert).decode(), status.value, self.owner, previous_owner, ca_id,
                 cert.subject.rfc4514_string(), cn, _iso(now), _iso(now), _iso(not_before(cert)),
                 _iso(not_after(cert)), json.dumps(transfer_data) if transfer_data is not None else None),
            )  # fmt: skip
        return self.get(cid)

    def get(self, cid: str) -> CertificateRow:
        row = self.db.execute("SELECT * FROM certificates WHERE certificate_id=?", (cid,)).fetchone()
        if row is None:
            raise RegistryError(f"no certificate with id {cid}")
        data = json.loads(row[12]) if row[12] else None
        return CertificateRow(
            certificate_id=row[0], pem=row[1], status=Status(row[2]), owner=row[3], previous_owner=row[4],
            ca_certificate_id=row[5], subject=row[6], common_name=row[7], creation_date=row[8],
            last_modified=row[9], not_before=row[10], not_after=row[11], transfer_data=data,
        )  # fmt: skip

    def find(self, cid: str) -> CertificateRow | None:
        try:
            return self.get(cid)
        except RegistryError:
            return None

    def apply(
        self, cid: str, action: Action, now: dt.datetime, transfer_data: dict[str, Any] | None = None
    ) -> CertificateRow | None:
        """Change a certificate's status by the rules; None when it left the registry (transferred away).

        transfer_data replaces the row's transfer data when given (AWS IoT keeps it after a transfer ends)."""
        with self._write():
            current = self.get(cid)
            new = transition(cid, current.status, action)
            if new is None:
                self.db.execute("DELETE FROM certificates WHERE certificate_id=?", (cid,))
                return None
            data = transfer_data if transfer_data is not None else current.transfer_data
            self.db.execute(
                "UPDATE certificates SET status=?, last_modified=?, transfer_data=? WHERE certificate_id=?",
                (new.value, _iso(now), json.dumps(data) if data is not None else None, cid),
            )
        return self.get(cid)

    def delete(self, cid: str) -> None:
        with self._write():
            current = self.get(cid)
            reason = deletable(current.status)
            if reason:
                raise RegistryError(reason)
            if current.status is Status.REVOKED:  # the revocation is remembered (see _REVOKED): since when
                self.db.execute("INSERT OR IGNORE INTO revoked VALUES (?, ?)", (cid, current.last_modified))
            self.db.execute("DELETE FROM certificates WHERE certificate_id=?", (cid,))

    def check_unanswered(self, transfer_id: str) -> None:
        """RegistryError if this gateway accepted or rejected that transfer before (a bundle is used once)."""
        if self.db.execute("SELECT 1 FROM transfers_answered WHERE transfer_id=?", (transfer_id,)).fetchone():
            raise RegistryError(f"transfer {transfer_id} was already answered here: a bundle is used once")

    def record_answer(self, transfer_id: str, now: dt.datetime) -> None:
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO transfers_answered VALUES (?, ?)", (transfer_id, _iso(now))
            )

    def was_revoked(self, cid: str) -> bool:
        """Deleted while REVOKED (and not registered again explicitly since)."""
        return self.db.execute("SELECT 1 FROM revoked WHERE certificate_id=?", (cid,)).fetchone() is not None

    def page(
        self,
        page_size: int = 25,
        marker: str | None = None,
        ascending: bool = False,
        ca_id: str | None = None,
    ) -> tuple[list[CertificateRow], str | None]:
        """One page of certificates by creation date (newest first unless ascending) and the next marker."""
        if not 1 <= page_size <= 250:
            raise RegistryError("--page-size must be between 1 and 250")
        order = "ASC" if ascending else "DESC"
        where, params = [], []
        if ca_id is not None:
            where.append("ca_certificate_id=?")
            params.append(ca_id)
        if marker:
            try:
                created, after_id = marker.split("|", 1)
            except ValueError:
                raise RegistryError("invalid --marker") from None
            op = ">" if ascending else "<"
            where.append(f"(creation_date, certificate_id) {op} (?, ?)")
            params += [created, after_id]
        sql = "SELECT certificate_id FROM certificates"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY creation_date {order}, certificate_id {order} LIMIT ?"
        ids = [r[0] for r in self.db.execute(sql, (*params, page_size + 1)).fetchall()]
        rows = [self.get(cid) for cid in ids[:page_size]]
        next_marker = f"{rows[-1].creation_date}|{rows[-1].certificate_id}" if len(ids) > page_size else None
        return rows, next_marker
