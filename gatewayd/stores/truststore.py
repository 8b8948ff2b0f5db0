"""Build the uplink's CA bundle for the validation mode and write it, holding only the selected roots.

Amazon roots come from the system's ca-certificates bundle (`upstream.system_ca_bundle`), matched by pinned
fingerprint: a missing root, or a certificate with an Amazon root's name but another fingerprint (an altered
trust store), is a start-up error that says which and what to do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gatewayd.core.errors import CertificateError, TrustError
from gatewayd.core.trust import FILE_MODES, Catalog, Root
from gatewayd.stores import atomic
from gatewayd.stores.x509util import common_name, is_ca, not_after, pem, pem_blocks_der, read_certificates

DEV_CATALOG_ENV = "GATEWAYD_DEV_ROOT_CATALOG"  # tests and the demo: the stand-in's roots play Amazon's


@dataclass(frozen=True)
class TrustBundle:
    mode: str
    path: Path  # where the bundle was written
    certs: tuple[x509.Certificate, ...]
    names: tuple[str, ...]
    source: str

    @property
    def size(self) -> int:
        return len(pem(*self.certs))


def catalog_from_env(default: Catalog) -> Catalog:
    """The dev catalog named by GATEWAYD_DEV_ROOT_CATALOG, else `default`."""
    path = os.environ.get(DEV_CATALOG_ENV)
    if not path:
        return default
    data = json.loads(Path(path).read_text())
    roots = tuple(Root(r["name"], r["sha256"], r["algorithm"]) for r in data["roots"])
    return Catalog(roots, {m: tuple(n) for m, n in data["modes"].items()}, f"development catalog {path}")


def select(
    mode: str, catalog: Catalog, system_bundle: Path, ca_file: Path | None
) -> tuple[list[x509.Certificate], list[str], str]:
    """The certificates the mode trusts, their names, and where they came from."""
    if mode in FILE_MODES:
        if ca_file is None:
            raise TrustError(f"validation_mode {mode!r} needs upstream.ca_file")
        try:
            certs = read_certificates(ca_file, "upstream.ca_file")
        except CertificateError as exc:
            raise TrustError(str(exc)) from exc
        not_ca = [common_name(c.subject) or c.subject.rfc4514_string() for c in certs if not is_ca(c)]
        if not_ca:
            raise TrustError(f"{ca_file}: not a CA certificate: {', '.join(not_ca)}")
        return certs, [common_name(c.subject) or c.subject.rfc4514_string() for c in certs], str(ca_file)
    try:
        blocks = pem_blocks_der(system_bundle.read_bytes())
    except OSError as exc:
        raise TrustError(
            f"cannot read the system CA bundle {system_bundle}: {exc.strerror} (install ca-certificates)"
        ) from exc
    by_fingerprint = {hashlib.sha256(block).hexdigest(): block for block in blocks}
    chosen: list[x509.Certificate] = []
    for root in catalog.roots_for(mode):
        block = by_fingerprint.get(root.sha256)
        if block is None:
            raise TrustError(_missing_root(root, blocks, system_bundle))
        chosen.append(x509.load_der_x509_certificate(block))
    return chosen, [r.name for r in catalog.roots_for(mode)], f"{system_bundle} ({catalog.origin})"


def _missing_root(root: Root, blocks: list[bytes], system_bundle: Path) -> str:
    with warnings.catch_warnings():  # some unrelated system roots have odd serials; irrelevant here
        warnings.simplefilter("ignore")
        impostors = [
            der for der in blocks if common_name(x509.load_der_x509_certificate(der).subject) == root.name
        ]
    if impostors:
        return (
            f"{system_bundle} holds a certificate named {root.name!r} whose SHA-256 fingerprint is "
            f"{hashlib.sha256(impostors[0]).hexdigest()}, not the pinned {root.sha256}: the trust store was "
            "altered; reinstall ca-certificates"
        )
    return (
        f"{root.name} (SHA-256 {root.sha256}) is not in {system_bundle}: install or update ca-certificates, "
        "or check that the root is not disabled in /etc/ca-certificates.conf"
    )


OVERRIDE = "override.json"  # written by `gatewayctl trust update`: takes precedence over the config


def build(
    mode: str,
    catalog: Catalog,
    system_bundle: Path,
    ca_file: Path | None,
    state_dir: Path,
    name: str = "bundle.pem",
) -> TrustBundle:
    """Select the roots and write STATE_DIR/trust/<name> (only if its content changed)."""
    certs, names, source = select(mode, catalog, system_bundle, ca_file)
    trust_dir = state_dir / "trust"
    trust_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = trust_dir / name
    data = pem(*certs)
    if not path.exists() or path.read_bytes() != data:
        atomic.write_file(path, data, 0o644)
    return TrustBundle(mode, path, tuple(certs), tuple(names), source)


def root_expiries(bundle: TrustBundle) -> list[tuple[str, dt.datetime]]:
    return [(name, not_after(cert)) for name, cert in zip(bundle.names, bundle.certs, strict=True)]


def read_override(state_dir: Path) -> tuple[str, str] | None:
    """(mode, ca_file) set by `gatewayctl trust update`, or None."""
    path = state_dir / "trust" / OVERRIDE
    try:
        body = json.loads(path.read_text())
        return str(body["mode"]), str(body.get("caFile") or "")
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError) as exc:
        raise TrustError(f"{path} is unreadable ({exc}): remove it to use the configured trust") from exc


def write_override(state_dir: Path, override: tuple[str, str] | None) -> None:
    path = state_dir / "trust" / OVERRIDE
    if override is None:
        if path.exists():
            path.unlink()
            atomic.fsync_dir(path.parent)
        return
    body = {"mode": override[0], "caFile": override[1]}
    atomic.write_file(path, json.dumps(body, indent=2).encode() + b"\n", 0o600)
