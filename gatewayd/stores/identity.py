"""The gateway's identity on disk: keys and certificate versions, immutable, with atomically flipped pointers.

Layout under STATE_DIR/identity (certbot-style, every write atomic and durable, see stores/atomic.py):

    keys/K/key.pem, key.json           a key (TSS2 blob or software key) and its metadata; never changed
    archive/N/cert.pem, chain.pem,     a certificate version for key K; never changed
              fullchain.pem, version.json
    live        -> archive/N           the identity the uplink uses (promoted)
    staged      -> archive/M           a version being proven before promotion (renewal)
    pending-key -> keys/K              a key created for a CSR that has no certificate yet

A new key or version is written in a `.tmp-*` directory and renamed into place, then a pointer is flipped
with a temp link and rename: a power cut leaves the old state or the new one, and `recover()` removes any
half-written temp directory at start. Old versions beyond `keep` are pruned, never the live or staged one;
keys no version or pointer refers to are pruned with them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from gatewayd.core.errors import StoreLocked
from gatewayd.stores import atomic
from gatewayd.stores.x509util import load_pem_certificates

T = TypeVar("T")

_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class StoredKey:
    number: int
    path: Path  # keys/K
    meta: dict[str, Any]

    @property
    def blob(self) -> bytes:
        return (self.path / "key.pem").read_bytes()

    @property
    def key_file(self) -> Path:
        return self.path / "key.pem"


@dataclass(frozen=True)
class Version:
    number: int
    path: Path  # archive/N
    meta: dict[str, Any]

    @property
    def cert_file(self) -> Path:
        return self.path / "cert.pem"

    @property
    def fullchain_file(self) -> Path:
        """Certificate followed by its chain: what the gateway presents in the TLS handshake."""
        return self.path / "fullchain.pem"

    @property
    def key_number(self) -> int:
        return int(self.meta["key"])

    def certificate(self) -> x509.Certificate:
        return load_pem_certificates(self.cert_file.read_bytes(), str(self.cert_file))[0]


class IdentityStore:
    def __init__(self, state_dir: Path, keep: int = 3) -> None:
        self.root = state_dir / "identity"
        self.keys_dir = self.root / "keys"
        self.archive_dir = self.root / "archive"
        self.keep = keep

    # ------------------------------------------------------------------ setup and recovery

    def open(self) -> IdentityStore:
        for d in (self.root, self.keys_dir, self.archive_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    def recover(self) -> list[str]:
        """Undo what a power cut may have left half done; returns what was cleaned (for the log)."""
        cleaned: list[str] = []
        for d in (self.keys_dir, self.archive_dir, self.root):
            for entry in d.iterdir():
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    if entry.is_dir() and not entry.is_symlink():
                        atomic.remove_tree(entry)
                    else:
                        entry.unlink()
                    cleaned.append(str(entry.relative_to(self.root)))
        for link in ("live", "staged", "pending-key"):
            path = self.root / link
            if path.is_symlink() and not path.exists():
                atomic.remove_link(path)
                cleaned.append(f"dangling {link}")
        return cleaned

    @contextmanager
    def locked(self, wait: bool = False) -> Iterator[IdentityStore]:
        """Exclusive lock on the state directory (the daemon holds it for its whole life)."""
        self.open()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise StoreLocked(f"{self.root} is in use by another process (is gatewayd running?)") from exc
            yield self
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def _numbers(self, d: Path) -> list[int]:
        return sorted(int(p.name) for p in d.iterdir() if _NUMBER.fullmatch(p.name))

    def key(self, number: int) -> StoredKey:
        path = self.keys_dir / str(number)
        return StoredKey(number, path, json.loads((path / "key.json").read_text()))

    def version(self, number: int) -> Version:
        path = self.archive_dir / str(number)
        return Version(number, path, json.loads((path / "version.json").read_text()))

    def _pointer(self, name: str) -> int | None:
        link = self.root / name
        if not link.is_symlink() or not link.exists():
            return None
        return int(Path(os.readlink(link)).name)

    def live(self) -> Version | None:
        number = self._pointer("live")
        return self.version(number) if number is not None else None

    def staged(self) -> Version | None:
        number = self._pointer("staged")
        return self.version(number) if number is not None else None

    def pending_key(self) -> StoredKey | None:
        number = self._pointer("pending-key")
        return self.key(number) if number is not None else None

    def versions(self) -> list[Version]:
        """Every version on disk; one pruned between the listing and its reading is left out (a renewal
        prunes in a worker thread while `identity show` may be reading)."""
        return [v for n in self._numbers(self.archive_dir) if (v := self._if_present(self.version, n))]

    def stored_keys(self) -> list[StoredKey]:
        return [k for n in self._numbers(self.keys_dir) if (k := self._if_present(self.key, n))]

    @staticmethod
    def _if_present(read: Callable[[int], T], number: int) -> T | None:
        try:
            return read(number)
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ writing

    def add_key(self, blob: bytes, meta: dict[str, Any]) -> StoredKey:
        """Store a new key and make it the pending key (the one the next CSR is for)."""
        number = (self._numbers(self.keys_dir) or [0])[-1] + 1
        tmp = self.keys_dir / f".tmp-{number}"
        atomic.remove_tree(tmp)
        tmp.mkdir(mode=0o700)
        _write(tmp / "key.pem", blob, 0o600)
        _write(tmp / "key.json", _json(meta), 0o600)
        atomic.publish_dir(tmp, self.keys_dir / str(number))
        atomic.symlink(f"keys/{number}", self.root / "pending-key")
        return self.key(number)

    def add_version(self, key: StoredKey, cert_pem: bytes, chain_pem: bytes, meta: dict[str, Any]) -> Version:
        """Store a certificate version for `key` (not yet live: see promote)."""
        number = (self._numbers(self.archive_dir) or [0])[-1] + 1
        tmp = self.archive_dir / f".tmp-{number}"
        atomic.remove_tree(tmp)
        tmp.mkdir(mode=0o700)
        _write(tmp / "cert.pem", cert_pem, 0o644)
        _write(tmp / "chain.pem", chain_pem, 0o644)
        _write(tmp / "fullchain.pem", cert_pem + chain_pem, 0o644)
        _write(tmp / "version.json", _json({**meta, "key": key.number}), 0o644)
        atomic.publish_dir(tmp, self.archive_dir / str(number))
        return self.version(number)

    def stage(self, version: Version) -> None:
        atomic.symlink(f"archive/{version.number}", self.root / "staged")

    def unstage(self) -> None:
        atomic.remove_link(self.root / "staged")

    def promote(self, version: Version) -> None:
        """Make `version` live in one atomic step; clear pending/staged pointers that it satisfies."""
        atomic.symlink(f"archive/{version.number}", self.root / "live")
        pending = self._pointer("pending-key")
        if pending == version.key_number:
            atomic.remove_link(self.root / "pending-key")
        if self._pointer("staged") == version.number:
            atomic.remove_link(self.root / "staged")

    def discard(self) -> list[str]:
        """Remove what an unfinished renewal left: the staged version and the pending key, unless the live
        version uses them. Returns what was removed (for the log)."""
        removed: list[str] = []
        live = self._pointer("live")
        live_key = self.version(live).key_number if live is not None else None
        staged = self._pointer("staged")
        if staged is not None:
            atomic.remove_link(self.root / "staged")
            if staged != live:
                atomic.remove_tree(self.archive_dir / str(staged))
                removed.append(f"archive/{staged}")
        pending = self._pointer("pending-key")
        if pending is not None:
            atomic.remove_link(self.root / "pending-key")
            used = {self.version(n).key_number for n in self._numbers(self.archive_dir)}
            if pending != live_key and pending not in used:
                atomic.remove_tree(self.keys_dir / str(pending))
                removed.append(f"keys/{pending}")
        return removed

    def prune(self) -> list[str]:
        """Keep the newest `keep` versions (always the live and staged ones) and the keys they use."""
        protected = {n for n in (self._pointer("live"), self._pointer("staged")) if n is not None}
        numbers = self._numbers(self.archive_dir)
        keep = set(numbers[-self.keep :]) | protected
        removed: list[str] = []
        for n in numbers:
            if n not in keep:
                atomic.remove_tree(self.archive_dir / str(n))
                removed.append(f"archive/{n}")
        used_keys = {self.version(n).key_number for n in self._numbers(self.archive_dir)}
        pending = self._pointer("pending-key")
        for k in self._numbers(self.keys_dir):
            if k not in used_keys and k != pending:
                atomic.remove_tree(self.keys_dir / str(k))
                removed.append(f"keys/{k}")
        return removed


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True, default=_default).encode() + b"\n"


def _default(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    raise TypeError(f"cannot store {type(value).__name__} in JSON")
