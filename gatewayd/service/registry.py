"""The registry's operations, named and shaped like the AWS CLI's `aws iot ...` (JSON-ready results).

Validation happens before any write (not PEM, not a certificate, expired, not a CA, key mismatch, duplicate,
unknown id), each failure one line, and the store writes nothing on a refusal.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatewayd.core.registry import AutoRegistration, CaStatus, Status, admits, update_action
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.registry import CaRow, CertificateRow, Registry, RegistryError
from gatewayd.stores.x509util import (
    CertificateError,
    certificate_id,
    common_name,
    is_ca,
    load_pem_certificates,
    not_after,
    not_before,
    signed_by,
)

DEFAULT_EXPIRY = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # as AWS IoT's CreateKeysAndCertificate


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one(pem_text: str, what: str) -> x509.Certificate:
    try:
        certs = load_pem_certificates(pem_text.encode(), what)
    except CertificateError as exc:
        raise RegistryError(str(exc)) from exc
    return certs[0]


class RegistryService:
    def __init__(
        self,
        registry: Registry,
        local_ca: LocalCA,
        thing_name: str,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.registry = registry
        self.local_ca = local_ca
        self.thing = thing_name
        self.now = now

    def arn(self, cid: str, kind: str = "cert") -> str:
        return f"arn:gatewayd:{self.thing}:{kind}/{cid}"

    # ------------------------------------------------------------------ CAs

    def get_registration_code(self) -> dict[str, Any]:
        db = self.registry.db
        row = db.execute("SELECT value FROM meta WHERE key='registration_code'").fetchone()
        if row is None:
            code = secrets.token_hex(32)
            db.execute("INSERT INTO meta VALUES ('registration_code', ?)", (code,))
            return {"registrationCode": code}
        return {"registrationCode": row[0]}

    def register_ca_certificate(
        self,
        ca_pem: str,
        verification_pem: str,
        set_as_active: bool = False,
        allow_auto_registration: bool = False,
    ) -> dict[str, Any]:
        ca = _one(ca_pem, "CA certificate")
        verification = _one(verification_pem, "verification certificate")
        if not is_ca(ca):
            raise RegistryError("the certificate is not a CA certificate (basicConstraints CA:TRUE missing)")
        self._valid_now(ca, "CA certificate")
        code = self.get_registration_code()["registrationCode"]
        if common_name(verification.subject) != code:
            raise RegistryError("the verification certificate's CN is not this gateway's registration code")
        if verification.issuer != ca.subject or not signed_by(verification, ca):
            raise RegistryError(
                "the verification certificate is not signed by the CA's key (proof of possession)"
            )
        status = CaStatus.ACTIVE if set_as_active else CaStatus.INACTIVE
        auto = AutoRegistration.ENABLE if allow_auto_registration else AutoRegistration.DISABLE
        row = self.registry.add_ca(ca, status, auto, self.now())
        return {"certificateArn": self.arn(row.certificate_id, "cacert"), "certificateId": row.certificate_id}

    def update_ca_certificate(
        self, cid: str, new_status: str | None = None, new_auto_registration_status: str | None = None
    ) -> dict[str, Any]:
        try:
            status = CaStatus(new_status) if new_status else None
            auto = AutoRegistration(new_auto_registration_status) if new_auto_registration_status else None
        except ValueError as exc:
            raise RegistryError(f"invalid value: {exc}") from None
        self.registry.update_ca(cid, status, auto, self.now())
        return {}

    def describe_ca_certificate(self, cid: str) -> dict[str, Any]:
        row = self.registry.ca(cid)
        return {"certificateDescription": self._ca_description(row)}

    def list_ca_certificates(self) -> dict[str, Any]:
        return {
            "certificates": [
                {
                    "certificateArn": self.arn(r.certificate_id, "cacert"),
                    "certificateId": r.certificate_id,
                    "status": r.status.value,
                    "creationDate": r.creation_date,
                }
                for r in self.registry.cas()
            ]
        }

    def delete_ca_certificate(self, cid: str) -> dict[str, Any]:
        row = self.registry.ca(cid)
        if row.status is CaStatus.ACTIVE:
            raise RegistryError("an ACTIVE CA certificate cannot be deleted: set it INACTIVE first")
        self.registry.delete_ca(cid)
        return {}

    # ------------------------------------------------------------------ device certificates

    def register_certificate(
        self, cert_pem: str, ca_pem: str | None = None, status: str = "INACTIVE"
    ) -> dict[str, Any]:
        cert = self._device_certificate(cert_pem)
        ca_id = None
        if ca_pem is not None:
            ca = _one(ca_pem, "CA certificate")
            ca_id = certificate_id(ca)
        else:
            ca_id = self._registered_issuer(cert)
        if ca_id is None:
            raise RegistryError("the certificate's CA is not registered: register-ca-certificate first")
        ca_row = self.registry.ca(ca_id)
        if ca_row.status is not CaStatus.ACTIVE:
            raise RegistryError(f"CA certificate {ca_id} is {ca_row.status.value}, not ACTIVE")
        if not signed_by(cert, _one(ca_row.pem, "CA certificate")):
            raise RegistryError("the certificate is not signed by that CA")
        row = self.registry.add(cert, self._status(status), ca_id, self.now())
        return {"certificateArn": self.arn(row.certificate_id), "certificateId": row.certificate_id}

    def register_certificate_without_ca(self, cert_pem: str, status: str = "INACTIVE") -> dict[str, Any]:
        cert = self._device_certificate(cert_pem)
        row = self.registry.add(cert, self._status(status), None, self.now())
        return {"certificateArn": self.arn(row.certificate_id), "certificateId": row.certificate_id}

    def create_keys_and_certificate(
        self, common_name_: str, set_as_active: bool = False, not_after_: dt.datetime = DEFAULT_EXPIRY
    ) -> dict[str, Any]:
        """A fresh ECC P-256 key pair and a certificate from the gateway's local CA (the CA is registered
        on first use, ACTIVE, so the listener admits what it issues)."""
        if not common_name_:
            raise RegistryError(
                "--common-name is required: a sensor's client id must match its certificate's CN"
            )
        ca_cert, ca_key = self.local_ca.ca()
        ca_id = certificate_id(ca_cert)
        if self._find_ca(ca_id) is None:
            self.registry.add_ca(ca_cert, CaStatus.ACTIVE, AutoRegistration.DISABLE, self.now())
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name_)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(not_after_, not_after(ca_cert)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        status = Status.ACTIVE if set_as_active else Status.INACTIVE
        row = self.registry.add(cert, status, ca_id, now)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "certificateArn": self.arn(row.certificate_id),
            "certificateId": row.certificate_id,
            "certificatePem": row.pem,
            "keyPair": {"PublicKey": public.decode(), "PrivateKey": private.decode()},
        }

    def update_certificate(self, cid: str, new_status: str) -> dict[str, Any]:
        self.registry.apply(cid, update_action(new_status), self.now())
        return {}

    def describe_certificate(self, cid: str) -> dict[str, Any]:
        return {"certificateDescription": self._description(self.registry.get(cid))}

    def list_certificates(
        self,
        page_size: int = 25,
        marker: str | None = None,
        ascending: bool = False,
        ca_id: str | None = None,
    ) -> dict[str, Any]:
        if ca_id is not None:
            self.registry.ca(ca_id)
        rows, next_marker = self.registry.page(page_size, marker, ascending, ca_id)
        result: dict[str, Any] = {
            "certificates": [
                {
                    "certificateArn": self.arn(r.certificate_id),
                    "certificateId": r.certificate_id,
                    "status": r.status.value,
                    "certificateMode": "DEFAULT" if r.ca_certificate_id else "SNI_ONLY",
                    "creationDate": r.creation_date,
                }
                for r in rows
            ]
        }
        if next_marker:
            result["nextMarker"] = next_marker
        return result

    def delete_certificate(self, cid: str) -> dict[str, Any]:
        self.registry.delete(cid)
        return {}

    # ------------------------------------------------------------------ the listener's question

    def admission(self, certificate_id_: str | None) -> tuple[bool, str]:
        """May a sensor with this certificate connect? (True, "") or (False, why)."""
        if certificate_id_ is None:
            return True, ""  # a plain (loopback or unix) listener: no certificate to check
        row = self.registry.find(certificate_id_)
        if row is None:
            return False, f"certificate {certificate_id_} is not registered"
        ca_status = self.registry.ca(row.ca_certificate_id).status if row.ca_certificate_id else None
        if not admits(row.status, ca_status):
            why = f"certificate {certificate_id_} is {row.status.value}"
            if row.status is Status.ACTIVE:
                why = f"the CA of certificate {certificate_id_} is {ca_status.value if ca_status else '?'}"
            return False, why
        return True, ""

    # ------------------------------------------------------------------ helpers

    def _status(self, status: str) -> Status:
        try:
            value = Status(status)
        except ValueError:
            raise RegistryError(f"--status must be ACTIVE or INACTIVE, not {status}") from None
        if value not in (Status.ACTIVE, Status.INACTIVE):
            raise RegistryError(f"--status must be ACTIVE or INACTIVE, not {status}")
        return value

    def _device_certificate(self, cert_pem: str) -> x509.Certificate:
        cert = _one(cert_pem, "certificate")
        if is_ca(cert):
            raise RegistryError("that is a CA certificate: use register-ca-certificate")
        self._valid_now(cert, "certificate")
        return cert

    def _valid_now(self, cert: x509.Certificate, what: str) -> None:
        now = self.now()
        if not_after(cert) <= now:
            raise RegistryError(f"the {what} expired at {_iso(not_after(cert))}")
        if not_before(cert) > now:
            raise RegistryError(f"the {what} is not valid before {_iso(not_before(cert))}")

    def _find_ca(self, cid: str) -> CaRow | None:
        try:
            return self.registry.ca(cid)
        except RegistryError:
            return None

    def _registered_issuer(self, cert: x509.Certificate) -> str | None:
        for row in self.registry.cas():
            ca = _one(row.pem, "CA certificate")
            if ca.subject == cert.issuer and signed_by(cert, ca):
                return row.certificate_id
        return None

    def _description(self, r: CertificateRow) -> dict[str, Any]:
        return {
            "certificateArn": self.arn(r.certificate_id),
            "certificateId": r.certificate_id,
            "caCertificateId": r.ca_certificate_id,
            "status": r.status.value,
            "certificatePem": r.pem,
            "ownedBy": r.owner,
            "previousOwnedBy": r.previous_owner,
            "creationDate": r.creation_date,
            "lastModifiedDate": r.last_modified,
            "transferData": r.transfer_data or {},
            "validity": {"notBefore": r.not_before, "notAfter": r.not_after},
            "certificateMode": "DEFAULT" if r.ca_certificate_id else "SNI_ONLY",
        }

    def _ca_description(self, r: CaRow) -> dict[str, Any]:
        return {
            "certificateArn": self.arn(r.certificate_id, "cacert"),
            "certificateId": r.certificate_id,
            "status": r.status.value,
            "certificatePem": r.pem,
            "ownedBy": r.owner,
            "creationDate": r.creation_date,
            "lastModifiedDate": r.last_modified,
            "autoRegistrationStatus": r.auto_registration.value,
            "validity": {"notBefore": r.not_before, "notAfter": r.not_after},
        }
