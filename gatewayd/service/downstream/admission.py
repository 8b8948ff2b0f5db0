"""Who may connect to the local broker: the peer a connection presents (address, client certificate), and
the checks on its CONNECT before any session exists: the client id and the certificate's CN (AWS IoT's
rules for client ids), downstream.client_id_must_match_cn, max_connections, then the registry's decision on
the certificate (the `Admit` the composition root fills in, service/root.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.mqtt.packets import Reason
from gatewayd.core.mqtt.topics import identity_problem
from gatewayd.core.throttle import LogThrottle

log = logging.getLogger("gatewayd.broker")

CLOSED_LOG_EVERY = 10.0  # seconds between two lines about connections closed before CONNECT


@dataclass(frozen=True)
class Peer:
    address: str
    certificate_id: str | None  # hex SHA-256 of the client certificate's DER (AWS IoT's certificate id)
    common_name: str
    listener: str
    der: bytes | None = None  # the client certificate


# (peer, client id) -> None to admit, or (reason code, why) to refuse
Admit = Callable[[Peer, str], tuple[int, str] | None]


def connect_refusal(
    config: Config, peer: Peer, client_id: str, connected: Container[str], count: int, admit: Admit
) -> tuple[int, str] | None:
    """Why this CONNECT is refused (reason code, why), or None to accept it. `connected`: the client ids
    connected now, `count` of them."""
    if not client_id:  # 3.1.1 with clean session 0: a session needs a name [MQTT-3.1.3-8]
        return Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id with clean session 0"
    for what, value in (("client id", client_id), ("certificate CN", peer.common_name)):
        problem = identity_problem(value)  # checked before any session exists (issue 17, items 4-5)
        if problem is not None:
            return Reason.CLIENT_IDENTIFIER_NOT_VALID, f"{what} {value!r} {problem}"
    if config.downstream.client_id_must_match_cn and peer.certificate_id and client_id != peer.common_name:
        return Reason.CLIENT_IDENTIFIER_NOT_VALID, f"client id {client_id!r} is not the certificate CN"
    if client_id not in connected and count >= config.downstream.max_connections:
        return Reason.SERVER_BUSY, "max_connections reached"
    return admit(peer, client_id)


def peer_of(writer: asyncio.StreamWriter, listener: str) -> Peer:
    address = writer.get_extra_info("peername")
    text = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address or "unix")
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return Peer(text, None, "", listener)
    cert = ssl_object.getpeercert()
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
    return Peer(text, hashlib.sha256(der).hexdigest(), cn, listener, der)


class EarlyCloses:
    """Connections that ended before their CONNECT was accepted (no CONNECT within connect_timeout, a TLS
    handshake that failed or took too long, a malformed first packet): counted, and logged at most every
    CLOSED_LOG_EVERY seconds with the count, so a slow-loris or a scan never floods the journal."""

    def __init__(self) -> None:
        self._throttle = LogThrottle(CLOSED_LOG_EVERY)

    @property
    def count(self) -> int:
        """Since the daemon started."""
        return self._throttle.total

    def closed(self, address: str, why: str) -> None:
        count = self._throttle.event(time.monotonic())
        if count is None:
            return
        log.info(
            "%d connection(s) closed before CONNECT; the last from %s: %s", count, address, why,
            extra=logevents.extra(logevents.CLOSED_BEFORE_CONNECT, count=count, address=address, reason=why),
        )  # fmt: skip
