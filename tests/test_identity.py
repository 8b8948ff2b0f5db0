"""The gateway's identity with a real software TPM: keys, CSRs, installation checks, the on-disk store."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatewayd.adapters import tpm
from gatewayd.core.errors import IdentityError, StoreLocked
from gatewayd.service.upstream.identity import Identity
from gatewayd.stores import atomic
from gatewayd.stores.configfile import load
from gatewayd.stores.identity import IdentityStore
from gatewayd_dev import pki
from gatewayd_dev.gateway import standin_config, write_config
from gatewayd_dev.softtpm import SoftTPM
from gatewayd_dev.stack import DevStack

MakeIdentity = Callable[..., Identity]


@pytest.fixture
def make_identity(devstack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeIdentity:
    for key, value in devstack.tpm.env().items():
        monkeypatch.setenv(key, value)

    def make(name: str = "gw", **sections: Any) -> Identity:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        config = load(write_config(workdir / "g.toml", standin_config(devstack, workdir, name, **sections)))
        return Identity(
            config, IdentityStore(Path(config.gateway.state_dir), config.identity.keep_versions).open()
        )

    return make


def sign(devstack: DevStack, csr_pem: bytes, days: float = 30, start: dt.datetime | None = None) -> bytes:
    validity = pki.Validity.days(days, start)
    return pki.pem(pki.sign_client_csr(devstack.standin.device_ca, csr_pem, validity))


def provisioned(devstack: DevStack, ident: Identity, days: float = 30) -> bytes:
    ident.create_key()
    cert = sign(devstack, ident.create_csr(), days)
    ident.install_certificate(cert)
    return cert


@pytest.mark.parametrize("key_type", ["ecc-p256", "ecc-p384", "rsa-2048", "rsa-3072"])
def test_tpm_key_and_csr_for_every_key_type(make_identity: MakeIdentity, key_type: str) -> None:
    ident = make_identity(f"gw-{key_type}", identity={"key_type": key_type, "organization": "Acme"})
    key = ident.create_key()
    assert key.blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert stat.S_IMODE(key.key_file.stat().st_mode) == 0o600
    assert key.meta["backend"] == "tpm" and key.meta["keyType"] == key_type
    assert key.meta["tpmParent"] == "0x81000001"
    csr = x509.load_pem_x509_csr(ident.create_csr())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN=gw-{key_type},O=Acme"
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert hashlib.sha256(spki).hexdigest() == key.meta["publicKeySha256"]


def test_keys_leave_no_persistent_objects_but_the_srk(make_identity: MakeIdentity) -> None:
    ident = make_identity("gw-leak")
    for _ in range(3):
        ident.create_key()
    assert tpm.persistent_handles(ident.config.identity.tcti) == [0x81000001]


def test_key_blob_holds_no_private_key_material(make_identity: MakeIdentity) -> None:
    key = make_identity().create_key()
    with pytest.raises((ValueError, TypeError)):  # not a PKCS#8/SEC1 key: only the TPM can use it
        serialization.load_pem_private_key(key.blob, password=None)


def test_key_blob_cannot_be_loaded_by_another_tpm(make_identity: MakeIdentity, tmp_path: Path) -> None:
    import subprocess
    import sys

    blob = make_identity().create_key().blob
    (tmp_path / "blob.pem").write_bytes(blob)
    # A fresh process per TPM: GLib keeps one session-bus connection per process.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gatewayd.adapters import tpm\n"
        "blob = Path(sys.argv[1]).read_bytes()\n"
        "if sys.argv[2] == 'srk':\n"
        "    with tpm.esapi(tpm_tcti := 'tabrmd:bus_type=session') as ectx:\n"
        "        tpm.ensure_srk(ectx, 0x81000001)\n"
        "try:\n"
        "    tpm.check_loadable('tabrmd:bus_type=session', blob)\n"
        "except tpm.TPMError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    with SoftTPM(tmp_path / "other-tpm") as other:
        for mode in ("no-srk", "srk"):  # without an SRK at 0x81000001, then with its own SRK there
            result = subprocess.run(
                [sys.executable, "-c", script, str(tmp_path / "blob.pem"), mode],
                env={**os.environ, **other.env()},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.stdout.startswith("refused: this TPM cannot load the key"), (mode, result)
    # ...while the TPM that made it loads it.
    tpm.check_loadable("tabrmd:bus_type=session", blob)


def test_file_backend_key_and_csr(make_identity: MakeIdentity, devstack: DevStack) -> None:
    ident = make_identity("gw-file", identity={"key_backend": "file"})
    cert = provisioned(devstack, ident)
    key = ident.store.key(ident.store.live().key_number)  # type: ignore[union-attr]
    assert key.blob.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key.key_file.stat().st_mode) == 0o600
    assert (
        ident.show()["certificateId"]
        == hashlib.sha256(
            x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        ).hexdigest()
    )


def test_install_and_show(make_identity: MakeIdentity, devstack: DevStack) -> None:
    ident = make_identity("gw-show")
    cert_pem = provisioned(devstack, ident, days=90)
    cert = x509.load_pem_x509_certificate(cert_pem)
    shown = ident.show()
    assert shown["certificateId"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert shown["subject"] == "CN=gw-show" and shown["subjectCommonName"] == "gw-show"
    assert shown["issuer"] == cert.issuer.rfc4514_string()
    assert shown["serial"] == format(cert.serial_number, "x")
    assert 89 < shown["daysLeft"] <= 90
    assert shown["notAfter"].endswith("Z") and shown["notBefore"].endswith("Z")
    assert (
        shown["keyBackend"] == "tpm" and shown["keyType"] == "ecc-p256" and shown["tpmParent"] == "0x81000001"
    )
    assert shown["pendingKey"] is None
    assert [v["live"] for v in shown["versions"]] == [True]
    ready = ident.check_live()
    assert ready.summary.certificate_id == shown["certificateId"]


def _state(ident: Identity) -> tuple[Any, ...]:
    live = ident.store.live()
    return (
        live.number if live else None,
        [v.number for v in ident.store.versions()],
        sorted(os.listdir(ident.store.root)),
    )


def test_install_refusals_change_nothing(make_identity: MakeIdentity, devstack: DevStack) -> None:
    ident = make_identity("gw-refuse")
    provisioned(devstack, ident)
    before = _state(ident)
    other_key = pki.make_client(devstack.standin.device_ca, "gw-refuse")
    now = dt.datetime.now(dt.UTC)
    csr = ident.create_csr()
    cases: list[tuple[bytes, str]] = [
        (other_key.cert_pem(), "does not match the gateway's key"),
        (sign(devstack, csr, 1, now - dt.timedelta(days=10)), "expired at"),
        (sign(devstack, csr, 10, now + dt.timedelta(days=2)), "not valid before"),
        (devstack.standin.device_ca.cert_pem(), "is a CA certificate"),
        (b"not a certificate", "no PEM certificate found"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid certificate"),
    ]
    for data, reason in cases:
        with pytest.raises(IdentityError, match=reason):
            ident.install_certificate(data)
        assert _state(ident) == before


def test_issuer_ca_file_is_enforced(make_identity: MakeIdentity, devstack: DevStack, tmp_path: Path) -> None:
    foreign = pki.make_root("Foreign CA", "ecc")
    foreign_file = pki.write(tmp_path / "foreign.pem", foreign.cert_pem())
    ident = make_identity("gw-issuer", identity={"issuer_ca_file": str(foreign_file)})
    ident.create_key()
    with pytest.raises(IdentityError, match="does not chain to identity.issuer_ca_file"):
        ident.install_certificate(sign(devstack, ident.create_csr()))
    good = make_identity("gw-issuer2", identity={"issuer_ca_file": str(devstack.standin.device_ca_file)})
    provisioned(devstack, good)
    assert good.store.live() is not None


def test_issuer_check_follows_an_intermediate_chain(make_identity: MakeIdentity, tmp_path: Path) -> None:
    root = pki.make_root("Fleet Root", "ecc")
    inter = pki.make_intermediate(root, "Fleet Issuing CA", "ecc")
    root_file = pki.write(tmp_path / "root.pem", root.cert_pem())
    ident = make_identity("gw-chain", identity={"issuer_ca_file": str(root_file)})
    ident.create_key()
    cert = pki.pem(pki.sign_client_csr(inter, ident.create_csr()))
    with pytest.raises(IdentityError, match="does not chain"):  # intermediate missing
        ident.install_certificate(cert)
    version = ident.install_certificate(cert, inter.cert_pem())
    assert version.fullchain_file.read_bytes() == cert + inter.cert_pem()


def test_versions_are_pruned_to_keep_and_keys_with_them(
    make_identity: MakeIdentity, devstack: DevStack
) -> None:
    ident = make_identity("gw-prune", identity={"keep_versions": 2})
    for _ in range(4):
        provisioned(devstack, ident)
    assert [v.number for v in ident.store.versions()] == [3, 4]
    assert ident.store.live().number == 4  # type: ignore[union-attr]
    assert [k.number for k in ident.store.stored_keys()] == [3, 4]


def test_recover_removes_half_written_state(make_identity: MakeIdentity, devstack: DevStack) -> None:
    ident = make_identity("gw-recover")
    provisioned(devstack, ident)
    store = ident.store
    (store.archive_dir / ".tmp-9").mkdir()
    (store.archive_dir / ".tmp-9" / "cert.pem").write_text("partial")
    (store.keys_dir / ".tmp-7").mkdir()
    (store.root / ".live.tmp-123").symlink_to("archive/1")
    (store.root / "staged").symlink_to("archive/42")  # points nowhere
    cleaned = store.recover()
    assert set(cleaned) == {"archive/.tmp-9", "keys/.tmp-7", ".live.tmp-123", "dangling staged"}
    assert store.live().number == 1  # type: ignore[union-attr]


def test_lock_is_exclusive(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    with (
        store.locked(),
        pytest.raises(StoreLocked, match="in use by another process"),
        IdentityStore(tmp_path).locked(),
    ):
        pass


@pytest.fixture
def crash_at() -> Iterator[Callable[[int], None]]:
    """Make the Nth durable step (file fsync, dir fsync, rename, replace) raise, like a power cut there."""
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}
    counter = {"n": 0, "crash": -1}

    def wrap(name: str) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            counter["n"] += 1
            if counter["n"] == counter["crash"]:
                raise OSError(5, "simulated power cut")
            return real[name](*args)

        return step

    def arm(n: int) -> None:
        counter["n"], counter["crash"] = 0, n

    for name in real:
        setattr(atomic.os, name, wrap(name))  # atomic.os is the os module: restored below
    try:
        yield arm
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)


def test_install_is_all_or_nothing_at_every_step(
    make_identity: MakeIdentity, devstack: DevStack, crash_at: Callable[[int], None]
) -> None:
    """A power cut at each durable step of an install leaves the old identity or the new one, whole."""
    crashes = 0
    for n in range(1, 60):
        ident = make_identity(f"gw-crash-{n}")
        old = x509.load_pem_x509_certificate(provisioned(devstack, ident))
        ident.create_key()
        new_pem = sign(devstack, ident.create_csr())
        new = x509.load_pem_x509_certificate(new_pem)
        crash_at(n)
        try:
            ident.install_certificate(new_pem)
        except OSError:
            crashes += 1
        else:
            break  # step n does not exist: every step before it was tried
        finally:
            crash_at(-1)
        fresh = IdentityStore(ident.store.root.parent)  # "after the reboot"
        fresh.recover()
        live = fresh.live()
        assert live is not None, f"no live identity after a crash at step {n}"
        assert live.certificate() in (old, new), n
        assert live.fullchain_file.read_bytes().startswith(live.cert_file.read_bytes())
        assert not [p for p in fresh.archive_dir.iterdir() if p.name.startswith(".")], n
    else:
        raise AssertionError("install never completed")
    print(f"{crashes} crash points exercised")
    assert crashes >= 8, f"only {crashes} durable steps were exercised"


def test_config_of_identity_is_validated(tmp_path: Path) -> None:
    from gatewayd.core.errors import ConfigError

    path = write_config(
        tmp_path / "g.toml",
        {
            "gateway": {"thing_name": "gw"},
            "upstream": {"endpoint": "x-ats.iot.eu-west-1.amazonaws.com", "validation_mode": "custom"},
            "identity": {"key_type": "dsa-1024", "parent_handle": 5, "keep_versions": 1},
        },
    )
    with pytest.raises(ConfigError) as err:
        load(path)
    assert sorted(p.key for p in err.value.problems) == [
        "identity.keep_versions",
        "identity.key_type",
        "identity.parent_handle",
        "upstream.ca_file",
    ]


def test_staged_version_is_not_live_until_promoted(make_identity: MakeIdentity, devstack: DevStack) -> None:
    ident = make_identity("gw-stage")
    provisioned(devstack, ident)
    store = ident.store
    old = store.live()
    key = ident.create_key()
    cert = sign(devstack, ident.create_csr())
    version = store.add_version(key, cert, b"", {"certificateId": "x"})
    store.stage(version)
    assert store.staged().number == version.number and store.live().number == old.number  # type: ignore[union-attr]
    assert store.prune() == []  # neither the live nor the staged version is ever pruned
    store.promote(version)
    assert store.live().number == version.number and store.staged() is None  # type: ignore[union-attr]
    assert store.pending_key() is None  # the promoted version used the pending key
    store.stage(old)  # type: ignore[arg-type]
    store.unstage()
    assert store.staged() is None and store.live().number == version.number  # type: ignore[union-attr]
