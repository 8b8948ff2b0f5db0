"""Certificate transfer files between gateways: the bundle (source -> target), the reply (target -> source).

Both are JSON objects signed with the writing gateway's local CA key (ECDSA P-256, SHA-256) over the
canonical JSON of every other field; the signer's CA certificate travels inside, so a reader checks that
nothing was altered since signing and shows who signed (the signer's certificate id). Whether that signer is
the gateway the operator expects is the operator's check: the commands print the signer id, and
`--expect-signer ID` makes it a hard check.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gatewayd.core import jsonsafe
from gatewayd.core.errors import RegistryError
from gatewayd.stores.x509util import certificate_id, pem

BUNDLE_FORMAT = "gatewayd-certificate-transfer/1"
REPLY_FORMAT = "gatewayd-certificate-transfer-reply/1"
MAX_FILE = 48 * 1024  # well inside the control socket's 64 KiB request bound


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(signed: dict[str, Any]) -> str:
    """Hex SHA-256 of a signed document's canonical form (the reply names the bundle by it)."""
    return hashlib.sha256(canonical(signed)).hexdigest()


def sign(
    body: dict[str, Any], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> dict[str, Any]:
    unsigned = {**body, "signerCertificatePem": pem(ca_cert).decode()}
    signature = ca_key.sign(canonical(unsigned), ec.ECDSA(hashes.SHA256()))
    return {**unsigned, "signature": base64.b64encode(signature).decode()}


def parse(text: str, fmt: str, what: str, expect_signer: str | None = None) -> dict[str, Any]:
    """Parse and verify a signed transfer file (signed by `expect_signer`'s key, when given); RegistryError
    (one line) for anything wrong with it."""
    if len(text.encode()) > MAX_FILE:
        raise RegistryError(f"the {what} is larger than {MAX_FILE} bytes: not a transfer file")
    try:
        doc = jsonsafe.loads(text)
    except ValueError:
        raise RegistryError(f"the {what} is not JSON: not a transfer file") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise RegistryError(f"the {what} is not a {fmt} file")
    signature, signer_pem = doc.get("signature"), doc.get("signerCertificatePem")
    if not isinstance(signature, str) or not isinstance(signer_pem, str):
        raise RegistryError(f"the {what} carries no signature")
    try:
        signer = x509.load_pem_x509_certificate(signer_pem.encode())
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        raise RegistryError(f"the {what}'s signature or signer certificate is malformed") from None
    key = signer.public_key()
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        key.verify(raw, canonical(unsigned), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RegistryError(
            f"the {what} was altered after it was signed (signature does not verify)"
        ) from None
    doc["signerCertificateId"] = certificate_id(signer)
    if expect_signer and doc["signerCertificateId"] != expect_signer:
        raise RegistryError(f"the {what} is signed by {doc['signerCertificateId']}, not {expect_signer}")
    return doc


def addressed_to(doc: dict[str, Any], name: str, thing: str, what: str) -> str:
    """The gateway named in field `name`, which must be this one (`thing`)."""
    value = field(doc, name, what)
    if value != thing:
        raise RegistryError(f"the {what} is meant for gateway {value}, this is {thing}")
    return value


def field(doc: dict[str, Any], name: str, what: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise RegistryError(f"the {what} lacks {name}")
    return value
