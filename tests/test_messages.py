"""MESSAGE_IDs: well formed, unique, and every one documented in docs/messages.md."""

from __future__ import annotations

import re

from gatewayd.core import messages

from .conftest import REPO


def test_ids_are_unique_128_bit_hex() -> None:
    ids = [m.id for m in messages.ALL]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({m.name for m in messages.ALL}) == len(ids)


def test_all_lists_every_message_defined() -> None:
    defined = {v for v in vars(messages).values() if isinstance(v, messages.Message)}
    assert defined == set(messages.ALL)


def test_every_message_is_documented() -> None:
    doc = (REPO / "docs" / "messages.md").read_text()
    for m in messages.ALL:
        section = re.search(rf"^## {m.name}\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
        assert section, f"{m.name} missing from docs/messages.md"
        assert f"`{m.id}`" in section.group(1), f"{m.name}: id missing or wrong in docs/messages.md"
        assert f"priority {m.priority.value} ({m.priority.name.lower()})" in section.group(1), m.name
    documented = re.findall(r"^## (\w+)$", doc, re.M)
    assert sorted(documented) == sorted(m.name for m in messages.ALL), "docs list a message the code lacks"
