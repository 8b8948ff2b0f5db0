"""Topic filters, per-sensor policy, AWS IoT Core's topic limits, and the sensor <-> upstream topic mapping.

Pure functions over strings. Matching follows MQTT 5.0 section 4.7 (same in 3.1.1): '+' matches one level,
'#' the rest (including the parent level), and a filter starting with a wildcard does not match topics
starting with '$' (section 4.7.2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gatewayd.core.errors import ProtocolError, TemplateError
from gatewayd.core.mqtt.codec import check_topic_filter
from gatewayd.core.mqtt.packets import MQTT_5
from gatewayd.core.templates import expand

# AWS IoT Core limits on topics (AWS IoT Core quotas, "Message broker and protocol limits").
AWS_MAX_TOPIC_BYTES = 256
AWS_MAX_SLASHES = 7
AWS_RESERVED_PREFIX = "$aws/"


def matches(topic_filter: str, topic: str) -> bool:
    """Does `topic_filter` match the topic name `topic`?"""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    flevels, tlevels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels):
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == len(tlevels)


def filter_covers(outer: str, inner: str) -> bool:
    """Does `outer` match every topic `inner` can match? (Is a subscription to `inner` within `outer`?)"""
    olevels, ilevels = outer.split("/"), inner.split("/")
    for i, o in enumerate(olevels):
        if o == "#":
            return not (i == 0 and ilevels[0].startswith("$"))
        if i >= len(ilevels):
            return False
        n = ilevels[i]
        if n == "#":
            return False
        if o == "+":
            if i == 0 and n.startswith("$"):
                return False
            continue
        if o != n:
            return False
    return len(olevels) == len(ilevels)


# What a client id or a certificate's CN may not contain, since either becomes part of topic filters through
# the policy variables: wildcards and '/' (they would widen a filter or add levels), "${" (a variable in a
# variable), control characters. At most AWS IoT's 128 bytes of client id.
MAX_IDENTITY_BYTES = 128
_BAD_IDENTITY = re.compile("[+#/\x00-\x1f\x7f\x85\u2028\u2029]|\\$\\{")
_VARIABLE_NAME = re.compile(r"\$\{([^}]*)\}")


def identity_problem(value: str) -> str | None:
    """Why `value` (a client id, a certificate CN) cannot stand in a policy variable, or None."""
    if len(value.encode()) > MAX_IDENTITY_BYTES:
        return f"is longer than {MAX_IDENTITY_BYTES} bytes"
    bad = _BAD_IDENTITY.search(value)
    if bad is not None:
        shown = bad.group() if bad.group() in ("+", "#", "/", "${") else f"\\x{ord(bad.group()):02x}"
        return f"contains {shown!r} (refused: it would become part of the policy's topic filters)"
    return None


def policy_variables(client_id: str, common_name: str, thing_name: str) -> dict[str, str]:
    return {
        "iot:ClientId": client_id,
        "iot:Certificate.Subject.CommonName": common_name,
        "gateway:ThingName": thing_name,
    }


@dataclass(frozen=True)
class Policy:
    """Allowed and denied topic filters, variables not yet expanded; deny wins."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()

    def bind(self, variables: Mapping[str, str]) -> BoundPolicy:
        """Expand the variables. A rule using a variable whose value cannot stand in a filter (see
        identity_problem; the broker refuses such identities at CONNECT, this is the second line) is dropped
        when it allows and becomes "#" when it denies: it fails closed, never open."""
        unusable = {name for name, value in variables.items() if identity_problem(value)}

        def each(filters: tuple[str, ...], deny: bool) -> tuple[str, ...]:
            out = []
            for f in filters:
                if unusable & set(_VARIABLE_NAME.findall(f)):
                    if deny:
                        out.append("#")
                    continue
                out.append(expand(f, variables))
            return tuple(out)

        return BoundPolicy(
            each(self.publish, False),
            each(self.subscribe, False),
            each(self.deny_publish, True),
            each(self.deny_subscribe, True),
        )


@dataclass(frozen=True)
class BoundPolicy:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...]
    deny_subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        if any(matches(f, topic) for f in self.deny_publish):
            return False
        return any(matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        """AWS IoT's iot:Subscribe, judged on the filter itself: allowed when an allowed filter covers it and
        no denied filter covers it. A broad subscription (`#`) that merely overlaps a denied filter is
        allowed; the denied topics are then withheld message by message (may_receive)."""
        if any(filter_covers(d, topic_filter) for d in self.deny_subscribe):
            return False
        return any(filter_covers(f, topic_filter) for f in self.subscribe)

    def may_receive(self, topic: str) -> bool:
        """AWS IoT's iot:Receive, judged on each message delivered: not on a denied topic."""
        return not any(matches(d, topic) for d in self.deny_subscribe)


def check_policy_filters(filters: tuple[str, ...]) -> str | None:
    """Config check: every entry expands with the known variables to a valid filter."""
    sample = policy_variables("client", "cn", "thing")
    for f in filters:
        try:
            expanded = expand(f, sample)
        except TemplateError as exc:
            return f"{f!r}: {exc}"
        try:
            check_topic_filter(expanded, MQTT_5)
        except ProtocolError as exc:
            return f"{f!r} is not a valid topic filter: {exc}"
    return None


# The reserved topics AWS IoT Core lets a device publish to ("Reserved topics" in the AWS IoT Core developer
# guide): Basic Ingest, shadows, jobs, Device Defender metrics, MQTT-based file delivery, fleet provisioning.
# Every other topic starting with $ is AWS IoT's own, and a publish there may end the connection.
_THING = r"\$aws/things/[^/#+]+/"
AWS_PUBLISHABLE = re.compile(
    r"\$aws/rules/[A-Za-z0-9_]+/.+"
    rf"|{_THING}shadow(/name/[^/#+]+)?/(get|update|delete)"
    rf"|{_THING}jobs/(get|start-next|[^/#+]+/get|[^/#+]+/update)"
    rf"|{_THING}defender/metrics/(json|cbor)"
    rf"|{_THING}streams/[^/#+]+/(get|describe)/(json|cbor)"
    r"|\$aws/certificates/create(-from-csr)?/(json|cbor)"
    r"|\$aws/provisioning-templates/[^/#+]+/provision/(json|cbor)"
)
# ... and those it lets a device subscribe to: the answers and notifications on those, and the events.
AWS_SUBSCRIBABLE = re.compile(
    rf"{_THING}(shadow|jobs|defender|streams|tunnels)/.+"
    r"|\$aws/events/.+"
    r"|\$aws/certificates/create(-from-csr)?/.+"
    r"|\$aws/provisioning-templates/[^/#+]+/provision/.+"
    r"|\$aws/sitewise/.+"
)
RESERVED_HELP = (
    "a device may publish only to AWS IoT's Basic Ingest ($aws/rules/<rule>/...), shadow, jobs, Device "
    "Defender, stream and fleet provisioning topics"
)


def aws_topic_problem(topic: str) -> str | None:
    """Why AWS IoT Core would refuse a publish to this topic, or None (checked on the upstream topic, after
    mapping). The sizes are counted on the whole topic, Basic Ingest's prefix included (the safe side)."""
    if topic.startswith("$") and not AWS_PUBLISHABLE.fullmatch(topic):
        if topic.startswith("$aws/rules/"):
            return "a Basic Ingest topic is $aws/rules/<rule name: letters, digits, _>/<topic>"
        return f"{topic.split('/')[0]}/... is reserved by AWS IoT: {RESERVED_HELP}"
    return _aws_size_problem(topic)


def aws_filter_problem(topic_filter: str) -> str | None:
    """Why AWS IoT Core would refuse a subscription to this filter, or None."""
    if topic_filter.startswith("$") and not AWS_SUBSCRIBABLE.fullmatch(topic_filter):
        if topic_filter.startswith("$aws/rules/"):
            return "Basic Ingest topics cannot be subscribed to"
        return (
            f"{topic_filter.split('/')[0]}/... is reserved by AWS IoT: a device may subscribe only to its "
            "shadow, jobs, Device Defender, stream, tunnel, fleet provisioning and event topics"
        )
    return _aws_size_problem(topic_filter)


def _aws_size_problem(topic: str) -> str | None:
    if len(topic.encode()) > AWS_MAX_TOPIC_BYTES:
        return f"topic longer than {AWS_MAX_TOPIC_BYTES} bytes"
    if topic.count("/") > AWS_MAX_SLASHES:
        return f"topic has more than {AWS_MAX_SLASHES} slashes"
    return None


@dataclass(frozen=True)
class TopicMap:
    """Sensor topics <-> upstream topics through a template ending in ${topic}.

    Example: "${gateway:ThingName}/${topic}" maps sensors/s1/t to gw-1/sensors/s1/t and back.
    """

    prefix: str  # the expanded part before ${topic}

    @classmethod
    def from_template(cls, template: str, thing_name: str) -> TopicMap:
        head, sep, tail = template.partition("${topic}")
        if not sep or tail or "${topic}" in head:
            raise TemplateError("the upstream topic template must end with ${topic}, once")
        return cls(expand(head, {"gateway:ThingName": thing_name}))

    def upstream(self, sensor_topic: str) -> str:
        """The upstream topic; AWS IoT's reserved topics ($aws/...) keep their name: a sensor's shadow update
        or Basic Ingest publish means that very topic."""
        if sensor_topic.startswith(AWS_RESERVED_PREFIX):
            return sensor_topic
        return self.prefix + sensor_topic

    def downstream(self, upstream_topic: str) -> str | None:
        """The sensor topic for an upstream topic, or None when it is not under the prefix."""
        if upstream_topic.startswith(AWS_RESERVED_PREFIX):
            return upstream_topic
        if not upstream_topic.startswith(self.prefix):
            return None
        rest = upstream_topic[len(self.prefix) :]
        return rest or None
