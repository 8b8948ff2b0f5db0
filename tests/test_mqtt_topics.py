"""Topic matching, policy evaluation with variables, AWS topic limits and the upstream mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.errors import TemplateError
from gatewayd.core.mqtt.topics import (
    Policy,
    TopicMap,
    aws_filter_problem,
    aws_topic_problem,
    check_policy_filters,
    filter_covers,
    matches,
    policy_variables,
)


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
    assert not bound.may_subscribe("commands/admin/x") and not bound.may_subscribe("commands/admin/#")
    # AWS IoT's semantics: iot:Subscribe is judged on the filter itself, iot:Receive on each message, so a
    # broad subscription that merely overlaps a denied filter is allowed and the denied topics withheld
    assert bound.may_subscribe("commands/#") and bound.may_subscribe("commands/+/x")
    assert not bound.may_receive("commands/admin/x") and bound.may_receive("commands/s1/x")
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
    assert "256 bytes" in (aws_topic_problem("a" * 257) or "")
    assert "7 slashes" in (aws_topic_problem("a/b/c/d/e/f/g/h/i") or "")
    assert aws_topic_problem("a/b/c/d/e/f/g/h") is None


@pytest.mark.parametrize(
    "topic",
    [
        "$aws/rules/telemetry_ingest/gw-1/sensors/s1/t",  # Basic Ingest
        "$aws/things/s1/shadow/update",
        "$aws/things/s1/shadow/name/config/get",
        "$aws/things/s1/jobs/start-next",
        "$aws/things/s1/jobs/job-42/update",
        "$aws/things/s1/defender/metrics/json",
        "$aws/things/s1/streams/fw/get/cbor",
        "$aws/certificates/create-from-csr/json",
        "$aws/provisioning-templates/fleet/provision/json",
    ],
)
def test_the_reserved_topics_aws_iot_accepts_from_devices(topic: str) -> None:
    """AWS IoT Core developer guide, "Reserved topics": the publish operations it allows devices."""
    assert aws_topic_problem(topic) is None


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("$aws/events/presence/connected/s1", "reserved by AWS IoT"),  # AWS publishes these, devices do not
        ("$aws/things/s1/shadow/update/accepted", "reserved by AWS IoT"),
        ("$aws/things/s1/shadow/update/extra", "reserved by AWS IoT"),
        ("$aws/rules/bad-name/x", "Basic Ingest topic is $aws/rules/<rule name"),
        ("$aws/rules/only_rule", "Basic Ingest topic is"),
        ("$SYS/broker/load", "reserved by AWS IoT"),
        ("$aws/sitewise/asset-models/m/assets/a/properties/p", "reserved by AWS IoT"),
    ],
)
def test_reserved_topics_refused_with_the_reason(topic: str, why: str) -> None:
    assert why in (aws_topic_problem(topic) or "")


def test_reserved_filters_aws_iot_lets_devices_subscribe_to() -> None:
    subscribable = (
        "$aws/things/s1/shadow/update/accepted",
        "$aws/things/s1/shadow/#",
        "$aws/things/s1/jobs/notify",
        "$aws/events/certificates/registered/+",
        "$aws/certificates/create/json/accepted",
    )
    for ok in subscribable:
        assert aws_filter_problem(ok) is None, ok
    assert "cannot be subscribed" in (aws_filter_problem("$aws/rules/r/#") or "")
    assert "reserved" in (aws_filter_problem("$aws/whatever/#") or "")
    assert "7 slashes" in (aws_filter_problem("a/b/c/d/e/f/g/h/#") or "")


def test_topic_map_both_ways() -> None:
    tm = TopicMap.from_template("${gateway:ThingName}/${topic}", "gw-1")
    assert tm.upstream("sensors/s1/t") == "gw-1/sensors/s1/t"
    assert tm.downstream("gw-1/commands/s1/reboot") == "commands/s1/reboot"
    assert tm.downstream("other/commands") is None
    # AWS IoT's reserved topics are not mapped: a sensor's shadow update means that very topic, both ways
    assert tm.upstream("$aws/things/s1/shadow/update") == "$aws/things/s1/shadow/update"
    assert tm.downstream("$aws/things/s1/shadow/update/accepted") == "$aws/things/s1/shadow/update/accepted"
    for bad in ("${topic}/x", "prefix/no-topic", "${topic}${topic}"):
        with pytest.raises(TemplateError):
            TopicMap.from_template(bad, "gw-1")
