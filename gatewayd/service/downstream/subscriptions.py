"""Who subscribed to what on the local broker: every session's subscriptions in one index for fan-out,
shared subscriptions ($share/<group>/<filter>, MQTT 5.0 section 4.8.2) as groups, and the upstream
subscriptions the sensors' filters share (one per mapped filter, reference counted, within AWS IoT's
limit per connection). Who may subscribe is the policy's (core/mqtt/topics.py); delivery is the broker's."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gatewayd.core.config import Config
from gatewayd.core.mqtt.packets import Reason, Subscription
from gatewayd.core.mqtt.subindex import FilterIndex
from gatewayd.core.mqtt.topics import AWS_RESERVED_PREFIX, TopicMap, aws_filter_problem, filter_covers

log = logging.getLogger("gatewayd.broker")

SHARE_PREFIX = "$share/"
AWS_EVENTS_PREFIX = "$aws/events/"


def shared_parts(topic_filter: str) -> tuple[str, str] | None:
    """($share/<group>/<filter>) -> (group, filter); ("", "") for a malformed one; None if not shared."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or not inner or any(c in group for c in "+#"):
        return "", ""
    return group, inner


@dataclass
class SharedGroup:
    topic_filter: str  # the filter after $share/<group>/
    members: dict[str, Subscription] = field(default_factory=dict)  # client id -> its subscription
    turn: int = 0  # round robin


class UpstreamSubscriber(Protocol):
    def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


class Subscriptions:
    def __init__(self, config: Config, topic_map: TopicMap, upstream: UpstreamSubscriber | None) -> None:
        self.config = config
        self.topic_map = topic_map
        self.upstream = upstream
        self.index: FilterIndex[Subscription] = FilterIndex()  # every session's subscriptions, for fan-out
        self.shared: dict[str, SharedGroup] = {}  # by "$share/<group>/<filter>"
        self._shared_index: FilterIndex[str] = FilterIndex()  # owner and value: that key
        self.upstream_refs: dict[str, int] = {}  # mapped upstream filter -> sessions holding it

    def configure(self, config: Config, topic_map: TopicMap) -> None:
        self.config, self.topic_map = config, topic_map

    # ------------------------------------------------------------------ the index

    def add(self, client_id: str, s: Subscription) -> None:
        if s.topic_filter.startswith(SHARE_PREFIX):
            self._join(client_id, s)
        else:
            self.index.add(client_id, s.topic_filter, s)

    def remove(self, client_id: str, topic_filter: str) -> None:
        self.index.remove(client_id, topic_filter)
        self._leave(client_id, topic_filter)

    def reindex(self, client_id: str, subscriptions: Mapping[str, Subscription]) -> None:
        """The index holds exactly these subscriptions of this client's session (after its CONNECT)."""
        self.index.remove_owner(client_id)
        for sub in subscriptions.values():
            self.add(client_id, sub)

    def drop(self, client_id: str, topic_filters: list[str]) -> None:
        """A session ended: its subscriptions leave the index, their groups and the upstream ones."""
        self.index.remove_owner(client_id)
        for topic_filter in topic_filters:
            self._leave(client_id, topic_filter)
            if self.forwarded(topic_filter):
                self.unref_upstream(topic_filter)

    def match(self, topic: str) -> dict[str, Subscription]:
        """The matching subscription with the highest QoS, per session."""
        best: dict[str, Subscription] = {}
        for client_id, s in self.index.match(topic):
            if client_id not in best or s.qos > best[client_id].qos:
                best[client_id] = s
        return best

    def groups_matching(self, topic: str) -> Iterator[tuple[str, SharedGroup]]:
        for _, key in self._shared_index.match(topic):
            yield key, self.shared[key]

    def _join(self, client_id: str, s: Subscription) -> None:
        group = self.shared.get(s.topic_filter)
        if group is None:
            share = shared_parts(s.topic_filter)
            assert share is not None
            group = self.shared[s.topic_filter] = SharedGroup(share[1])
            self._shared_index.add(s.topic_filter, share[1], s.topic_filter)
        group.members[client_id] = s

    def _leave(self, client_id: str, topic_filter: str) -> None:
        group = self.shared.get(topic_filter)
        if group is None or group.members.pop(client_id, None) is None:
            return
        if not group.members:
            del self.shared[topic_filter]
            self._shared_index.remove(topic_filter, group.topic_filter)

    # ------------------------------------------------------------------ upstream

    def forwarded(self, topic_filter: str) -> bool:
        """Is a sensor's subscription also made upstream? Within the command filter, or one of AWS IoT's
        reserved topics (a shadow's or job's answers: only AWS IoT publishes them), except its events: those a
        local subscriber gets are the gateway's own (registrations here). A shared subscription: by its
        filter (then it is shared upstream too)."""
        share = shared_parts(topic_filter)
        if share is not None:
            topic_filter = share[1]
        if topic_filter.startswith(AWS_RESERVED_PREFIX):
            return not topic_filter.startswith(AWS_EVENTS_PREFIX)
        return filter_covers(self.config.forwarding.command_filter, topic_filter)

    def refusal(
        self, subs: Mapping[str, Subscription], topic_filter: str, forwarded: bool
    ) -> tuple[int, str] | None:
        """Per-sensor bounds on a new subscription (issue 17, items 6 and 7): its session's subscriptions
        `subs` (downstream.max_subscriptions_per_sensor), the upstream ones it holds (max_upstream_
        subscriptions_per_sensor, of AWS IoT's 50 per connection), and AWS IoT's topic rules for the filter
        sent upstream."""
        d = self.config.downstream
        if len(subs) >= d.max_subscriptions_per_sensor:
            return Reason.QUOTA_EXCEEDED, f"it has {len(subs)} subscriptions (max_subscriptions_per_sensor)"
        if not forwarded:
            return None
        share = shared_parts(topic_filter)
        problem = aws_filter_problem(self.topic_map.upstream(share[1] if share else topic_filter))
        if problem is not None:
            return Reason.TOPIC_FILTER_INVALID, f"AWS IoT would refuse it upstream: {problem}"
        upstream = sum(1 for f in subs if self.forwarded(f))
        if upstream >= d.max_upstream_subscriptions_per_sensor:
            return Reason.QUOTA_EXCEEDED, (
                f"it holds {upstream} upstream subscriptions (max_upstream_subscriptions_per_sensor)"
            )
        return None

    def upstream_filter(self, topic_filter: str) -> str:
        share = shared_parts(topic_filter)
        if share is not None:  # shared upstream too: $share/<group>/<mapped filter>
            return f"{SHARE_PREFIX}{share[0]}/{self.topic_map.upstream(share[1])}"
        return self.topic_map.upstream(topic_filter)

    def ref_upstream(self, topic_filter: str) -> bool:
        """Share one upstream subscription among sensors; AWS IoT allows 50 per connection
        (upstream.quota.max_subscriptions)."""
        mapped = self.upstream_filter(topic_filter)
        if mapped not in self.upstream_refs:
            limit = self.config.upstream.quota.max_subscriptions
            if len(self.upstream_refs) >= limit:
                log.warning("upstream subscription limit (%d) reached: %s not subscribed", limit, mapped)
                return False
            if self.upstream is not None:
                self.upstream.subscribe(mapped, 1)
        self.upstream_refs[mapped] = self.upstream_refs.get(mapped, 0) + 1
        return True

    def unref_upstream(self, topic_filter: str) -> None:
        mapped = self.upstream_filter(topic_filter)
        count = self.upstream_refs.get(mapped, 0) - 1
        if count > 0:
            self.upstream_refs[mapped] = count
            return
        self.upstream_refs.pop(mapped, None)
        if self.upstream is not None:
            self.upstream.unsubscribe(mapped)
