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

from gatewayd.core.errors import IssuerError
from gatewayd.service.upstream.issuer import CommandIssuer
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


def test_a_chatty_issuer_is_not_blocked_by_its_stderr(ca: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 17, item 13: stderr was read up to 64 KiB and then no more; a valid issuer writing more blocked
    on the full pipe until killed. All of it is read now; the last line still explains a failure."""
    script = tmp_path / "chatty"
    script.write_text(
        "#!/bin/sh\n"
        "head -c 1000000 /dev/zero | tr '\\\\0' 'x' >&2\n"
        f"exec {sys.executable} -m gatewayd_dev.issue_cmd --ca-cert {ca[0]} --ca-key {ca[1]}\n"
    )
    script.chmod(0o755)
    t0 = time.monotonic()
    chain = asyncio.run(CommandIssuer((str(script),), 20, env={"PYTHONPATH": str(REPO)}).issue(_csr()[0]))
    assert len(load_pem_certificates(chain)) == 2 and time.monotonic() - t0 < 10
    failing = tmp_path / "failing"
    failing.write_text(
        "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\\\0' 'y' >&2\n"
        "echo >&2\necho 'no quota left' >&2\nexit 4\n"
    )
    failing.chmod(0o755)
    with pytest.raises(IssuerError, match="exited with status 4: no quota left"):
        asyncio.run(CommandIssuer((str(failing),), 20).issue(b"csr"))


def test_a_child_that_escapes_with_setsid_is_killed_and_does_not_stall_renewal(
    ca: tuple[Path, Path], tmp_path: Path
) -> None:
    """Issue 17, item 13: a grandchild calling setsid escaped killpg and, holding stdout open, made the
    renewal wait for its timeout. Its output is used as soon as it exits, and the grandchild is killed."""
    pidfile = tmp_path / "escapee.pid"
    script = tmp_path / "escaping"
    script.write_text(
        "#!/bin/sh\n"
        f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' &\n"
        f"exec {sys.executable} -m gatewayd_dev.issue_cmd --ca-cert {ca[0]} --ca-key {ca[1]}\n"
    )
    script.chmod(0o755)
    t0 = time.monotonic()
    chain = asyncio.run(CommandIssuer((str(script),), 30, env={"PYTHONPATH": str(REPO)}).issue(_csr()[0]))
    took = time.monotonic() - t0
    assert len(load_pem_certificates(chain)) == 2 and took < 10, took
    escapee = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{escapee}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stat = Path(f"/proc/{escapee}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the setsid child survived"
