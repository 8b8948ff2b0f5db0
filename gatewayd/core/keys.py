"""Key types and signatures, independent of where the key lives (TPM or file)."""

from __future__ import annotations

from dataclasses import dataclass

KEY_TYPES = ("ecc-p256", "ecc-p384", "rsa-2048", "rsa-3072")
KEY_BACKENDS = ("tpm", "file")


@dataclass(frozen=True)
class Signature:
    der: bytes  # X.509 signature value: DER ECDSA-Sig-Value, or the raw RSASSA-PKCS1-v1_5 signature
    algorithm: str  # "ecdsa-sha256", "ecdsa-sha384" or "rsa-sha256"


def hash_for(key_type: str) -> str:
    """The digest paired with each key type (P-384 gets SHA-384, as RFC 5480 recommends)."""
    return "sha384" if key_type == "ecc-p384" else "sha256"


def algorithm_for(key_type: str) -> str:
    return f"ecdsa-{hash_for(key_type)}" if key_type.startswith("ecc") else "rsa-sha256"
