"""Topic matching, policy evaluation with variables, AWS topic limits and the upstream mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.mqtt.topics import (
    Policy,
    TopicMap,
    aws_topic_problem,
    check_policy_filters,
    filter_covers,
    matches,
    policy_variables,
)
from gatewayd.core.topics import TemplateError


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),  # '#' includes the parent level (section 4.7.1.2)
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/x", True),  # an empty first level is a level
        ("+", "$SYS", False),  # wildcards do not match $-topics at the first level (section 4.7.2)
        ("#", "$aws/things", False),
        ("$aws/#", "$aws/things", True),
        ("a/b", "a/b/", False),
    ],
)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


level = st.sampled_from(["a", "b", "c", ""])
topics = st.lists(level, min_size=1, max_size=4).map("/".join)
filters = st.lists(st.sampled_from(["a", "b", "+"]), min_size=1, max_size=4).map("/".join) | st.builds(
    lambda f: f + "/#", st.lists(st.sampled_from(["a", "+"]), min_size=1, max_size=3).map("/".join)
)


@settings(max_examples=500)
@given(filters, filters, topics)
def test_covers_is_sound(outer: str, inner: str, topic: str) -> None:
    """If `outer` covers `inner`, every topic `inner` matches, `outer` matches too."""
    if filter_covers(outer, inner) and matches(inner, topic):
        assert matches(outer, topic)


def test_default_policy_with_variables() -> None:
    policy = Policy(publish=("sensors/${iot:ClientId}/#",), subscribe=("commands/${iot:ClientId}/#",))
    bound = policy.bind(policy_variables("s1", "s1", "gw"))
    assert bound.may_publish("sensors/s1/temp")
    assert not bound.may_publish("sensors/s2/temp")
    assert bound.may_subscribe("commands/s1/#") and bound.may_subscribe("commands/s1/reboot")
    assert not bound.may_subscribe("commands/#")  # wider than allowed
    assert not bound.may_subscribe("commands/+/reboot")


def test_deny_wins() -> None:
    policy = Policy(
        publish=("sensors/${iot:ClientId}/#",),
        subscribe=("commands/#",),
        deny_publish=("sensors/+/config",),
        deny_subscribe=("commands/admin/#",),
    )
    bound = policy.bind(policy_variables("s1", "s1", "gw"))
    assert not bound.may_publish("sensors/s1/config") and bound.may_publish("sensors/s1/temp")
    assert not bound.may_subscribe("commands/admin/x")
    assert not bound.may_subscribe("commands/#")  # would receive what the deny forbids
    assert bound.may_subscribe("commands/s1/#")


def test_client_id_with_wildcards_cannot_widen_a_filter() -> None:
    policy = Policy(publish=("sensors/${iot:ClientId}/#",), subscribe=("commands/${iot:ClientId}",))
    bound = policy.bind(policy_variables("#", "#", "gw"))
    assert not bound.may_publish("sensors/other/x")
    assert not bound.may_subscribe("commands/#")


def test_config_check_of_filters() -> None:
    assert check_policy_filters(("sensors/${iot:ClientId}/#",)) is None
    assert "unknown variable" in (check_policy_filters(("a/${iot:Nope}",)) or "")
    assert "not a valid topic filter" in (check_policy_filters(("a/#/b",)) or "")


def test_aws_topic_limits() -> None:
    assert aws_topic_problem("gw/sensors/s1/t") is None
    assert "reserved" in (aws_topic_problem("$aws/things/x/shadow/update") or "")
    assert "256 bytes" in (aws_topic_problem("a" * 257) or "")
    assert "7 slashes" in (aws_topic_problem("a/b/c/d/e/f/g/h/i") or "")
    assert aws_topic_problem("a/b/c/d/e/f/g/h") is None


def test_topic_map_both_ways() -> None:
    tm = TopicMap.from_template("${gateway:ThingName}/${topic}", "gw-1")
    assert tm.upstream("sensors/s1/t") == "gw-1/sensors/s1/t"
    assert tm.downstream("gw-1/commands/s1/reboot") == "commands/s1/reboot"
    assert tm.downstream("other/commands") is None
    for bad in ("${topic}/x", "prefix/no-topic", "${topic}${topic}"):
        with pytest.raises(TemplateError):
            TopicMap.from_template(bad, "gw-1")
