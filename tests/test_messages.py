"""MESSAGE_IDs: well formed, unique, and documented (docs/messages.md is generated from the code)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from gatewayd.core import logevents
from gatewayd_dev.docgen import catalog, messages_md

from .conftest import REPO


def test_ids_are_unique_128_bit_hex() -> None:
    ids = [m.id for m in logevents.ALL]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({m.name for m in logevents.ALL}) == len(ids)


def test_all_lists_every_message_defined() -> None:
    defined = {v for v in vars(logevents).values() if isinstance(v, logevents.Entry)}
    assert defined == set(logevents.ALL)


def test_docs_page_is_current() -> None:
    committed = (REPO / "docs" / "messages.md").read_text()
    assert committed == messages_md(), "docs/messages.md is stale: run python -m gatewayd_dev.docgen"
    for m in logevents.ALL:
        assert f"## {m.name}\n\n- id: `{m.id}`" in committed


def test_catalog_is_current_and_journalctl_reads_every_entry(tmp_path: Path) -> None:
    committed = (REPO / "systemd" / "gatewayd.catalog").read_text()
    assert committed == catalog(), "systemd/gatewayd.catalog is stale: run python -m gatewayd_dev.docgen"
    # journalctl itself compiles it, as the systemd package's trigger does on a gateway.
    catdir = tmp_path / "usr/lib/systemd/catalog"
    catdir.mkdir(parents=True)
    (catdir / "gatewayd.catalog").write_text(committed)
    (tmp_path / "var/lib/systemd/catalog").mkdir(parents=True)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, capture_output=True)
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True, capture_output=True, text=True
    ).stdout
    for m in logevents.ALL:
        assert f"{m.id} gatewayd: {m.name}" in listed
