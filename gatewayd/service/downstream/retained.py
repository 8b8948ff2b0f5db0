"""Retained messages of the local broker (MQTT 3.1.1 section 3.3.1.3, 5.0 section 3.3.1.3): kept per topic
within downstream.max_retained_messages, max_retained_bytes and max_retained_bytes_per_sensor, each with its
Message Expiry Interval (5.0). A message beyond the bounds is not retained (it is still delivered) and
counted; RETAINED_LIMITED is logged at most every LOG_EVERY seconds."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from gatewayd.core import logevents
from gatewayd.core.config import DownstreamSection
from gatewayd.core.mqtt.packets import Prop, Publish
from gatewayd.core.mqtt.topics import matches
from gatewayd.core.throttle import LogThrottle

log = logging.getLogger("gatewayd.broker")

LOG_EVERY = 10.0  # seconds


class RetainedMessages:
    def __init__(self, settings: DownstreamSection) -> None:
        self.settings = settings
        self.messages: dict[str, Publish] = {}
        # per retained topic: who retained it, its size (topic + payload), when (monotonic), its expiry (s)
        self._meta: dict[str, tuple[str, int, float, int | None]] = {}
        self.bytes = 0
        self.by_owner: dict[str, int] = {}  # client id -> bytes it retains
        self._refusals = LogThrottle(LOG_EVERY)

    def keep(self, p: Publish, owner: str) -> None:
        """A retained publish: an empty one clears the topic's message, any other replaces it."""
        if not p.retain:
            return
        self.remove(p.topic)
        if not p.payload:
            return
        d = self.settings
        size = len(p.payload) + len(p.topic)
        mine = self.by_owner.get(owner, 0)
        why = (
            f"{d.max_retained_messages} retained messages" if len(self.messages) >= d.max_retained_messages
            else f"{self.bytes} of {d.max_retained_bytes} bytes retained"
            if self.bytes + size > d.max_retained_bytes
            else f"it retains {mine} of {d.max_retained_bytes_per_sensor} bytes"
            if mine + size > d.max_retained_bytes_per_sensor
            else None
        )  # fmt: skip
        if why is not None:
            self._refused(owner, p.topic, why)
            return
        expiry = p.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL) if p.properties else None
        self.messages[p.topic] = p
        self._meta[p.topic] = (owner, size, time.monotonic(), expiry)
        self.bytes += size
        self.by_owner[owner] = mine + size

    def remove(self, topic: str) -> None:
        if self.messages.pop(topic, None) is None:
            return
        owner, size, _, _ = self._meta.pop(topic)
        self.bytes -= size
        left = self.by_owner.get(owner, 0) - size
        if left > 0:
            self.by_owner[owner] = left
        else:
            self.by_owner.pop(owner, None)

    @property
    def refused(self) -> int:
        """Retained messages not kept for the bounds, since the daemon started."""
        return self._refusals.total

    def _refused(self, owner: str, topic: str, why: str) -> None:
        if self._refusals.event(time.monotonic()) is None:
            return
        log.warning(
            "retained message of %s on %s not kept (delivered all the same): %s", owner, topic, why,
            extra=logevents.extra(logevents.RETAINED_LIMITED, client_id=owner, topic=topic, reason=why,
                                 refused=self.refused),
        )  # fmt: skip

    def matching(self, topic_filter: str, now: float) -> list[tuple[str, Publish]]:
        """The retained messages matching a new subscription, each with its remaining Message Expiry
        Interval; the expired ones are dropped."""
        out = []
        for topic, p in list(self.messages.items()):
            if not matches(topic_filter, topic):
                continue
            _, _, since, expiry = self._meta[topic]
            if expiry is not None:
                left = math.ceil(expiry - (now - since))
                if left <= 0:
                    self.remove(topic)
                    continue
                p = dataclasses.replace(
                    p, properties=p.properties.replaced(Prop.MESSAGE_EXPIRY_INTERVAL, left)
                )
            out.append((topic, p))
        return out

    def expire(self, now: float) -> None:
        for topic, (_, _, since, expiry) in list(self._meta.items()):
            if expiry is not None and now - since >= expiry:
                self.remove(topic)
