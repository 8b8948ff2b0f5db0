"""What the gateway tells about its uplink: `gatewayctl status`'s uplink section, the one-line STATUS= for
systemd, and the periodic status message to AWS IoT (status.topic)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

from gatewayd import __version__
from gatewayd.core.config import Config
from gatewayd.core.errors import GatewaydError
from gatewayd.core.renewal import Step
from gatewayd.core.templates import expand
from gatewayd.core.timefmt import iso_utc
from gatewayd.service.upstream.identity import Ready
from gatewayd.service.upstream.renewal import Renewer
from gatewayd.service.upstream.trustmanager import TrustManager
from gatewayd.service.upstream.uplink import Uplink


def _iso_ms(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class StatusReporter:
    def __init__(
        self,
        config: Config,
        uplink: Uplink,
        trust: TrustManager,
        renewer: Renewer,
        ready: Callable[[], Ready | None],
    ) -> None:
        self.config = config
        self.uplink = uplink
        self.trust = trust
        self.renewer = renewer
        self.ready = ready  # the live identity the uplink connects with, once it could be read
        self.started = time.monotonic()

    def days_left(self) -> float | None:
        ready = self.ready()
        if ready is None:
            return None
        return ready.summary.days_left(dt.datetime.now(dt.UTC))

    def summary(self) -> dict[str, Any]:
        s, up, ready = self.uplink.status, self.config.upstream, self.ready()
        return {
            "state": s.state,
            "since": iso_utc(s.since),
            "lastError": s.last_error,
            "connectedSince": iso_utc(s.connected_since) if s.connected_since else None,
            "endpoint": up.endpoint,
            "port": up.port,
            **self.trust.summary(),
            "certificateId": ready.summary.certificate_id if ready else None,
            "certificateNotAfter": iso_utc(ready.summary.not_after) if ready else None,
            "certificateDaysLeft": self.days_left(),
            "queued": self.uplink.backlog,
            "inflight": self.uplink.inflight,
            "published": s.published,
            "publishRate": round(self.uplink.publish_rate(), 1),  # per second, over the last 10 s
            "throttled": s.throttled,
            "throttledSeconds": round(s.throttled_seconds, 1),
            "uplinkPid": s.child_pid,
            "connectAttempts": s.connect_attempts,
            "nextAttemptAt": _iso_ms(s.next_attempt_at)
            if s.state == "waiting" and s.next_attempt_at
            else None,
            "renewal": self.renewer.summary(),
        }

    def line(self) -> str:
        """The summary of `gatewayctl status` in one line, for sd_notify STATUS=."""
        s, up, ready = self.uplink.status, self.config.upstream, self.ready()
        since = iso_utc(s.since)
        if s.state == "connected":
            line = f"Connected to {up.endpoint}:{up.port} since {since}"
        elif s.last_error:
            line = f"Uplink {s.state} since {since}: {s.last_error}"
        else:
            line = f"Uplink {s.state} since {since}"
        line += f"; trust {self.trust.bundle.mode}"
        days = self.days_left()
        if days is not None and ready is not None:
            left = (
                f"{days:.0f} days"
                if days >= 2
                else f"{days * 24:.1f} hours"
                if days * 24 >= 2
                else f"{days * 1440:.0f} min"
            )
            line += f"; certificate {ready.summary.certificate_id[:12]} {left} left"
        if self.renewer.state.step is not Step.IDLE:
            line += f"; renewal in progress ({self.renewer.state.step.value})"
        if self.trust.root_warnings:
            first = self.trust.root_warnings[0]
            line += f"; root CA {first['root']} expires in {first['daysLeft']} days"
        return line

    async def run(self) -> None:
        """Publishes the status message every status.interval seconds while the uplink is connected."""
        while True:
            interval = self.config.status.interval
            if interval <= 0:
                await asyncio.sleep(60)
                continue
            if not self.uplink.connected:
                await asyncio.sleep(min(1, interval))  # publish promptly once connected
                continue
            topic = expand(self.config.status.topic, {"gateway:ThingName": self.config.gateway.thing_name})
            body = {
                "thingName": self.config.gateway.thing_name,
                "state": self.uplink.status.state,
                "certificateDaysLeft": self.days_left(),
                "uptimeSeconds": round(time.monotonic() - self.started, 1),
                "version": __version__,
                "timestamp": iso_utc(time.time()),
            }
            with contextlib.suppress(TimeoutError, GatewaydError):
                await asyncio.wait_for(self.uplink.publish(topic, json.dumps(body).encode(), qos=1), interval)
            await asyncio.sleep(interval)
