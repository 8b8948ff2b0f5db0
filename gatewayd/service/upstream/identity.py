"""The gateway's identity: create a key (TPM or file), make a CSR, install a certificate, show, and decide
whether the uplink may connect. Used by the daemon (through the control socket) and by gatewayctl directly
when the daemon is stopped (holding the state directory's lock). Methods block (TPM, disk): the daemon calls
them in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gatewayd.core import der, logevents
from gatewayd.core.config import Config
from gatewayd.core.errors import CertificateError, IdentityError, TPMUnavailable
from gatewayd.core.keys import Signature
from gatewayd.core.timefmt import iso_utc
from gatewayd.service.upstream import tpmproc
from gatewayd.stores import softkey
from gatewayd.stores.identity import IdentityStore, StoredKey, Version
from gatewayd.stores.x509util import (
    CertSummary,
    common_name,
    is_ca,
    load_pem_certificates,
    not_after,
    not_before,
    pem,
    read_certificates,
    same_public_key,
    signed_by,
)

log = logging.getLogger("gatewayd.identity")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Ready:
    """The live identity passed every check: the uplink may connect with it."""

    version: Version
    key: StoredKey
    summary: CertSummary
    date_problem: str = ""  # the certificate's dates look wrong by a clock not known to be right


class TPMOperations(Protocol):
    """What the identity needs of the TPM: gatewayd.service.upstream.tpmproc (a helper process per operation,
    for the long-running daemon) or gatewayd.adapters.tpm itself (in process, for the short-lived
    gatewayctl)."""

    def create_key(self, tcti: str, key_type: str, parent_handle: int) -> bytes: ...

    def public_key_der(self, blob: bytes) -> bytes: ...

    def sign(self, tcti: str, blob: bytes, data: bytes, key_type: str) -> Signature: ...

    def check_loadable(self, tcti: str, blob: bytes) -> None: ...


class Identity:
    def __init__(self, config: Config, store: IdentityStore, tpm_ops: TPMOperations | None = None) -> None:
        self.config = config
        self.store = store
        self.tpm: TPMOperations = tpm_ops if tpm_ops is not None else tpmproc

    # ------------------------------------------------------------------ keys

    @property
    def backend(self) -> str:
        return self.config.identity.key_backend

    def _public_key_der(self, blob: bytes) -> bytes:
        if self.backend != "tpm":
            return softkey.public_key_der(blob)
        return self.tpm.public_key_der(blob)

    def _sign(self, key: StoredKey, data: bytes) -> Signature:
        key_type = key.meta["keyType"]
        if key.meta["backend"] == "tpm":
            return self.tpm.sign(self.config.identity.tcti, key.blob, data, key_type)
        return softkey.sign(key.blob, data, key_type)

    def create_key(self) -> StoredKey:
        ident = self.config.identity
        if ident.key_backend == "tpm":
            blob = self.tpm.create_key(ident.tcti, ident.key_type, ident.parent_handle)
        else:
            blob = softkey.create_key(ident.key_type)
        spki = self._public_key_der(blob)
        meta = {
            "backend": ident.key_backend,
            "keyType": ident.key_type,
            "tpmParent": f"0x{ident.parent_handle:08x}" if ident.key_backend == "tpm" else None,
            "created": _now(),
            "publicKeySha256": hashlib.sha256(spki).hexdigest(),
        }
        key = self.store.add_key(blob, meta)
        log.info(
            "created %s key %s (%s)",
            ident.key_type,
            key.number,
            "inside the TPM" if ident.key_backend == "tpm" else "as a software key file",
            extra=logevents.extra(logevents.IDENTITY_CHANGED, action="create-key", key=key.number),
        )
        return key

    def csr_key(self) -> StoredKey:
        """The key a CSR is for: the pending key, else the live certificate's key."""
        key = self.store.pending_key()
        if key is not None:
            return key
        live = self.store.live()
        if live is not None:
            return self.store.key(live.key_number)
        raise IdentityError("no key yet: create one first (identity create-key)")

    # ------------------------------------------------------------------ CSR

    def create_csr(self) -> bytes:
        """A PEM CSR signed by the stored key, its signature and public key verified before it is returned."""
        key = self.csr_key()
        ident = self.config.identity
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, ident.common_name or self.config.gateway.thing_name)]
        if ident.organization:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, ident.organization))
        spki = self._public_key_der(key.blob)
        info = der.certification_request_info(x509.Name(attrs).public_bytes(), spki)
        sig = self._sign(key, info)
        csr = x509.load_der_x509_csr(der.certification_request(info, sig.algorithm, sig.der))
        public = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not csr.is_signature_valid or public != spki:
            raise IdentityError("the CSR's signature does not verify; the key store may be damaged")
        return csr.public_bytes(serialization.Encoding.PEM)

    # ------------------------------------------------------------------ install

    def install_certificate(self, cert_pem: bytes, chain_pem: bytes = b"") -> Version:
        """Check and install a certificate (and its chain) for a stored key; make it live. All or nothing."""
        version = self.add_certificate(cert_pem, chain_pem)
        self.store.promote(version)
        self.store.keep = self.config.identity.keep_versions
        self.store.prune()
        self._log_change("install-certificate", version)
        return version

    def stage_certificate(self, cert_pem: bytes, key_number: int) -> Version:
        """Check a renewed certificate (chain included) and stage it: stored, never live before it is
        proven. It must be for the key this renewal made (or chose)."""
        version = self.add_certificate(cert_pem, b"", key_number)
        self.store.stage(version)
        return version

    def promote(self, version: Version, action: str) -> None:
        self.store.promote(version)
        self._log_change(action, version)

    def _log_change(self, action: str, version: Version) -> None:
        summary = CertSummary.of(version.certificate())
        log.info(
            "%s: certificate %s (valid until %s) is live as version %s",
            action,
            summary.certificate_id,
            iso_utc(summary.not_after),
            version.number,
            extra=logevents.extra(
                logevents.IDENTITY_CHANGED,
                action=action,
                certificate_id=summary.certificate_id,
                not_after=iso_utc(summary.not_after),
            ),
        )

    def add_certificate(
        self, cert_pem: bytes, chain_pem: bytes = b"", key_number: int | None = None
    ) -> Version:
        """Check a certificate (and its chain) and store it as a new version, not live."""
        try:
            certs = load_pem_certificates(cert_pem, "certificate")
            chain = load_pem_certificates(chain_pem, "chain") if chain_pem.strip() else []
        except CertificateError as exc:
            raise IdentityError(str(exc)) from exc
        leaf, chain = certs[0], certs[1:] + chain  # a full-chain file in place of the certificate works too
        if is_ca(leaf):
            raise IdentityError("the certificate is a CA certificate, not the gateway's own")
        key = self._key_for(leaf)
        if key_number is not None and key.number != key_number:
            raise IdentityError(
                f"the certificate is for key {key.number}, not for the renewal's key {key_number}"
            )
        now = _now()
        if not_before(leaf) > now:
            raise IdentityError(f"the certificate is not valid before {iso_utc(not_before(leaf))}")
        if not_after(leaf) <= now:
            raise IdentityError(f"the certificate expired at {iso_utc(not_after(leaf))}")
        if self.config.identity.issuer_ca_file:
            self._check_chain(leaf, chain, Path(self.config.identity.issuer_ca_file))
        summary = CertSummary.of(leaf)
        return self.store.add_version(
            key,
            pem(leaf),
            pem(*chain),
            {"certificateId": summary.certificate_id, "installed": now, "notAfter": summary.not_after},
        )

    def _key_for(self, cert: x509.Certificate) -> StoredKey:
        candidates = [k for k in (self.store.pending_key(), self._live_key()) if k is not None]
        for key in candidates:
            public = serialization.load_der_public_key(self._public_key_der(key.blob))
            if same_public_key(cert.public_key(), public):
                return key
        raise IdentityError(
            "the certificate does not match the gateway's key"
            + ("" if candidates else " (there is no key: run `gatewayctl identity create-key`)")
        )

    def _live_key(self) -> StoredKey | None:
        live = self.store.live()
        return self.store.key(live.key_number) if live is not None else None

    def _check_chain(self, leaf: x509.Certificate, chain: list[x509.Certificate], ca_file: Path) -> None:
        try:
            anchors = read_certificates(ca_file, "identity.issuer_ca_file")
        except CertificateError as exc:
            raise IdentityError(str(exc)) from exc
        current, pool = leaf, chain + anchors
        for _ in range(8):
            if any(current == a for a in anchors):
                return
            issuer = next((c for c in pool if c.subject == current.issuer and signed_by(current, c)), None)
            if issuer is None:
                break
            if issuer in anchors:
                return
            current = issuer
        raise IdentityError(f"the certificate does not chain to identity.issuer_ca_file ({ca_file})")

    # ------------------------------------------------------------------ the uplink's check

    def check_live(
        self, tpm_absent: Callable[[], str | None] = lambda: None, clock_trusted: bool = True
    ) -> Ready:
        """The live identity, fully checked; IdentityError / TPMError say why the gateway cannot use it.
        `tpm_absent` says why the TPM cannot be used now (its device is not there), checked last, so that
        problems a person must fix (no certificate, expired) are reported first. While the wall clock is not
        known to be right (`clock_trusted` False), the certificate's dates do not stop the uplink: AWS IoT
        judges them by its own clock; the problem is returned in Ready.date_problem to be reported."""
        live = self.store.live()
        if live is None:
            raise IdentityError(
                "no certificate installed: run `gatewayctl identity create-key`, `create-csr`, then "
                "`install-certificate`"
            )
        cert = live.certificate()
        summary = CertSummary.of(cert)
        now = _now()
        date_problem = ""
        if summary.not_after <= now:
            date_problem = (
                f"certificate {summary.certificate_id} expired at {iso_utc(summary.not_after)}; "
                "install a new one"
            )
        elif summary.not_before > now:
            date_problem = f"certificate not valid before {iso_utc(summary.not_before)}"
        if date_problem and clock_trusted:
            raise IdentityError(date_problem)
        key = self.store.key(live.key_number)
        if key.meta["backend"] != self.backend:
            raise IdentityError(
                f"the live key is a {key.meta['backend']} key but identity.key_backend is {self.backend!r}"
            )
        if not self._matches(cert, key):
            raise IdentityError(f"certificate {summary.certificate_id} does not match its key")
        if self.backend == "tpm":
            absent = tpm_absent()
            if absent is not None:
                raise TPMUnavailable(absent)
            self.tpm.check_loadable(self.config.identity.tcti, key.blob)
        return Ready(live, key, summary, date_problem)

    def _matches(self, cert: x509.Certificate, key: StoredKey) -> bool:
        """The certificate is for this key: by the public key's hash recorded when the key was made (no TPM
        helper run at every connection attempt), else by the key itself."""
        recorded = key.meta.get("publicKeySha256")
        if recorded:
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return bool(hashlib.sha256(spki).hexdigest() == recorded)
        public = serialization.load_der_public_key(self._public_key_der(key.blob))
        return same_public_key(cert.public_key(), public)

    # ------------------------------------------------------------------ show

    def show(self) -> dict[str, Any]:
        live, staged, pending = self.store.live(), self.store.staged(), self.store.pending_key()
        out: dict[str, Any] = {"keyBackend": self.backend, "keyType": self.config.identity.key_type}
        if self.backend == "tpm":
            out["tpmParent"] = f"0x{self.config.identity.parent_handle:08x}"
            out["tcti"] = self.config.identity.tcti
        if live is not None:
            s = CertSummary.of(live.certificate())
            key = self.store.key(live.key_number)
            out.update(
                certificateId=s.certificate_id,
                subject=s.subject,
                subjectCommonName=common_name(live.certificate().subject),
                issuer=s.issuer,
                serial=s.serial,
                notBefore=iso_utc(s.not_before),
                notAfter=iso_utc(s.not_after),
                daysLeft=s.days_left(_now()),
                version=live.number,
                key={"number": key.number, **key.meta},
            )
        else:
            out["certificateId"] = None
        out["pendingKey"] = {"number": pending.number, **pending.meta} if pending is not None else None
        out["versions"] = [
            {
                "version": v.number,
                "certificateId": v.meta.get("certificateId"),
                "notAfter": v.meta.get("notAfter"),
                "key": v.key_number,
                "live": live is not None and v.number == live.number,
                "staged": staged is not None and v.number == staged.number,
            }
            for v in self.store.versions()
        ]
        return out


def run_identity_action(identity: Identity, action: str, args: dict[str, Any]) -> Any:
    """One `gatewayctl identity` action, in the daemon or offline; JSON-ready result."""
    match action:
        case "create-key":
            key = identity.create_key()
            return {"key": key.number, **key.meta}
        case "create-csr":
            return {"csrPem": identity.create_csr().decode()}
        case "install-certificate":
            cert = str(args.get("certificatePem", "")).encode()
            chain = str(args.get("chainPem", "")).encode()
            version = identity.install_certificate(cert, chain)
            return {"version": version.number, **identity.show()}
        case "show":
            return identity.show()
    raise IdentityError(f"unknown identity action {action!r}")
