"""The TPM, through tpm2-pytss (ESAPI): keys that never leave it, and signatures made inside it.

Works with tpm2-pytss 1.2 (Debian bookworm) up to 3.0: only APIs present in all of them are used
(TSSPrivKey.create_ecc/create_rsa/from_pem/load/to_pem, ESAPI create_primary/evict_control/
tr_from_tpmpublic/sign with an explicit validation ticket).

Keys are created under a persistent storage root key (SRK) at a configurable handle (TCG's usual
0x81000001), made from the standard ECC P-256 storage template when absent. The key file is a TSS2 PRIVATE
KEY PEM: the private part is wrapped by the SRK and can be loaded only by this TPM.

The daemon does not import this module (tpm2-pytss and the TSS libraries cost it 10-12 MB of resident memory
for good): it runs `python -m gatewayd.adapters.tpm` for each operation (service/upstream/tpmproc.py), one
JSON request on stdin, one JSON answer on stdout.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_HC, TPM2_RH, TPM2_ST
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SCHEME_HASH,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
    TPMU_SIG_SCHEME,
)

from gatewayd.core import der
from gatewayd.core.errors import TPMError, TPMUnavailable
from gatewayd.core.keys import Signature, algorithm_for, hash_for

# The storage key template of the TCG "TSS2 private key" convention (and tpm2-tools' default SRK):
# ECC NIST P-256, AES-128-CFB, restricted decrypt, fixedTPM/fixedParent, no dictionary-attack lockout.
SRK_TEMPLATE = "ecc256:aes128cfb"


@contextlib.contextmanager
def esapi(tcti: str) -> Iterator[ESAPI]:
    """An ESAPI context on `tcti`, closed afterwards; TPMUnavailable when it cannot be opened."""
    try:
        loader = TCTILdr.parse(tcti)
    except (TSS2_Exception, OSError, RuntimeError) as exc:
        raise TPMUnavailable(f"cannot open the TPM through {tcti!r}: {exc}") from exc
    try:
        ctx = ESAPI(loader)
    except (TSS2_Exception, OSError, RuntimeError) as exc:
        loader.close()
        raise TPMUnavailable(f"cannot open the TPM through {tcti!r}: {exc}") from exc
    try:
        yield ctx
    finally:
        ctx.close()
        loader.close()  # ESAPI.close() leaves a TCTI it did not load itself open (a connection leak)


def _persistent(ectx: ESAPI) -> list[int]:
    # Listing handles (rather than probing one) keeps the TSS from logging an error for an absent handle.
    handles: list[int] = []
    more, start = True, int(TPM2_HC.PERSISTENT_FIRST)
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
        batch = [int(h) for h in data.data.handles]
        handles += batch
        if not batch:
            break
        start = batch[-1] + 1
    return handles


def ensure_srk(ectx: ESAPI, handle: int) -> bool:
    """Make sure a storage key exists at the persistent `handle`; returns True if it had to be created."""
    if handle in _persistent(ectx):
        return False
    try:
        primary, _pub, _data, _digest, _ticket = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), SRK_TEMPLATE, ESYS_TR.OWNER
        )
        try:
            ectx.evict_control(ESYS_TR.OWNER, primary, handle)
        finally:
            ectx.flush_context(primary)
    except TSS2_Exception as exc:
        raise TPMError(f"cannot create the storage key at 0x{handle:08x}: {exc}") from exc
    return True


def create_key(tcti: str, key_type: str, parent_handle: int) -> bytes:
    """Generate a key inside the TPM under the SRK; returns the TSS2 PRIVATE KEY PEM blob."""
    with esapi(tcti) as ectx:
        ensure_srk(ectx, parent_handle)
        try:
            match key_type:
                case "ecc-p256":
                    key = TSSPrivKey.create_ecc(ectx, curveID=TPM2_ECC.NIST_P256, parent=parent_handle)
                case "ecc-p384":
                    key = TSSPrivKey.create_ecc(ectx, curveID=TPM2_ECC.NIST_P384, parent=parent_handle)
                case "rsa-2048":
                    key = TSSPrivKey.create_rsa(ectx, keyBits=2048, parent=parent_handle)
                case "rsa-3072":
                    key = TSSPrivKey.create_rsa(ectx, keyBits=3072, parent=parent_handle)
                case _:
                    raise TPMError(f"unknown key type {key_type!r}")
        except TSS2_Exception as exc:
            raise TPMError(f"the TPM could not create a {key_type} key: {exc}") from exc
    blob: bytes = key.to_pem()
    return blob


def public_key_der(blob: bytes) -> bytes:
    """SubjectPublicKeyInfo (DER) of a TSS2 key blob; needs no TPM."""
    try:
        key = TSSPrivKey.from_pem(blob)
    except Exception as exc:  # asn1 errors differ between tpm2-pytss versions
        raise TPMError(f"not a TSS2 PRIVATE KEY: {exc}") from exc
    public: TPM2B_PUBLIC = key.public
    spki: bytes = public.to_der()
    return spki


def sign(tcti: str, blob: bytes, data: bytes, key_type: str) -> Signature:
    """Hash `data` and sign the digest inside the TPM with the key in `blob`."""
    hash_name = hash_for(key_type)
    digest = hashlib.new(hash_name, data).digest()
    hash_alg = TPM2_ALG.SHA384 if hash_name == "sha384" else TPM2_ALG.SHA256
    ecc = key_type.startswith("ecc")
    scheme = TPMT_SIG_SCHEME(
        scheme=TPM2_ALG.ECDSA if ecc else TPM2_ALG.RSASSA,
        details=TPMU_SIG_SCHEME(**{"ecdsa" if ecc else "rsassa": TPMS_SCHEME_HASH(hashAlg=hash_alg)}),
    )
    # A null ticket: the digest was not produced by the TPM, which is fine for an unrestricted key.
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    with esapi(tcti) as ectx:
        handle = load(ectx, blob)
        try:
            sig = ectx.sign(handle, digest, scheme, ticket)
        except TSS2_Exception as exc:
            raise TPMError(f"the TPM refused to sign: {exc}") from exc
        finally:
            ectx.flush_context(handle)
    if ecc:
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return Signature(der.ecdsa_signature(r, s), algorithm_for(key_type))
    return Signature(bytes(sig.signature.rsassa.sig), algorithm_for(key_type))


def load(ectx: ESAPI, blob: bytes) -> ESYS_TR:
    """Load a key blob into the TPM (caller flushes it). Fails on any TPM but the one that made it."""
    try:
        handle: ESYS_TR = TSSPrivKey.from_pem(blob).load(ectx)
    except TSS2_Exception as exc:
        raise TPMError(f"this TPM cannot load the key: {exc}") from exc
    return handle


def check_loadable(tcti: str, blob: bytes) -> None:
    """Raise TPMError unless this TPM can load the key (its SRK exists and wrapped it)."""
    with esapi(tcti) as ectx:
        ectx.flush_context(load(ectx, blob))


def persistent_handles(tcti: str) -> list[int]:
    """Persistent object handles in the TPM (for leak checks and diagnostics)."""
    with esapi(tcti) as ectx:
        return _persistent(ectx)


def serve_one(request: dict[str, str]) -> dict[str, str]:
    """One operation for service/upstream/tpmproc.py: bytes travel as base64."""
    blob = base64.b64decode(request.get("blob", ""))
    try:
        match request["op"]:
            case "create":
                out = create_key(request["tcti"], request["keyType"], int(request["parent"]))
                der_ = public_key_der(out)  # asked for right after, by everyone who makes a key
                return {"blob": base64.b64encode(out).decode(), "der": base64.b64encode(der_).decode()}
            case "public":
                return {"der": base64.b64encode(public_key_der(blob)).decode()}
            case "sign":
                data = base64.b64decode(request["data"])
                sig = sign(request["tcti"], blob, data, request["keyType"])
                return {"der": base64.b64encode(sig.der).decode(), "algorithm": sig.algorithm}
            case "check":
                check_loadable(request["tcti"], blob)
                return {}
            case op:
                return {"error": "tpm", "message": f"unknown operation {op!r}"}
    except TPMUnavailable as exc:
        return {"error": "unavailable", "message": str(exc)}
    except TPMError as exc:
        return {"error": "tpm", "message": str(exc)}


if __name__ == "__main__":
    json.dump(serve_one(json.load(sys.stdin)), sys.stdout)
