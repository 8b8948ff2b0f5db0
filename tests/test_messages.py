"""MESSAGE_IDs: well formed, unique, and documented (docs/messages.md is generated from the code)."""

from __future__ import annotations

import re

from gatewayd.core import messages
from gatewayd_dev.docgen import messages_md

from .conftest import REPO


def test_ids_are_unique_128_bit_hex() -> None:
    ids = [m.id for m in messages.ALL]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({m.name for m in messages.ALL}) == len(ids)


def test_all_lists_every_message_defined() -> None:
    defined = {v for v in vars(messages).values() if isinstance(v, messages.Message)}
    assert defined == set(messages.ALL)


def test_docs_page_is_current() -> None:
    committed = (REPO / "docs" / "messages.md").read_text()
    assert committed == messages_md(), "docs/messages.md is stale: run python -m gatewayd_dev.docgen"
    for m in messages.ALL:
        assert f"## {m.name}\n\n- id: `{m.id}`" in committed
