"""The registry's operations, named and shaped like the AWS CLI's `aws iot ...` (JSON-ready results).

Validation happens before any write (not PEM, not a certificate, expired, not a CA, key mismatch, duplicate,
unknown id), each failure one line, and the store writes nothing on a refusal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gatewayd.core import logevents
from gatewayd.core.config import Config, DownstreamSection, check_thing_name, parse_utc
from gatewayd.core.errors import AwsError, CertificateError, RegistryError, TransitionRefused
from gatewayd.core.mqtt.packets import Reason
from gatewayd.core.mqtt.topics import identity_problem
from gatewayd.core.registry import Action, AutoRegistration, CaStatus, Status, admits, update_action
from gatewayd.core.timefmt import iso_utc
from gatewayd.stores import transfer
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.registry import CaRow, CertificateRow, Registry
from gatewayd.stores.x509util import (
    certificate_id,
    common_name,
    is_ca,
    load_pem_certificates,
    not_after,
    not_before,
    pem,
    signed_by,
)

log = logging.getLogger("gatewayd.registry")

DEFAULT_EXPIRY = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # as AWS IoT's CreateKeysAndCertificate
CLOCK_SKEW = dt.timedelta(minutes=5)  # a transfer file dated this far in the future is still accepted
EVENT_INTERVAL = 1.0  # s: a PENDING_ACTIVATION sensor reconnecting in a loop gets one event a second


@dataclass(frozen=True)
class Admission:
    """The listener's answer for one CONNECT: admitted, or the reason code and why; plus an
    auto-registration event to publish, if this connection caused one."""

    admitted: bool
    code: int = 0
    why: str = ""
    event: dict[str, Any] | None = None


def cli_date(stored: str | None) -> str | None:
    """A stored date ("...Z") as the AWS CLI v2 prints timestamps (its default cli_timestamp_format
    iso8601: the datetime's isoformat, with the offset), e.g. 2026-12-02T02:33:48+00:00."""
    if not stored:
        return stored
    return dt.datetime.fromisoformat(stored.replace("Z", "+00:00")).isoformat()


TRANSFER_DATES = ("transferDate", "acceptDate", "rejectDate", "expires")


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """AWS leaves out the members it has no value for (previousOwnedBy, caCertificateId): so does this."""
    return {key: value for key, value in fields.items() if value is not None}


def _one(pem_text: str, what: str) -> x509.Certificate:
    try:
        certs = load_pem_certificates(pem_text.encode(), what)
    except CertificateError as exc:
        raise RegistryError(str(exc), AwsError.CERTIFICATE_VALIDATION) from exc
    return certs[0]


DATA_ENDPOINT_TYPES = ("iot:Data-ATS", "iot:Data")  # describe-endpoint's types that name this gateway


class RegistryService:
    def __init__(
        self,
        registry: Registry,
        local_ca: LocalCA,
        thing_name: str,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registry = registry
        self.local_ca = local_ca
        self.thing = thing_name
        self.now = now
        self.clock_trusted = clock_trusted  # the wall clock is synchronized (service/clock.py)
        self.settings = DownstreamSection()
        self._parsed_cas: dict[str, x509.Certificate] = {}  # by certificate id (a hash: never stale)
        self._events_sent: dict[str, float] = {}  # certificate id -> monotonic time of its last event

    def configure(self, config: Config) -> None:
        """Take the live settings (auto_activate, certificate_not_after, transfer_expiry_days, listeners)."""
        self.settings = config.downstream

    def arn(self, cid: str, kind: str = "cert") -> str:
        return f"arn:gatewayd:{self.thing}:{kind}/{cid}"

    # ------------------------------------------------------------------ CAs

    def get_registration_code(self) -> dict[str, Any]:
        return {"registrationCode": self.registry.registration_code(lambda: secrets.token_hex(32))}

    def delete_registration_code(self) -> dict[str, Any]:
        """AWS DeleteRegistrationCode: the next get-registration-code makes a new one (verification
        certificates made for the old code stop working)."""
        if not self.registry.delete_registration_code():
            raise RegistryError("there is no registration code to delete", AwsError.NOT_FOUND)
        return {}

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
            raise RegistryError(
                "the certificate is not a CA certificate (basicConstraints CA:TRUE missing)",
                AwsError.CERTIFICATE_VALIDATION,
            )
        self._valid_now(ca, "CA certificate")
        code = self.get_registration_code()["registrationCode"]
        if common_name(verification.subject) != code:
            raise RegistryError(
                "the verification certificate's CN is not this gateway's registration code",
                AwsError.REGISTRATION_CODE,
            )
        if verification.issuer != ca.subject or not signed_by(verification, ca):
            raise RegistryError(
                "the verification certificate is not signed by the CA's key (proof of possession)",
                AwsError.CERTIFICATE_VALIDATION,
            )
        status = CaStatus.ACTIVE if set_as_active else CaStatus.INACTIVE
        auto = AutoRegistration.ENABLE if allow_auto_registration else AutoRegistration.DISABLE
        row = self.registry.add_ca(ca, status, auto, self.now())
        return {"certificateArn": self.arn(row.certificate_id, "cacert"), "certificateId": row.certificate_id}

    def update_ca_certificate(
        self, cid: str, new_status: str | None = None, new_auto_registration_status: str | None = None
    ) -> dict[str, Any]:
        if new_status is None and new_auto_registration_status is None:
            raise RegistryError("give 'newStatus' or 'newAutoRegistrationStatus'")
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

    def list_ca_certificates(
        self, page_size: int = 25, marker: str | None = None, ascending: bool = False
    ) -> dict[str, Any]:
        rows, next_marker = self.registry.ca_page(page_size, marker, ascending)
        result: dict[str, Any] = {
            "certificates": [
                {
                    "certificateArn": self.arn(r.certificate_id, "cacert"),
                    "certificateId": r.certificate_id,
                    "status": r.status.value,
                    "creationDate": cli_date(r.creation_date),
                }
                for r in rows
            ]
        }
        if next_marker:
            result["nextMarker"] = next_marker
        return result

    def delete_ca_certificate(self, cid: str) -> dict[str, Any]:
        row = self.registry.ca(cid)
        if row.status is CaStatus.ACTIVE:
            raise RegistryError(
                "an ACTIVE CA certificate cannot be deleted: set it INACTIVE first",
                AwsError.CERTIFICATE_STATE,
            )
        self.registry.delete_ca(cid)
        return {}

    # ------------------------------------------------------------------ device certificates

    def register_certificate(
        self,
        cert_pem: str,
        ca_pem: str | None = None,
        status: str | None = None,
        set_as_active: bool | None = None,
    ) -> dict[str, Any]:
        """AWS RegisterCertificate: --status, or the older --set-as-active (the same as --status ACTIVE)."""
        if set_as_active and status not in (None, "ACTIVE"):
            raise RegistryError(f"'setAsActive' and 'status' {status} disagree")
        status = "ACTIVE" if set_as_active else status or "INACTIVE"
        cert = self._device_certificate(cert_pem)
        ca_id = None
        if ca_pem is not None:
            ca = _one(ca_pem, "CA certificate")
            ca_id = certificate_id(ca)
        else:
            ca_id = self._registered_issuer(cert)
        if ca_id is None:
            raise RegistryError(
                "the certificate's CA is not registered: register-ca-certificate first",
                AwsError.CERTIFICATE_VALIDATION,
            )
        ca_row = self.registry.ca(ca_id)
        if ca_row.status is not CaStatus.ACTIVE:
            raise RegistryError(
                f"CA certificate {ca_id} is {ca_row.status.value}, not ACTIVE", AwsError.CERTIFICATE_STATE
            )
        if not signed_by(cert, _one(ca_row.pem, "CA certificate")):
            raise RegistryError("the certificate is not signed by that CA", AwsError.CERTIFICATE_VALIDATION)
        row = self.registry.add(cert, self._status(status), ca_id, self.now())
        return {"certificateArn": self.arn(row.certificate_id), "certificateId": row.certificate_id}

    def register_certificate_without_ca(self, cert_pem: str, status: str | None = None) -> dict[str, Any]:
        cert = self._device_certificate(cert_pem)
        status = status or "INACTIVE"
        row = self.registry.add(cert, self._status(status), None, self.now())
        return {"certificateArn": self.arn(row.certificate_id), "certificateId": row.certificate_id}

    def create_keys_and_certificate(
        self, common_name_: str = "", set_as_active: bool = False, not_after_: dt.datetime | None = None
    ) -> dict[str, Any]:
        """A fresh ECC P-256 key pair and a certificate from the gateway's local CA (the CA is registered
        on first use, ACTIVE, so the listener admits what it issues). Without a common name the certificate
        gets "sensor-" and 12 random hex digits; a sensor's client id must equal it
        (client_id_must_match_cn)."""
        if common_name_ and (len(common_name_) > 64 or not common_name_.isprintable()):
            raise RegistryError("'commonName' must be 1-64 printable characters")
        problem = identity_problem(common_name_)  # a CN the listener would refuse at CONNECT
        if problem is not None:
            raise RegistryError(f"'commonName' {problem}")
        common_name_ = common_name_ or f"sensor-{secrets.token_hex(6)}"
        key = ec.generate_private_key(ec.SECP256R1())
        row = self._issue(common_name_, key.public_key(), set_as_active, not_after_)
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
            "commonName": common_name_,
        }

    def create_certificate_from_csr(self, csr_pem: str, set_as_active: bool = False) -> dict[str, Any]:
        """AWS CreateCertificateFromCsr: a certificate from the gateway's local CA for a key the sensor keeps
        to itself (a secure element, a TPM). The CSR must be PEM, its signature must verify (the sensor holds
        the key), its key EC P-256/P-384 or RSA of at least 2048 bits, and its CN a usable client id (the
        listener requires client id = CN by default). The certificate carries the CN only."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise RegistryError(
                "'certificateSigningRequest' is not a PEM certificate signing request"
            ) from None
        if not csr.is_signature_valid:
            raise RegistryError("the CSR's signature does not verify: it was not made with its key")
        key = csr.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise RegistryError(f"the CSR's key is on {key.curve.name}: P-256 or P-384 only")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise RegistryError(f"the CSR's RSA key has {key.key_size} bits: 2048 at least")
        else:
            raise RegistryError("the CSR's key is neither EC nor RSA")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise RegistryError("the CSR has no CN: a sensor's client id must equal its certificate's CN")
        common_name_ = str(names[0].value)
        if len(common_name_) > 64 or not common_name_.isprintable():
            raise RegistryError("the CSR's CN must be 1-64 printable characters")
        problem = identity_problem(common_name_)
        if problem is not None:
            raise RegistryError(f"the CSR's CN {problem}")
        row = self._issue(common_name_, key, set_as_active)
        return {"certificateArn": self.arn(row.certificate_id), "certificateId": row.certificate_id,
                "certificatePem": row.pem}  # fmt: skip

    def _issue(
        self,
        common_name_: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        set_as_active: bool,
        not_after_: dt.datetime | None = None,
    ) -> CertificateRow:
        """A client certificate from the local CA for `public_key`, registered (the CA is registered on
        first use, ACTIVE, so that the listener admits what it issues)."""
        if not_after_ is None:
            not_after_ = parse_utc(self.settings.certificate_not_after)
        ca_cert, _ = self.local_ca.ca()
        ca_id = certificate_id(ca_cert)
        if self._find_ca(ca_id) is None:
            self.registry.add_ca(ca_cert, CaStatus.ACTIVE, AutoRegistration.DISABLE, self.now())
        now = self.now()
        cert = self.local_ca.issue(public_key, common_name_, now - dt.timedelta(minutes=5), not_after_)
        status = Status.ACTIVE if set_as_active else Status.INACTIVE
        return self.registry.add(cert, status, ca_id, now)

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
                    "creationDate": cli_date(r.creation_date),
                }
                for r in rows
            ]
        }
        if next_marker:
            result["nextMarker"] = next_marker
        return result

    def delete_certificate(self, cid: str, force_delete: bool = False) -> dict[str, Any]:
        """AWS DeleteCertificate. --force-delete is accepted: AWS needs it for a certificate still attached
        to a thing or policy, which a sensor certificate here never is (nothing is attached to it)."""
        del force_delete
        self.registry.delete(cid)
        return {}

    # ------------------------------------------------------------------ the listener's question

    def certificate_admission(self, cid: str) -> tuple[str, str | None]:
        """A registered certificate used without a TLS handshake (a serial sensor's): (its CN, why it is
        refused now, or None), by the same rules as admission()."""
        row = self.registry.find(cid)
        if row is None:
            return "", f"certificate {cid} is not registered"
        decision = self.admission(
            x509.load_pem_x509_certificate(row.pem.encode()).public_bytes(serialization.Encoding.DER)
        )
        return row.common_name, None if decision.admitted else decision.why

    def admission(self, der_: bytes | None, client_id: str = "") -> Admission:
        """May a sensor presenting this certificate (DER) connect? Unregistered certificates from a
        registered, ACTIVE CA with auto-registration ENABLE are recorded here (AWS JITR; ACTIVE at once
        with auto_activate). As AWS IoT, the registration event comes with that first connection and again
        with every attempt while the certificate is PENDING_ACTIVATION (at most one a second each)."""
        if der_ is None:
            return Admission(True)  # a plain (loopback or unix) listener: no certificate to check
        cid = hashlib.sha256(der_).hexdigest()
        row = self.registry.find(cid)
        event = None
        if row is None:
            if self.registry.was_revoked(cid):  # deleted while revoked: never auto-registered again
                return Admission(
                    False, Reason.NOT_AUTHORIZED, f"certificate {cid} was revoked (and deleted since)"
                )
            auto = self._auto_register(der_, cid, client_id)
            if auto is None:
                return Admission(False, Reason.NOT_AUTHORIZED, f"certificate {cid} is not registered")
            row, event = auto
        elif row.status is Status.PENDING_ACTIVATION and row.ca_certificate_id:
            event = self._registration_event(row, client_id)
        ca_status = self.registry.ca(row.ca_certificate_id).status if row.ca_certificate_id else None
        if admits(row.status, ca_status):
            return Admission(True, event=event)
        why = f"certificate {cid} is {row.status.value}"
        if row.status is Status.ACTIVE:
            ca_text = ca_status.value if ca_status else "?"
            why = f"the CA {row.ca_certificate_id} of certificate {cid} is {ca_text}"
        return Admission(False, Reason.NOT_AUTHORIZED, why, event)

    def _auto_register(
        self, der_: bytes, cid: str, client_id: str
    ) -> tuple[CertificateRow, dict[str, Any] | None] | None:
        try:
            cert = x509.load_der_x509_certificate(der_)
        except ValueError:
            return None
        ca_id = self._registered_issuer(cert)
        if ca_id is None:
            return None
        ca_row = self.registry.ca(ca_id)
        if ca_row.auto_registration is not AutoRegistration.ENABLE or ca_row.status is not CaStatus.ACTIVE:
            return None
        status = Status.ACTIVE if self.settings.auto_activate else Status.PENDING_ACTIVATION
        try:
            row = self.registry.add(cert, status, ca_id, self.now())
        except RegistryError:  # registered meanwhile
            return None
        log.info(
            "auto-registered certificate %s from CA %s as %s (sensor %s)",
            cid, ca_id, status.value, client_id,
            extra=logevents.extra(logevents.CERTIFICATE_AUTO_REGISTERED, certificate_id=cid,
                                 ca_certificate_id=ca_id, status=status.value, client_id=client_id),
        )  # fmt: skip
        return row, self._registration_event(row, client_id, first=True)

    def _registration_event(
        self, row: CertificateRow, client_id: str, first: bool = False
    ) -> dict[str, Any] | None:
        """AWS IoT's just-in-time registration event, as it publishes it on
        $aws/events/certificates/registered/<caCertificateId>: times in epoch milliseconds, awsAccountId
        this gateway's thing name (the registry's owner, as ownedBy). gatewayd's own members: the thing name
        and the sensor's client id. None when this certificate had one less than a second ago."""
        now = time.monotonic()
        if not first and now - self._events_sent.get(row.certificate_id, -EVENT_INTERVAL) < EVENT_INTERVAL:
            return None
        if len(self._events_sent) >= 4096:
            self._events_sent.clear()
        self._events_sent[row.certificate_id] = now
        registered = dt.datetime.fromisoformat(row.creation_date.replace("Z", "+00:00"))
        return {
            "certificateId": row.certificate_id,
            "caCertificateId": row.ca_certificate_id,
            "timestamp": int(self.now().timestamp() * 1000),
            "certificateStatus": row.status.value,
            "awsAccountId": row.owner,
            "certificateRegistrationTimestamp": int(registered.timestamp() * 1000),
            "gatewayThingName": self.thing,
            "clientId": client_id,
        }

    def trust_anchors(self) -> list[str]:
        """PEMs the listeners' TLS must trust: registered CAs, and certificates registered without a CA."""
        return self.registry.trust_anchor_pems()

    # ------------------------------------------------------------------ transfers between gateways

    def transfer_certificate(self, cid: str, target: str, message: str = "") -> dict[str, Any]:
        """TransferCertificate: INACTIVE -> PENDING_TRANSFER, and a signed bundle for the target gateway."""
        if check_thing_name(target):
            raise RegistryError(f"'targetGateway' {target!r}: {check_thing_name(target)}")
        if target == self.thing:
            raise RegistryError(
                "'targetGateway' is this gateway: a certificate cannot be transferred to itself"
            )
        if len(message) > 128:
            raise RegistryError("'transferMessage' is longer than 128 characters (AWS IoT's limit)")
        row = self.registry.get(cid)
        now = self.now()
        body: dict[str, Any] = {
            "format": transfer.BUNDLE_FORMAT,
            "transferId": secrets.token_hex(16),
            "certificateId": cid,
            "certificatePem": row.pem,
            "caCertificatePem": self.registry.ca(row.ca_certificate_id).pem
            if row.ca_certificate_id
            else None,
            "sourceGateway": self.thing,
            "targetGateway": target,
            "transferMessage": message,
            "transferDate": iso_utc(now),
            "expires": iso_utc(now + dt.timedelta(days=self.settings.transfer_expiry_days)),
        }
        ca_cert, ca_key = self.local_ca.ca()
        bundle = transfer.sign(body, ca_cert, ca_key)
        data = {
            "transferMessage": message,
            "transferDate": body["transferDate"],
            "targetGateway": target,
            "transferId": body["transferId"],
            "bundleDigest": transfer.digest(bundle),
            "expires": body["expires"],
        }
        self.registry.apply(cid, Action.TRANSFER, now, data)
        return {"transferredCertificateArn": self.arn(cid), "bundle": bundle}

    def _incoming(
        self, bundle_text: str, expect_signer: str | None
    ) -> tuple[dict[str, Any], x509.Certificate]:
        doc = transfer.parse(bundle_text, transfer.BUNDLE_FORMAT, "transfer bundle", expect_signer)
        self._pinned(doc, expect_signer, "transfer bundle")
        transfer.addressed_to(doc, "targetGateway", self.thing, "transfer bundle")
        if transfer.field(doc, "sourceGateway", "transfer bundle") == self.thing:
            raise RegistryError("the transfer bundle comes from this gateway itself")
        now = self.now()
        try:
            expires = parse_utc(transfer.field(doc, "expires", "transfer bundle"))
            dated = parse_utc(transfer.field(doc, "transferDate", "transfer bundle"))
        except ValueError as exc:
            raise RegistryError(f"the transfer bundle's dates are malformed: {exc}") from None
        if expires <= now:
            raise RegistryError(
                f"the transfer bundle is stale: it expired at {iso_utc(expires)}{self._clock_hint()}"
            )
        if dated > now + CLOCK_SKEW:
            raise RegistryError(
                f"the transfer bundle is dated in the future ({iso_utc(dated)}): check the clocks"
                f"{self._clock_hint()}"
            )
        cert = self._device_certificate(transfer.field(doc, "certificatePem", "transfer bundle"))
        if certificate_id(cert) != transfer.field(doc, "certificateId", "transfer bundle"):
            raise RegistryError("the transfer bundle's certificateId does not match its certificate")
        return doc, cert

    def _pinned(self, doc: dict[str, Any], expect_signer: str | None, what: str) -> None:
        """Transfer files are taken only from a peer gateway pinned by its local CA's id: in
        downstream.transfer_peers, or named for this one command with --expect-signer (which parse() has
        checked). Anyone can sign a well-formed file with a key of their own."""
        signer = doc["signerCertificateId"]
        if expect_signer or signer in self.settings.transfer_peers:
            return
        raise RegistryError(
            f"the {what} is signed by {signer}, which is not a pinned peer gateway: add that id to "
            "downstream.transfer_peers or pass --expect-signer after checking it with the peer's "
            "`gatewayctl describe-endpoint` (caCertificateId)"
        )

    def _reply(self, doc: dict[str, Any], decision: str, **extra: Any) -> dict[str, Any]:
        body = {
            "format": transfer.REPLY_FORMAT,
            "transferId": doc["transferId"],
            "certificateId": doc["certificateId"],
            "sourceGateway": doc["sourceGateway"],
            "targetGateway": self.thing,
            "decision": decision,
            "date": iso_utc(self.now()),
            "bundleDigest": transfer.digest({k: v for k, v in doc.items() if k != "signerCertificateId"}),
            **extra,
        }
        ca_cert, ca_key = self.local_ca.ca()
        return transfer.sign(body, ca_cert, ca_key)

    def accept_certificate_transfer(
        self, bundle_text: str, set_as_active: bool = False, expect_signer: str | None = None
    ) -> dict[str, Any]:
        """AcceptCertificateTransfer on the target: the certificate joins this registry (INACTIVE unless
        --set-as-active), owned by this gateway, previously by the source; the reply tells the source."""
        doc, cert = self._incoming(bundle_text, expect_signer)
        now = self.now()
        transfer_id = transfer.field(doc, "transferId", "transfer bundle")
        self.registry.check_unanswered(transfer_id)
        data = {
            "transferMessage": doc.get("transferMessage") or "",
            "transferDate": doc["transferDate"],
            "acceptDate": iso_utc(now),
        }
        reply = self._reply(doc, "ACCEPTED")
        status = Status.ACTIVE if set_as_active else Status.INACTIVE
        row = self.registry.add(
            cert, status, self._registered_issuer(cert), now, previous_owner=doc["sourceGateway"],
            transfer_data=data,
        )  # fmt: skip
        self.registry.record_answer(transfer_id, now)
        return {
            "certificateArn": self.arn(row.certificate_id),
            "certificateId": row.certificate_id,
            "status": row.status.value,
            "previousOwnedBy": doc["sourceGateway"],
            "signerCertificateId": doc["signerCertificateId"],
            "reply": reply,
        }

    def reject_certificate_transfer(
        self, bundle_text: str, reject_reason: str = "", expect_signer: str | None = None
    ) -> dict[str, Any]:
        """RejectCertificateTransfer on the target: nothing is stored here; the reply tells the source."""
        if len(reject_reason) > 128:
            raise RegistryError("'rejectReason' is longer than 128 characters (AWS IoT's limit)")
        doc, _ = self._incoming(bundle_text, expect_signer)
        transfer_id = transfer.field(doc, "transferId", "transfer bundle")
        self.registry.check_unanswered(transfer_id)
        reply = self._reply(doc, "REJECTED", rejectReason=reject_reason)
        self.registry.record_answer(transfer_id, self.now())
        return {
            "certificateId": doc["certificateId"],
            "signerCertificateId": doc["signerCertificateId"],
            "reply": reply,
        }

    def cancel_certificate_transfer(self, cid: str) -> dict[str, Any]:
        """CancelCertificateTransfer on the source: PENDING_TRANSFER -> INACTIVE; a later reply is refused.
        No transfer pending: TransferAlreadyCompletedException, as AWS answers."""
        try:
            self.registry.apply(cid, Action.CANCEL_TRANSFER, self.now())
        except TransitionRefused as exc:
            raise RegistryError(str(exc), AwsError.TRANSFER_COMPLETED) from None
        return {}

    def complete_certificate_transfer(
        self, reply_text: str, expect_signer: str | None = None
    ) -> dict[str, Any]:
        """Apply the target's reply on the source: accepted -> the certificate leaves this registry;
        rejected -> INACTIVE again, with the reason in its transferData (as AWS IoT keeps it)."""
        doc = transfer.parse(reply_text, transfer.REPLY_FORMAT, "transfer reply", expect_signer)
        self._pinned(doc, expect_signer, "transfer reply")
        transfer.addressed_to(doc, "sourceGateway", self.thing, "transfer reply")
        cid = transfer.field(doc, "certificateId", "transfer reply")
        row = self.registry.get(cid)
        pending = row.transfer_data or {}
        if row.status is not Status.PENDING_TRANSFER:
            raise RegistryError(
                f"certificate {cid} is {row.status.value}, not PENDING_TRANSFER: the reply is stale"
            )
        if transfer.field(doc, "transferId", "transfer reply") != pending.get("transferId"):
            raise RegistryError(
                "the transfer reply is stale: it answers an earlier transfer of this certificate"
            )
        if transfer.field(doc, "targetGateway", "transfer reply") != pending.get("targetGateway"):
            raise RegistryError(
                f"the transfer reply comes from {doc['targetGateway']}, but the transfer was to "
                f"{pending.get('targetGateway')}"
            )
        if doc.get("bundleDigest") != pending.get("bundleDigest"):
            raise RegistryError("the transfer reply does not answer the bundle this gateway wrote")
        decision = transfer.field(doc, "decision", "transfer reply")
        now = self.now()
        if decision == "ACCEPTED":
            self.registry.apply(cid, Action.TRANSFER_ACCEPTED, now)
            return {"certificateId": cid, "transferred": True, "ownedBy": doc["targetGateway"]}
        if decision == "REJECTED":
            data = {**pending, "rejectReason": str(doc.get("rejectReason", "")), "rejectDate": iso_utc(now)}
            self.registry.apply(cid, Action.TRANSFER_REJECTED, now, data)
            return {"certificateId": cid, "transferred": False, "status": Status.INACTIVE.value}
        raise RegistryError(f"the transfer reply's decision {decision!r} is neither ACCEPTED nor REJECTED")

    def summary(self) -> dict[str, Any]:
        """Counts for gatewayctl status: certificates by status, CA certificates."""
        by_status, cas = self.registry.counts()
        return {"certificates": by_status, "caCertificates": cas}

    # ------------------------------------------------------------------ the listeners

    def describe_endpoint(self, endpoint_type: str | None = None) -> dict[str, Any]:
        """AWS DescribeEndpoint: `endpointAddress` is the host name sensors connect to (no port, as AWS
        returns it): downstream.advertised_name, else the first name the listener certificate carries. The
        data endpoint types (iot:Data-ATS, the default iot:Data) both answer; AWS's other types have no
        counterpart here. gatewayd's own fields: the listeners and the CA certificate sensors must trust."""
        if endpoint_type not in (None, *DATA_ENDPOINT_TYPES):
            raise RegistryError(
                f"'endpointType' {endpoint_type!r}: this gateway serves "
                f"{' and '.join(DATA_ENDPOINT_TYPES)} only"
            )
        endpoints = []
        for lst in self.settings.listener:
            unix = lst.address.startswith("unix:")
            endpoints.append(
                {
                    "address": lst.address[5:] if unix else lst.address,
                    "port": None if unix else lst.port,
                    "transport": "unix" if unix else "tcp",
                    "tls": lst.tls,
                    "clientCertificateRequired": lst.require_client_cert,
                }
            )
        ca_cert, _ = self.local_ca.ca()
        return {
            "endpointAddress": self.settings.advertised_name
            or self.local_ca.server_name()
            or socket.gethostname(),
            "endpoints": endpoints,
            "caCertificateId": certificate_id(ca_cert),
            "caCertificatePem": pem(ca_cert).decode(),
        }

    # ------------------------------------------------------------------ helpers

    def _status(self, status: str) -> Status:
        try:
            value = Status(status)
        except ValueError:
            raise RegistryError(f"'status' must be ACTIVE or INACTIVE, not {status}") from None
        if value not in (Status.ACTIVE, Status.INACTIVE):
            raise RegistryError(f"'status' must be ACTIVE or INACTIVE, not {status}")
        return value

    def _device_certificate(self, cert_pem: str) -> x509.Certificate:
        cert = _one(cert_pem, "certificate")
        if is_ca(cert):
            raise RegistryError(
                "that is a CA certificate: use register-ca-certificate", AwsError.CERTIFICATE_VALIDATION
            )
        self._valid_now(cert, "certificate")
        return cert

    def _valid_now(self, cert: x509.Certificate, what: str) -> None:
        now = self.now()
        if not_after(cert) <= now:
            raise RegistryError(
                f"the {what} expired at {iso_utc(not_after(cert))}{self._clock_hint()}",
                AwsError.CERTIFICATE_VALIDATION,
            )
        if not_before(cert) > now:
            raise RegistryError(
                f"the {what} is not valid before {iso_utc(not_before(cert))}{self._clock_hint()}",
                AwsError.CERTIFICATE_VALIDATION,
            )

    def _clock_hint(self) -> str:
        if self.clock_trusted():
            return ""
        return (
            f" by the gateway's clock ({iso_utc(self.now())}), which is not synchronized and may be wrong "
            "(`gatewayctl status` shows `clock`)"
        )

    def _find_ca(self, cid: str) -> CaRow | None:
        try:
            return self.registry.ca(cid)
        except RegistryError:
            return None

    def _registered_issuer(self, cert: x509.Certificate) -> str | None:
        rows = self.registry.cas()
        parsed = {r.certificate_id: self._parsed_cas.get(r.certificate_id) or _one(r.pem, "CA certificate")
                  for r in rows}  # fmt: skip
        self._parsed_cas = parsed  # deleted CAs leave the cache
        for cid, ca in parsed.items():
            if ca.subject == cert.issuer and signed_by(cert, ca):
                return cid
        return None

    def _description(self, r: CertificateRow) -> dict[str, Any]:
        transfer_data = dict(r.transfer_data or {})
        for key in TRANSFER_DATES:
            if key in transfer_data:
                transfer_data[key] = cli_date(transfer_data[key])
        return _present(
            {
                "certificateArn": self.arn(r.certificate_id),
                "certificateId": r.certificate_id,
                "caCertificateId": r.ca_certificate_id,
                "status": r.status.value,
                "certificatePem": r.pem,
                "ownedBy": r.owner,
                "previousOwnedBy": r.previous_owner,
                "creationDate": cli_date(r.creation_date),
                "lastModifiedDate": cli_date(r.last_modified),
                "customerVersion": r.customer_version,
                "transferData": transfer_data,
                "generationId": r.generation_id,
                "validity": {"notBefore": cli_date(r.not_before), "notAfter": cli_date(r.not_after)},
                "certificateMode": "DEFAULT" if r.ca_certificate_id else "SNI_ONLY",
            }
        )

    def _ca_description(self, r: CaRow) -> dict[str, Any]:
        return {
            "certificateArn": self.arn(r.certificate_id, "cacert"),
            "certificateId": r.certificate_id,
            "status": r.status.value,
            "certificatePem": r.pem,
            "ownedBy": r.owner,
            "creationDate": cli_date(r.creation_date),
            "autoRegistrationStatus": r.auto_registration.value,
            "lastModifiedDate": cli_date(r.last_modified),
            "customerVersion": r.customer_version,
            "generationId": r.generation_id,
            "validity": {"notBefore": cli_date(r.not_before), "notAfter": cli_date(r.not_after)},
            "certificateMode": "DEFAULT",
        }
