"""core/mqtt/subindex.py against core/mqtt/topics.matches (issue 17, item 7: an indexed matcher)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.mqtt.subindex import FilterIndex
from gatewayd.core.mqtt.topics import matches

LEVEL = st.sampled_from(["a", "b", "$sys", "", "c"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels[-1] = "#"
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(
    added=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3"]), filters()), max_size=25),
    removed=st.lists(st.integers(0, 24), max_size=8),
    topics=st.lists(TOPIC, min_size=1, max_size=8),
)
def test_the_index_matches_exactly_what_a_scan_matches(
    added: list[tuple[str, str]], removed: list[int], topics: list[str]
) -> None:
    index: FilterIndex[str] = FilterIndex()
    live: dict[tuple[str, str], str] = {}
    for owner, topic_filter in added:
        index.add(owner, topic_filter, topic_filter)
        live[(owner, topic_filter)] = topic_filter
    for i in removed:
        if i < len(added) and added[i] in live:
            index.remove(*added[i])
            del live[added[i]]
    for topic in topics:
        expected = sorted((o, f) for (o, f) in live if matches(f, topic))
        assert sorted(index.match(topic)) == expected, topic
    assert len(index) == len(live)
    for owner in ("s1", "s2", "s3"):
        index.remove_owner(owner)
    assert len(index) == 0 and index.match("a/b") == []
