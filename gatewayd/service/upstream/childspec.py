"""How an uplink process connects: the spec handed to the child (service/upstream/uplink_child.py) for one
identity version and one CA bundle, and the OpenSSL config that loads the TPM provider in it."""

from __future__ import annotations

from pathlib import Path

from gatewayd.adapters import tls
from gatewayd.core.config import Config
from gatewayd.service.upstream.uplink import ChildSpec
from gatewayd.stores import atomic
from gatewayd.stores.identity import IdentityStore, Version


def openssl_conf(state_dir: Path) -> Path:
    """STATE_DIR/uplink/openssl-tpm2.cnf, written (0600, in a 0700 directory) when missing or changed."""
    conf = state_dir / "uplink" / "openssl-tpm2.cnf"
    conf.parent.mkdir(mode=0o700, exist_ok=True)
    if conf.parent.stat().st_mode & 0o777 != 0o700:  # heals one made 0600 by a umask race (0.1.0)
        conf.parent.chmod(0o700)
    if not conf.exists() or conf.read_text() != tls.OPENSSL_TPM2_CONF:
        atomic.write_file(conf, tls.OPENSSL_TPM2_CONF.encode(), 0o600)
    return conf


def child_spec(
    config: Config, store: IdentityStore, version: Version, client_id: str, ca_bundle: Path
) -> ChildSpec:
    """How an uplink process connects with this certificate version (live, or staged for a trial) and this
    CA bundle."""
    key = store.key(version.key_number)
    up, ident = config.upstream, config.identity
    env: dict[str, str] = {}
    if ident.key_backend == "tpm":
        conf = openssl_conf(Path(config.gateway.state_dir))
        env = {"OPENSSL_CONF": str(conf), "TPM2OPENSSL_TCTI": ident.tcti}
    spec = {
        "endpoint": up.endpoint,
        "port": up.port,
        "connect_address": up.connect_address,
        "client_id": client_id,
        "keepalive": up.keepalive,
        "max_inflight": up.quota.max_inflight,
        "alpn": tls.alpn_protocols(up.alpn, up.port),
        "ca_bundle": str(ca_bundle),
        "cert_file": str(version.fullchain_file),
        "key_file": str(key.key_file),
        "reconnect_max_delay": up.reconnect_max_delay,
    }
    return ChildSpec(spec, env)
