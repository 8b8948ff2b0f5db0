"""Certificates for the stand-in AWS IoT Core: roots, intermediates, server and client certificates.

The shapes follow AWS IoT's: an RSA root and an ECC root (like Amazon Root CA 1 and 3), each with an
intermediate that signs the endpoint's server certificate, and a separate device CA that signs client
certificates from CSRs (as AWS IoT signs the certificates it creates or provisions).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str) -> PrivateKey:
    match kind:
        case "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "ecc":
            return ec.generate_private_key(ec.SECP256R1())
        case "ecc-p384":
            return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key kind {kind!r}")


def _name(cn: str, org: str = "gatewayd stand-in") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey | None  # None when the certificate was issued for a CSR whose key we never saw

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        assert self.key is not None
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True)
class Validity:
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def days(cls, days: float, start: dt.datetime | None = None) -> Validity:
        """`days` long, starting at `start` or a little before now (5 minutes, less for short lives, so a
        few-minute certificate is not born half spent)."""
        backdate = dt.timedelta(seconds=min(300.0, days * 86400 * 0.1))
        begin = start or dt.datetime.now(dt.UTC) - backdate
        return cls(begin, begin + dt.timedelta(days=days))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, validity: Validity
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
    )


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def make_root(cn: str, kind: str, validity: Validity | None = None) -> Issued:
    key = new_key(kind)
    name = _name(cn)
    builder = (
        _builder(name, name, key.public_key(), validity or Validity.days(3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(_sign(builder, key), key)


def make_intermediate(issuer: Issued, cn: str, kind: str, validity: Validity | None = None) -> Issued:
    assert issuer.key is not None
    key = new_key(kind)
    builder = (
        _builder(_name(cn), issuer.cert.subject, key.public_key(), validity or Validity.days(1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    return Issued(_sign(builder, issuer.key), key)


def make_cross_signed(subject: Issued, issuer: Issued, validity: Validity | None = None) -> x509.Certificate:
    """`subject`'s CA certificate re-issued by `issuer` (how AWS's roots are cross-signed by Starfield)."""
    assert subject.key is not None and issuer.key is not None
    builder = (
        _builder(
            subject.cert.subject,
            issuer.cert.subject,
            subject.key.public_key(),
            validity or Validity.days(3650),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject.key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    return _sign(builder, issuer.key)


def make_server(
    issuer: Issued,
    hostnames: list[str],
    kind: str,
    validity: Validity | None = None,
    ips: list[str] | None = None,
) -> Issued:
    assert issuer.key is not None
    key = new_key(kind)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    builder = (
        _builder(_name(hostnames[0]), issuer.cert.subject, key.public_key(), validity or Validity.days(365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    return Issued(_sign(builder, issuer.key), key)


def sign_client_csr(issuer: Issued, csr_pem: bytes, validity: Validity | None = None) -> x509.Certificate:
    """Issue a client certificate for a CSR (as AWS IoT's CreateCertificateFromCsr does). Checks the CSR."""
    assert issuer.key is not None
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("CSR signature does not verify")
    builder = (
        _builder(csr.subject, issuer.cert.subject, csr.public_key(), validity or Validity.days(365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    )
    return _sign(builder, issuer.key)


def make_client(issuer: Issued, cn: str, kind: str = "ecc", validity: Validity | None = None) -> Issued:
    """A client certificate with a software key (for test observers and simulated devices)."""
    key = new_key(kind)
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA256())
    return Issued(sign_client_csr(issuer, csr.public_bytes(serialization.Encoding.PEM), validity), key)


def make_self_signed_client(cn: str, kind: str = "ecc", validity: Validity | None = None) -> Issued:
    """A self-signed device certificate (for register-certificate-without-ca)."""
    key = new_key(kind)
    builder = (
        _builder(_name(cn), _name(cn), key.public_key(), validity or Validity.days(365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return Issued(_sign(builder, key), key)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def write_client(issuer: Issued, directory: Path, cn: str) -> tuple[Path, Path]:
    """A client certificate for `cn` from `issuer`, written as DIRECTORY/CN.pem and DIRECTORY/CN.key."""
    issued = make_client(issuer, cn)
    cert = write(directory / f"{cn}.pem", issued.cert_pem())
    key = write(directory / f"{cn}.key", issued.key_pem(), 0o600)
    return cert, key


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
