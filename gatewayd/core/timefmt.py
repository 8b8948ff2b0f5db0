"""Times as gatewayd prints and stores them: UTC, ISO 8601, to the second, with a Z."""

from __future__ import annotations

import datetime as dt


def iso_utc(value: float | dt.datetime) -> str:
    """A Unix time (seconds) or an aware datetime as 2026-12-02T04:48:00Z."""
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromtimestamp(value, dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
