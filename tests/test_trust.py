"""Trust by validation mode: the real Amazon roots from this system's ca-certificates, chosen by pin."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from pathlib import Path

import pytest

from gatewayd.core import logevents
from gatewayd.core.errors import TrustError
from gatewayd.core.trust import AMAZON, STARFIELD_SERVICES_G2, expiry_warnings
from gatewayd.stores import truststore
from gatewayd.stores.x509util import certificate_id, pem_blocks_der
from gatewayd_dev import pki

from .conftest import REPO

SYSTEM = Path("/etc/ssl/certs/ca-certificates.crt")
EXPECTED = {
    "rsa": ["Amazon Root CA 1", "Amazon Root CA 2"],
    "ecc": ["Amazon Root CA 3", "Amazon Root CA 4"],
    "all": ["Amazon Root CA 1", "Amazon Root CA 2", "Amazon Root CA 3", "Amazon Root CA 4"],
}


@pytest.mark.parametrize("mode", ["rsa", "ecc", "all"])
def test_mode_selects_exactly_its_pinned_amazon_roots(mode: str, tmp_path: Path) -> None:
    bundle = truststore.build(mode, AMAZON, SYSTEM, None, tmp_path)
    assert list(bundle.names) == EXPECTED[mode]
    written = pem_blocks_der(bundle.path.read_bytes())
    pins = {r.name: r.sha256 for r in AMAZON.roots}
    assert [hashlib.sha256(d).hexdigest() for d in written] == [pins[n] for n in EXPECTED[mode]]
    assert oct(bundle.path.stat().st_mode & 0o777) == "0o644"


def test_starfield_is_in_the_system_store_but_in_no_mode(tmp_path: Path) -> None:
    system = {hashlib.sha256(d).hexdigest() for d in pem_blocks_der(SYSTEM.read_bytes())}
    assert STARFIELD_SERVICES_G2.sha256 in system
    for mode in ("rsa", "ecc", "all"):
        bundle = truststore.build(mode, AMAZON, SYSTEM, None, tmp_path / mode)
        assert STARFIELD_SERVICES_G2.sha256 not in {certificate_id(c) for c in bundle.certs}


def test_manual_states_each_modes_bundle_size(tmp_path: Path) -> None:
    readme = (REPO / "docs" / "trust.md").read_text()
    for mode in ("rsa", "ecc", "all"):
        size = truststore.build(mode, AMAZON, SYSTEM, None, tmp_path / mode).path.stat().st_size
        assert re.search(rf"^\| `{mode}` \|.*\| {size} \|", readme, re.M), (
            f"docs/trust.md lacks {mode}: {size} bytes"
        )


def _bundle_without(tmp_path: Path, name: str, replacement: bytes = b"") -> Path:
    pins = {r.name: r.sha256 for r in AMAZON.roots}
    import base64
    import textwrap

    kept = [d for d in pem_blocks_der(SYSTEM.read_bytes()) if hashlib.sha256(d).hexdigest() != pins[name]]
    blocks = [
        "-----BEGIN CERTIFICATE-----\n"
        + textwrap.fill(base64.b64encode(d).decode(), 64)
        + "\n-----END CERTIFICATE-----\n"
        for d in kept
    ]
    return pki.write(tmp_path / "system.pem", "".join(blocks).encode() + replacement)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    system = _bundle_without(tmp_path, "Amazon Root CA 3")
    assert truststore.build("rsa", AMAZON, system, None, tmp_path).names  # rsa does not need root 3
    with pytest.raises(
        TrustError, match=r"Amazon Root CA 3 \(SHA-256 18ce6cfe.*\) is not in .*install or update"
    ):
        truststore.build("ecc", AMAZON, system, None, tmp_path)


def test_altered_root_is_a_clear_error(tmp_path: Path) -> None:
    fake = pki.make_root("Amazon Root CA 1", "rsa")  # same name, other key: an altered trust store
    system = _bundle_without(tmp_path, "Amazon Root CA 1", fake.cert_pem())
    with pytest.raises(TrustError, match="named 'Amazon Root CA 1' whose SHA-256 fingerprint is .* altered"):
        truststore.build("all", AMAZON, system, None, tmp_path)


def test_unreadable_system_bundle(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="cannot read the system CA bundle"):
        truststore.build("rsa", AMAZON, tmp_path / "absent.pem", None, tmp_path)


def test_custom_and_legacy_use_only_ca_file(tmp_path: Path) -> None:
    root = pki.make_root("Private Root", "ecc")
    ca_file = pki.write(tmp_path / "ca.pem", root.cert_pem())
    for mode in ("custom", "legacy"):
        bundle = truststore.build(mode, AMAZON, SYSTEM, ca_file, tmp_path / mode)
        assert bundle.path.read_bytes() == root.cert_pem()
        assert bundle.names == ("Private Root",)
    leaf = pki.make_client(root, "not-a-ca")
    with pytest.raises(TrustError, match="not a CA certificate: not-a-ca"):
        truststore.build(
            "custom", AMAZON, SYSTEM, pki.write(tmp_path / "leaf.pem", leaf.cert_pem()), tmp_path
        )
    with pytest.raises(TrustError, match="cannot read upstream.ca_file"):
        truststore.build("custom", AMAZON, SYSTEM, tmp_path / "none.pem", tmp_path)


def test_legacy_mode_warns_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatewayd.service.upstream.link import build_trust
    from gatewayd.stores.configfile import load
    from gatewayd_dev.gateway import write_config

    root = pki.make_root("VeriSign Class 3 Public Primary Certification Authority - G5", "rsa")
    ca_file = pki.write(tmp_path / "verisign.pem", root.cert_pem())
    config = load(
        write_config(
            tmp_path / "g.toml",
            {
                "gateway": {"thing_name": "gw", "state_dir": str(tmp_path / "s")},
                "upstream": {
                    "endpoint": "abc.iot.eu-west-1.amazonaws.com",
                    "validation_mode": "legacy",
                    "ca_file": str(ca_file),
                },
            },
        )
    )
    monkeypatch.setattr(logging.getLogger("gatewayd"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="gatewayd"):
        build_trust(config)
    (record,) = [r for r in caplog.records if getattr(r, "message_id", "") == logevents.LEGACY_TRUST.id]
    assert "AWS no longer supports legacy endpoints" in record.getMessage()


def test_expiry_warnings_are_a_pure_function_of_time() -> None:
    now = dt.datetime(2037, 6, 1, tzinfo=dt.UTC)
    roots = [("A", dt.datetime(2037, 12, 31, tzinfo=dt.UTC)), ("B", dt.datetime(2040, 5, 26, tzinfo=dt.UTC))]
    (warning,) = expiry_warnings(roots, now, 365)
    assert warning.name == "A" and warning.days_left == 213.0
    assert expiry_warnings(roots, now, 100) == []
    assert [w.name for w in expiry_warnings(roots, dt.datetime(2041, 1, 1, tzinfo=dt.UTC), 1)] == ["A", "B"]
