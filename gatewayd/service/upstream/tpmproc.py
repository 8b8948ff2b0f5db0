"""The TPM operations the daemon and gatewayctl need (create a key, its public key, sign, check that the TPM
can load it), each run in a short-lived `python -m gatewayd.adapters.tpm` process: tpm2-pytss and the TSS
libraries would otherwise stay in the daemon's memory for good (10-12 MB) for operations that happen at
connection attempts and renewals only. Same signatures and errors as gatewayd.adapters.tpm."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

from gatewayd.core.errors import TPMError, TPMUnavailable
from gatewayd.core.keys import Signature

TIMEOUT = 120.0  # seconds: key creation on a slow TPM takes seconds; a hung TPM must not hang the caller


def _run(request: dict[str, str]) -> dict[str, str]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gatewayd.adapters.tpm"],
            input=json.dumps(request), capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise TPMError(f"the TPM operation {request['op']} did not finish within {TIMEOUT:g} s") from exc
    try:
        answer: dict[str, str] = json.loads(done.stdout)
    except ValueError:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise TPMError(f"the TPM operation {request['op']} failed: {last[0]}") from None
    if answer.get("error") == "unavailable":
        raise TPMUnavailable(answer["message"])
    if "error" in answer:
        raise TPMError(answer["message"])
    return answer


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_public: dict[bytes, bytes] = {}  # blob hash -> its public key (never changes): one helper run per key


def create_key(tcti: str, key_type: str, parent_handle: int) -> bytes:
    answer = _run({"op": "create", "tcti": tcti, "keyType": key_type, "parent": str(parent_handle)})
    blob = base64.b64decode(answer["blob"])
    _public[hashlib.sha256(blob).digest()] = base64.b64decode(answer["der"])
    return blob


def public_key_der(blob: bytes) -> bytes:
    digest = hashlib.sha256(blob).digest()
    if digest not in _public:
        _public[digest] = base64.b64decode(_run({"op": "public", "blob": _b64(blob)})["der"])
    return _public[digest]


def sign(tcti: str, blob: bytes, data: bytes, key_type: str) -> Signature:
    answer = _run({"op": "sign", "tcti": tcti, "blob": _b64(blob), "data": _b64(data), "keyType": key_type})
    return Signature(base64.b64decode(answer["der"]), answer["algorithm"])


def check_loadable(tcti: str, blob: bytes) -> None:
    _run({"op": "check", "tcti": tcti, "blob": _b64(blob)})
