"""Upgrading from the SQLite spool of gatewayd 0.x (state_dir/spool.db, WAL): its messages are moved into the
spill store (stores/spill.py) at start, in their order, then the old files are removed. Nothing is dropped:
the store takes them whatever its bounds (they were acknowledged to their sensors); a power cut during the
move leaves spool.db in place and the move starts again, so at worst some messages are sent twice
(at-least-once, as everywhere else)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.stores.spill import Reading, SpillStore

BATCH = 2000


@dataclass(frozen=True)
class Migrated:
    messages: int
    bytes: int


def migrate_sqlite_spool(old: Path, store: SpillStore) -> Migrated | None:
    """Move every message of `old` (spool.db) into `store`, then delete spool.db and its -wal/-shm files.
    None when there is no old spool."""
    if not old.exists():
        return None
    db = sqlite3.connect(f"file:{old}?mode=rw", uri=True, isolation_level=None)
    try:
        has_table = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='messages'"
        ).fetchone()
        rows: Iterator[tuple[Any, ...]] = (
            db.execute("SELECT seq, sensor, topic, payload, qos, retain, enqueued FROM messages ORDER BY seq")
            if has_table
            else iter(())
        )
        count = size = 0
        limit, store.max_bytes = store.max_bytes, 1 << 62  # they were acknowledged: taken whatever the bound
        try:
            batch: list[tuple[Reading, bool]] = []
            for row in rows:
                _, sensor, topic, payload, qos, retain, enqueued = row
                reading = Reading(
                    str(sensor), str(topic), bytes(payload), int(qos), bool(retain), float(enqueued)
                )
                batch.append((reading, True))
                count += 1
                size += len(payload)
                if len(batch) >= BATCH:
                    store.append(batch)
                    batch = []
            if batch:
                store.append(batch)
        finally:
            store.max_bytes = limit
    finally:
        db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{old}{suffix}").unlink(missing_ok=True)
    fd = os.open(old.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return Migrated(count, size)
