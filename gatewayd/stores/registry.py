"""The sensor certificate registry on disk: SQLite in WAL mode, one writer, versioned schema, mode 0600.

Rows carry AWS IoT's fields (DescribeCertificate / DescribeCACertificate). Every change is one transaction
that checks the rules of gatewayd.core.registry first: a refused change writes nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gatewayd.core.errors import AwsError, RegistryError
from gatewayd.core.registry import Action, AutoRegistration, CaStatus, Status, deletable, transition
from gatewayd.core.timefmt import iso_utc
from gatewayd.stores.x509util import certificate_id, not_after, not_before, pem

SCHEMA_VERSION = 3  # 2: the revoked table; 3: customer_version and generation_id

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
    not_after TEXT NOT NULL,
    customer_version INTEGER NOT NULL DEFAULT 1,
    generation_id TEXT NOT NULL DEFAULT ''
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
    transfer_data TEXT,
    customer_version INTEGER NOT NULL DEFAULT 1,
    generation_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX certificates_by_ca ON certificates(ca_certificate_id);
CREATE INDEX certificates_by_creation ON certificates(creation_date, certificate_id);
"""

# AWS's customerVersion (1, then one more at every change) and generationId (new at every change).
_VERSIONS = [
    f"ALTER TABLE {table} ADD COLUMN {column}"
    for table in ("ca_certificates", "certificates")
    for column in ("customer_version INTEGER NOT NULL DEFAULT 1", "generation_id TEXT NOT NULL DEFAULT ''")
]

# Certificates deleted while REVOKED: a revocation outlives the record, so auto-registration never brings
# the certificate back (an operator's explicit registration does, and clears it).
_REVOKED = """
CREATE TABLE IF NOT EXISTS revoked (certificate_id TEXT PRIMARY KEY, revoked_at TEXT NOT NULL)
"""
# Transfer ids this gateway accepted or rejected: a bundle is answered once, never replayed.
_TRANSFERS = """
CREATE TABLE IF NOT EXISTS transfers_answered (transfer_id TEXT PRIMARY KEY, answered_at TEXT NOT NULL)
"""


def _generation() -> str:
    return str(uuid.uuid4())


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
    customer_version: int = 1
    generation_id: str = ""


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
    customer_version: int = 1
    generation_id: str = ""


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
            if int(version) < 3:
                for statement in _VERSIONS:
                    table, column = statement.split()[2], statement.split()[5]
                    columns = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                    if column not in columns:
                        self.db.execute(statement)
                for table in ("ca_certificates", "certificates"):
                    for (cid,) in self.db.execute(f"SELECT certificate_id FROM {table}").fetchall():
                        self.db.execute(f"UPDATE {table} SET generation_id=? WHERE certificate_id=?",
                                        (_generation(), cid))  # fmt: skip
            if int(version) < SCHEMA_VERSION:
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

    # ------------------------------------------------------------------ the registration code

    def registration_code(self, make: Callable[[], str]) -> str:
        """The code a CA's verification certificate must carry (made once with `make`, then kept)."""
        with self._write():
            row = self.db.execute("SELECT value FROM meta WHERE key='registration_code'").fetchone()
            if row is not None:
                return str(row[0])
            code = make()
            self.db.execute("INSERT INTO meta VALUES ('registration_code', ?)", (code,))
        return code

    def delete_registration_code(self) -> bool:
        """Forget the registration code; False when there was none."""
        with self._write():
            cursor = self.db.execute("DELETE FROM meta WHERE key='registration_code'")
        return cursor.rowcount > 0

    # ------------------------------------------------------------------ CA certificates

    def add_ca(
        self, cert: x509.Certificate, status: CaStatus, auto: AutoRegistration, now: dt.datetime
    ) -> CaRow:
        cid = certificate_id(cert)
        with self._write():
            if self.db.execute("SELECT 1 FROM ca_certificates WHERE certificate_id=?", (cid,)).fetchone():
                raise RegistryError(f"CA certificate {cid} is already registered", AwsError.ALREADY_EXISTS)
            self.db.execute(
                "INSERT INTO ca_certificates VALUES (?,?,?,?,?,?,?,?,?,?,1,?)",
                (cid, pem(cert).decode(), status.value, auto.value, self.owner, cert.subject.rfc4514_string(),
                 iso_utc(now), iso_utc(now), iso_utc(not_before(cert)), iso_utc(not_after(cert)),
                 _generation()),
            )  # fmt: skip
        return self.ca(cid)

    def ca(self, cid: str) -> CaRow:
        row = self.db.execute("SELECT * FROM ca_certificates WHERE certificate_id=?", (cid,)).fetchone()
        if row is None:
            raise RegistryError(f"no CA certificate with id {cid}", AwsError.NOT_FOUND)
        return CaRow(row[0], row[1], CaStatus(row[2]), AutoRegistration(row[3]), *row[4:12])

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
                "UPDATE ca_certificates SET status=?, auto_registration=?, last_modified=?, "
                "customer_version=customer_version+1, generation_id=? WHERE certificate_id=?"
            )
            new_status, new_auto = (status or current.status).value, (auto or current.auto_registration).value
            self.db.execute(sql, (new_status, new_auto, iso_utc(now), _generation(), cid))
        return self.ca(cid)

    def delete_ca(self, cid: str) -> None:
        with self._write():
            self.ca(cid)
            (count,) = self.db.execute(
                "SELECT COUNT(*) FROM certificates WHERE ca_certificate_id=?", (cid,)
            ).fetchone()
            if count:
                raise RegistryError(
                    f"CA certificate {cid} is referenced by {count} device certificate(s)",
                    AwsError.CERTIFICATE_STATE,
                )
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
                raise RegistryError(f"certificate {cid} is already registered", AwsError.ALREADY_EXISTS)
            self.db.execute("DELETE FROM revoked WHERE certificate_id=?", (cid,))  # registered on purpose
            if ca_id is not None:
                self.ca(ca_id)
            self.db.execute(
                "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1,?)",
                (cid, pem(cert).decode(), status.value, self.owner, previous_owner, ca_id,
                 cert.subject.rfc4514_string(), cn, iso_utc(now), iso_utc(now), iso_utc(not_before(cert)),
                 iso_utc(not_after(cert)), json.dumps(transfer_data) if transfer_data is not None else None,
                 _generation()),
            )  # fmt: skip
        return self.get(cid)

    def get(self, cid: str) -> CertificateRow:
        row = self.db.execute("SELECT * FROM certificates WHERE certificate_id=?", (cid,)).fetchone()
        if row is None:
            raise RegistryError(f"no certificate with id {cid}", AwsError.NOT_FOUND)
        data = json.loads(row[12]) if row[12] else None
        return CertificateRow(
            certificate_id=row[0], pem=row[1], status=Status(row[2]), owner=row[3], previous_owner=row[4],
            ca_certificate_id=row[5], subject=row[6], common_name=row[7], creation_date=row[8],
            last_modified=row[9], not_before=row[10], not_after=row[11], transfer_data=data,
            customer_version=row[13], generation_id=row[14],
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
                "UPDATE certificates SET status=?, last_modified=?, transfer_data=?, "
                "customer_version=customer_version+1, generation_id=? WHERE certificate_id=?",
                (new.value, iso_utc(now), json.dumps(data) if data is not None else None, _generation(), cid),
            )
        return self.get(cid)

    def delete(self, cid: str) -> None:
        with self._write():
            current = self.get(cid)
            reason = deletable(current.status)
            if reason:
                raise RegistryError(reason, AwsError.CERTIFICATE_STATE)
            if current.status is Status.REVOKED:  # the revocation is remembered (see _REVOKED): since when
                self.db.execute("INSERT OR IGNORE INTO revoked VALUES (?, ?)", (cid, current.last_modified))
            self.db.execute("DELETE FROM certificates WHERE certificate_id=?", (cid,))

    def check_unanswered(self, transfer_id: str) -> None:
        """RegistryError if this gateway accepted or rejected that transfer before (a bundle is used once)."""
        if self.db.execute("SELECT 1 FROM transfers_answered WHERE transfer_id=?", (transfer_id,)).fetchone():
            raise RegistryError(
                f"transfer {transfer_id} was already answered here: a bundle is used once",
                AwsError.TRANSFER_COMPLETED,
            )

    def record_answer(self, transfer_id: str, now: dt.datetime) -> None:
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO transfers_answered VALUES (?, ?)", (transfer_id, iso_utc(now))
            )

    def trust_anchor_pems(self) -> list[str]:
        """Registered CAs, and certificates registered without a CA: what the listeners' TLS trusts."""
        rows = self.db.execute(
            "SELECT pem FROM ca_certificates UNION ALL "
            "SELECT pem FROM certificates WHERE ca_certificate_id IS NULL"
        ).fetchall()
        return [pem for (pem,) in rows]

    def counts(self) -> tuple[dict[str, int], int]:
        """Device certificates by status, and the number of CA certificates."""
        by_status = dict(
            self.db.execute("SELECT status, COUNT(*) FROM certificates GROUP BY status").fetchall()
        )
        (cas,) = self.db.execute("SELECT COUNT(*) FROM ca_certificates").fetchone()
        return by_status, int(cas)

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
        """One page of device certificates by creation date (newest first unless ascending), the next
        marker."""
        ids, next_marker = self._page_ids("certificates", page_size, marker, ascending, ca_id)
        return [self.get(cid) for cid in ids], next_marker

    def ca_page(
        self, page_size: int = 25, marker: str | None = None, ascending: bool = False
    ) -> tuple[list[CaRow], str | None]:
        """One page of CA certificates, ordered as page()."""
        ids, next_marker = self._page_ids("ca_certificates", page_size, marker, ascending, None)
        return [self.ca(cid) for cid in ids], next_marker

    def _page_ids(
        self, table: str, page_size: int, marker: str | None, ascending: bool, ca_id: str | None
    ) -> tuple[list[str], str | None]:
        if not 1 <= page_size <= 250:
            raise RegistryError("'pageSize' must be between 1 and 250")
        order = "ASC" if ascending else "DESC"
        where, params = [], []
        if ca_id is not None:
            where.append("ca_certificate_id=?")
            params.append(ca_id)
        if marker:
            try:  # base64, as AWS's markers ([A-Za-z0-9+/]+={0,2})
                created, after_id = base64.b64decode(marker, validate=True).decode().split("|", 1)
            except (ValueError, binascii.Error):
                raise RegistryError("invalid 'marker' (not one this registry gave)") from None
            op = ">" if ascending else "<"
            where.append(f"(creation_date, certificate_id) {op} (?, ?)")
            params += [created, after_id]
        sql = f"SELECT certificate_id, creation_date FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY creation_date {order}, certificate_id {order} LIMIT ?"
        found = self.db.execute(sql, (*params, page_size + 1)).fetchall()
        ids = [cid for cid, _ in found[:page_size]]
        last = found[page_size - 1] if len(found) > page_size else None
        return ids, base64.b64encode(f"{last[1]}|{last[0]}".encode()).decode() if last else None
