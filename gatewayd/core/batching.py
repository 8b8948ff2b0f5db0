"""Batching of sensor readings for the uplink (pure): readings for the same
upstream topic are combined into one JSON message up to a size and a latency bound, so thousands of readings
per second fit within AWS IoT's 100 publishes per second.

The batch format (documented in docs/spool.md and config/gatewayd.toml):

    {"batch": [{"clientId": "temp-1", "timestamp": 1764201600123, "payload": {...}}, ...]}

`payload` is the reading itself when it is a JSON value, else {"base64": "..."}; `timestamp` is when the
gateway received it (milliseconds since the epoch). Times come in as arguments.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from gatewayd.core import jsonsafe

OVERHEAD = len('{"batch":[]}')


def _item(client_id: str, payload: bytes, received: float) -> bytes:
    try:
        value = jsonsafe.loads(payload)
    except (ValueError, UnicodeDecodeError):
        value = {"base64": base64.b64encode(payload).decode()}
    body = {"clientId": client_id, "timestamp": int(received * 1000), "payload": value}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Batch:
    topic: str
    opened: float  # when its first reading arrived
    items: list[bytes] = field(default_factory=list)
    size: int = OVERHEAD
    tags: list[Any] = field(default_factory=list)  # the caller's handles of the readings

    def encode(self) -> bytes:
        return b'{"batch":[' + b",".join(self.items) + b"]}"


def basic_ingest(rule: str, topic: str) -> str:
    """AWS IoT Basic Ingest: publish straight to a rule's actions, without the message broker's fee."""
    if not rule or "/" in rule:
        raise ValueError("a Basic Ingest rule name is one topic level")
    return f"$aws/rules/{rule}/{topic}"


class Batcher:
    def __init__(self, max_bytes: int, max_delay: float) -> None:
        if max_bytes <= OVERHEAD or max_delay <= 0:
            raise ValueError("max_bytes must leave room for readings and max_delay must be positive")
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.open: dict[str, Batch] = {}

    def add(
        self,
        topic: str,
        client_id: str,
        payload: bytes,
        now: float,
        tag: Any = 0,
        received: float | None = None,
    ) -> list[Batch]:
        """Add a reading (received at `received`, default now); returns the batches that are complete now
        (full, in arrival order)."""
        item = _item(client_id, payload, now if received is None else received)
        if OVERHEAD + len(item) > self.max_bytes:
            raise ValueError(
                f"a reading of {len(payload)} bytes does not fit in a {self.max_bytes}-byte batch"
            )
        ready: list[Batch] = []
        batch = self.open.get(topic)
        if batch is not None and batch.size + len(item) + 1 > self.max_bytes:
            ready.append(self.open.pop(topic))
            batch = None
        if batch is None:
            batch = self.open[topic] = Batch(topic, now)
        batch.size += len(item) + (1 if batch.items else 0)
        batch.items.append(item)
        batch.tags.append(tag)
        return ready

    def due(self, now: float) -> list[Batch]:
        """Batches whose first reading has waited max_delay: they go now, however small."""
        ready = [b for b in self.open.values() if now - b.opened >= self.max_delay]
        for b in ready:
            del self.open[b.topic]
        return ready

    def next_due(self) -> float | None:
        return min((b.opened + self.max_delay for b in self.open.values()), default=None)
