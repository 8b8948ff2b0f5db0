"""The `command` issuer: a real executable gets the CSR on stdin and prints the chain; every way it can fail
is an IssuerError that says which (issue 6 groundwork)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.service.issuer import CommandIssuer, IssuerError
from gatewayd.stores.x509util import load_pem_certificates, same_public_key
from gatewayd_dev import pki

from .conftest import REPO


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("issuer")
    root = pki.make_root("Issuer CA", "ecc")
    return pki.write(d / "ca.pem", root.cert_pem()), pki.write(d / "ca.key", root.key_pem(), 0o600)


def _csr() -> tuple[bytes, object]:
    key = pki.new_key("ecc")
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "gw-1")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM), key.public_key()


def _issuer(ca: tuple[Path, Path], *extra: str, timeout: float = 20) -> CommandIssuer:
    argv = (
        sys.executable,
        "-m",
        "gatewayd_dev.issue_cmd",
        "--ca-cert",
        str(ca[0]),
        "--ca-key",
        str(ca[1]),
        *extra,
    )
    return CommandIssuer(argv, timeout, env={"PYTHONPATH": str(REPO)})


def test_issues_a_chain_for_the_csr(ca: tuple[Path, Path]) -> None:
    csr, public = _csr()
    chain = asyncio.run(_issuer(ca).issue(csr))
    leaf, root = load_pem_certificates(chain)
    assert same_public_key(leaf.public_key(), public) and root.subject == leaf.issuer


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("exit", "exited with status 3: issuer: the CA refused the request (quota exceeded)"),
        ("garbage", "did not print a certificate"),
    ],
)
def test_failures_say_why(ca: tuple[Path, Path], fault: str, message: str) -> None:
    with pytest.raises(IssuerError, match=re.escape(message)):
        asyncio.run(_issuer(ca, "--fault", fault).issue(_csr()[0]))


def test_a_hanging_command_is_killed_at_the_timeout(ca: tuple[Path, Path]) -> None:
    t0 = time.monotonic()
    with pytest.raises(IssuerError, match="did not finish within 1.5 s; killed"):
        asyncio.run(_issuer(ca, "--fault", "hang", timeout=1.5).issue(_csr()[0]))
    assert time.monotonic() - t0 < 5


def test_a_missing_command(tmp_path: Path) -> None:
    with pytest.raises(IssuerError, match="cannot run /nonexistent/issue: No such file or directory"):
        asyncio.run(CommandIssuer(("/nonexistent/issue",), 5).issue(b""))


def test_oversized_output_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "flood"
    script.write_text("#!/bin/sh\nhead -c 1000000 /dev/zero\n")
    script.chmod(0o755)
    with pytest.raises(IssuerError, match="printed more than 262144 bytes"):
        asyncio.run(CommandIssuer((str(script),), 10).issue(b"csr"))
