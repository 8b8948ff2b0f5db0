"""Software keys for `identity.key_backend = "file"`: for gateways without a TPM, and only when configured.

The private key is a PKCS#8 PEM file, mode 0600, readable by the daemon's user. Anyone who can read it can
impersonate the gateway: that is why the TPM backend is the default and the daemon warns at every start.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gatewayd.core.errors import CertificateError
from gatewayd.core.keys import Signature, algorithm_for, hash_for


def create_key(key_type: str) -> bytes:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    match key_type:
        case "ecc-p256":
            key = ec.generate_private_key(ec.SECP256R1())
        case "ecc-p384":
            key = ec.generate_private_key(ec.SECP384R1())
        case "rsa-2048" | "rsa-3072":
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
        case _:
            raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load(blob: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(blob, password=None)
    except ValueError as exc:
        raise CertificateError(f"not a usable private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateError("only RSA and EC keys are supported")
    return key


def public_key_der(blob: bytes) -> bytes:
    return (
        _load(blob)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def sign(blob: bytes, data: bytes, key_type: str) -> Signature:
    key = _load(blob)
    digest = hashes.SHA384() if hash_for(key_type) == "sha384" else hashes.SHA256()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return Signature(key.sign(data, ec.ECDSA(digest)), algorithm_for(key_type))
    return Signature(key.sign(data, padding.PKCS1v15(), digest), algorithm_for(key_type))
