"""core/jsonsafe.py: JSON from outside with a bound on nesting (issue 17, item 12)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core import jsonsafe


def test_depth_ignores_brackets_in_strings() -> None:
    assert jsonsafe.depth(b'{"a": [1, {"b": "[[[{{{\\"]]]"}]}') == 3
    assert jsonsafe.depth(b'"' + b"[" * 1000 + b'"') == 0


def test_deep_documents_are_refused_with_value_error() -> None:
    for text in ("[" * 30000 + "]" * 30000, '{"a":' * 100 + "1" + "}" * 100, "[" * 200000):
        with pytest.raises(ValueError, match="nested"):
            jsonsafe.loads(text)
    assert jsonsafe.loads("[" * 64 + "]" * 64) == eval("[" * 64 + "]" * 64)
    with pytest.raises(ValueError):
        jsonsafe.loads("[" * 65 + "]" * 65)
    with pytest.raises(ValueError):
        jsonsafe.loads(b"{not json")


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab[]{}"\\ ', max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(values)
def test_same_result_as_json_within_the_bound(value: Any) -> None:
    text = json.dumps(value)
    assert jsonsafe.loads(text) == json.loads(text)
    assert jsonsafe.loads(text.encode()) == value
