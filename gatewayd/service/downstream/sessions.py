"""A sensor's session while its connection is away (MQTT 3.1.1 section 3.1.2.4, 5.0 section 3.1.2.11): what
the broker keeps of it, how long (Session Expiry Interval, bounded by downstream.session_expiry_max), and
the QoS 1/2 messages queued for it (bounded like a live connection's queue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gatewayd.core.mqtt.packets import MQTT_5, Prop, Properties
from gatewayd.core.mqtt.session import Limits, Outbound, SessionState
from gatewayd.core.mqtt.topics import BoundPolicy


@dataclass
class StoredSession:
    state: SessionState
    expires_at: float | None = None  # monotonic, while disconnected
    policy: BoundPolicy | None = None  # its sensor's, for what is kept for it while it is away
    common_name: str = ""  # its sensor's certificate CN, to bind the policy again on reload


def session_expiry(connect: Any, cap: int) -> int:
    """The seconds a session outlives its connection: 5.0's Session Expiry Interval, 3.1.1's clean
    session 0 as a persistent session; both bounded by `cap`."""
    if connect.protocol_level == MQTT_5:
        return int(min(connect.properties.get(Prop.SESSION_EXPIRY_INTERVAL, 0), cap))
    return 0 if connect.clean_start else cap


def queue_offline(
    state: SessionState,
    topic: str,
    payload: bytes,
    qos: int,
    props: Properties,
    now: float,
    limits: Limits,
    share: str | None = None,
) -> bool:
    """Keep a QoS 1/2 message for a persistent session whose sensor is away (bounded like a live queue)."""
    if len(state.queued) >= limits.max_queued or state.queued_bytes + len(payload) > limits.max_queued_bytes:
        state.dropped += 1
        return False
    expiry = props.get(Prop.MESSAGE_EXPIRY_INTERVAL)
    msg = Outbound(topic, payload, qos, False, props, now + expiry if expiry is not None else None)
    msg.share = share
    state.queued.append(msg)
    state.queued_bytes += len(payload)
    return True
