"""Issue 17, item 15: TLS 1.2 is restricted to forward-secret AEAD suites on the sensor listener and on the
uplink. In-memory handshakes (MemoryBIO) between real OpenSSL contexts."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gatewayd.adapters.tls import client_context
from gatewayd.service.downstream.listeners import server_context
from gatewayd_dev import pki


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """The TLS 1.2 suite agreed, or None when the handshake failed."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="gw.test")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return None
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    suite = c.cipher()
    return suite[0] if suite else None


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = pki.make_root("suites CA", "ecc")
    server = pki.make_server(ca, ["gw.test"], "ecc")
    client = pki.make_client(ca, "sensor")
    return {
        "ca": pki.write(tmp_path / "ca.pem", ca.cert_pem()),
        "server": pki.write(tmp_path / "server.pem", server.cert_pem()),
        "server_key": pki.write(tmp_path / "server.key", server.key_pem()),
        "client": pki.write(tmp_path / "client.pem", client.cert_pem()),
        "client_key": pki.write(tmp_path / "client.key", client.key_pem()),
    }


def _old_client(files: dict[str, Path], suites: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(suites)
    ctx.load_cert_chain(str(files["client"]), str(files["client_key"]))
    return ctx


def test_the_listener_refuses_weak_tls12_suites(files: dict[str, Path]) -> None:
    server = server_context(files["server"], files["server_key"], require_client_cert=True)
    server.load_verify_locations(cafile=str(files["ca"]))  # as Downstream adds the registry's anchors
    for weak in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"):
        assert _handshake(_old_client(files, weak), server) is None, weak
    assert (
        _handshake(_old_client(files, "ECDHE-ECDSA-AES128-GCM-SHA256"), server)
        == "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert (
        _handshake(_old_client(files, "ECDHE-ECDSA-CHACHA20-POLY1305"), server)
        == "ECDHE-ECDSA-CHACHA20-POLY1305"
    )


def test_the_uplink_offers_only_aead_ecdhe_in_tls12(files: dict[str, Path]) -> None:
    ctx = client_context(files["ca"], files["client"], files["client_key"], [])
    offered = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert offered and all(
        name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name) for name in offered
    )
    weak_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak_server.maximum_version = ssl.TLSVersion.TLSv1_2
    weak_server.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-SHA")
    weak_server.load_cert_chain(str(files["server"]), str(files["server_key"]))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert _handshake(ctx, weak_server) is None
