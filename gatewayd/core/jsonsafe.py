"""JSON from outside (sensors' payloads and serial records, control requests, transfer files, AWS IoT's
answers) parsed with a bound on nesting: deeper documents are refused with ValueError, never a RecursionError
(CPython's decoder recurses once per level)."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # levels of arrays and objects; real readings and requests use a handful
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (brackets inside strings do not count)."""
    level = deepest = 0
    for token in _TOKENS.finditer(data):
        ch = token.group()[:1]
        if ch in b"[{":
            level += 1
            deepest = max(deepest, level)
        elif ch in b"]}":
            level -= 1
    return deepest


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with at most `max_depth` levels of nesting; ValueError (json.JSONDecodeError or a plain one)
    for anything else. Costs two counts for a document with few brackets, one scan otherwise."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
