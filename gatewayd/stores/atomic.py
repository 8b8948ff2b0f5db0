"""Atomic, durable disk writes: a power cut at any instant leaves the old state or the new, never neither.

Pattern: write a temp file in the same directory with its final mode, fsync it, os.replace() it over the
target, fsync the directory. Symlinks flip the same way (temp link + os.replace), which is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace `path` with `data`, created with `mode` (never wider, whatever the umask)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def symlink(target: str, link: Path) -> None:
    """Atomically make `link` point at `target` (relative targets recommended)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_link(link: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
        fsync_dir(link.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written, fsynced temp directory appear under its final name in one step."""
    for entry in tmp.iterdir():
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(tmp)
    os.rename(tmp, final)  # fails if `final` exists: versions are never overwritten
    fsync_dir(final.parent)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path.parent)
