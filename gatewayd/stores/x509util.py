"""X.509 and PEM helpers over `cryptography`, working from Debian bookworm's 38 to current releases."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from gatewayd.core.errors import CertificateError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


def load_pem_certificates(data: bytes, what: str = "file") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (cryptography 38 has no load_pem_x509_certificates)."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise CertificateError(f"{what}: no PEM certificate found")
    certs = []
    for block in blocks:
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise CertificateError(f"{what}: not a valid certificate: {exc}") from exc
    return certs


def read_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file; CertificateError names `what` and the path when that fails."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    return load_pem_certificates(data, str(path))


def pem_blocks_der(data: bytes) -> list[bytes]:
    """The DER of every CERTIFICATE block, without parsing (cheap, for fingerprinting large bundles)."""
    import base64

    return [base64.b64decode(b"".join(block.splitlines()[1:-1])) for block in _PEM_CERT.findall(data)]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certificate_id(cert: x509.Certificate) -> str:
    """AWS IoT's certificate id: lowercase hex SHA-256 of the DER encoding."""
    return hashlib.sha256(der(cert)).hexdigest()


def not_before(cert: x509.Certificate) -> dt.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=dt.UTC)


def not_after(cert: x509.Certificate) -> dt.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=dt.UTC)


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def same_public_key(a: object, b: object) -> bool:
    def spki(key: object) -> bytes:
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(a) == spki(b)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True)
class CertSummary:
    certificate_id: str
    subject: str
    issuer: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertSummary:
        return cls(
            certificate_id(cert),
            cert.subject.rfc4514_string(),
            cert.issuer.rfc4514_string(),
            format(cert.serial_number, "x"),
            not_before(cert),
            not_after(cert),
        )

    def days_left(self, now: dt.datetime) -> float:
        return round((self.not_after - now).total_seconds() / 86400, 2)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Signature check that works on cryptography 38 (no verify_directly_issued_by before 40)."""
    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True
