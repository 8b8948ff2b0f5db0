"""The sensors' side of the gateway: the local CA, the listeners, and the broker behind them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from gatewayd.adapters.netlink import addresses as netlink_addresses
from gatewayd.adapters.netlink import certificate_addresses
from gatewayd.adapters.tls import TLS12_CIPHERS
from gatewayd.core import logevents
from gatewayd.core.config import Config, ListenerSection
from gatewayd.core.errors import GatewaydError
from gatewayd.core.throttle import LogThrottle
from gatewayd.service.downstream.broker import Broker
from gatewayd.stores.localca import LocalCA, ServerIdentity, host_names_and_addresses

log = logging.getLogger("gatewayd.downstream")

# asyncio's TLS keeps a read buffer of SSLProtocol.max_size (256 KiB) for every connection: a quarter of a
# gigabyte for 1000 sensors on a Pi. A TLS record carries at most 16 KiB of data (plus its header and MAC),
# so 17 KiB costs nothing but a second read now and then (measured: 100 sensor connections took 30 MB with
# 256 KiB; 1,000 idle ones take 15 MB less with 17 KiB than with 32 KiB).
TLS_READ_BUFFER = 17 * 1024
LARGE_JUMP = 3600.0  # seconds of wall-clock jump after which the listener certificate is made again
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: a sensor's certificate chain is verified without its dates. Set while
# the gateway's clock is not synchronized: a Pi that boots weeks behind would refuse every certificate made
# since; the registry's statuses (revoked, inactive) still decide at CONNECT.
NO_CHECK_TIME = 0x200000
if getattr(sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def server_context(cert_file: Path, key_file: Path, require_client_cert: bool) -> ssl.SSLContext:
    """The listener's TLS: its trust anchors are added by Downstream.refresh_trust (from the registry).
    PARTIAL_CHAIN lets a registered intermediate CA, or a certificate registered without a CA, be an anchor
    by itself, as AWS IoT accepts them; whether a certificate is admitted is the registry's decision at
    CONNECT, not TLS's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def interface_addresses() -> list[str] | None:
    """The addresses the listener certificate should name, or None when rtnetlink cannot tell."""
    try:
        return certificate_addresses(netlink_addresses())
    except OSError as exc:
        log.warning(
            "cannot list the host's addresses (%s); the listener certificate names the host name's", exc
        )
        return None


class PendingGate:
    """Connections between accept and an accepted CONNECT (TLS handshake included), counted in all and per
    source address: beyond `downstream.max_pending_connections` or `max_pending_per_address` (loopback
    excepted) a new one is closed at once, so strangers cannot take the file descriptors and memory that
    sensors need. What is refused is logged at most once every 10 s, with the counts."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self.pending = 0
        self.by_address: dict[str, int] = {}
        self.refusals = LogThrottle()

    def enter(self, address: str) -> bool:
        count = self.by_address.get(address, 0)
        limited = address and not _loopback(address) and count >= self.per_address
        if self.pending >= self.total or limited:
            self._log(address, "per address" if limited else "in all")
            return False
        self.pending += 1
        self.by_address[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        self.pending -= 1
        left = self.by_address[address] - 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]

    @property
    def refused(self) -> int:
        """Connections refused since the daemon started."""
        return self.refusals.total

    def _log(self, address: str, which: str) -> None:
        count = self.refusals.event(time.monotonic())
        if count is None:
            return
        log.warning(
            "closed %d new connection(s) before CONNECT: too many pending (%d %s, limit %d in all and %d per "
            "address); the last from %s", count, self.pending, which, self.total, self.per_address,
            address or "a local socket",
            extra=logevents.extra(logevents.CONNECTIONS_LIMITED, refused=count, pending=self.pending,
                                 address=address),
        )  # fmt: skip


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def listener_name(lst: ListenerSection) -> str:
    return lst.address if lst.address.startswith("unix:") else f"{lst.address}:{lst.port}"


class Downstream:
    def __init__(
        self,
        config: Config,
        broker: Broker,
        anchors: Callable[[], list[str]] = lambda: [],
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.broker = broker
        self.anchors = anchors
        self.clock_trusted = clock_trusted  # the wall clock is synchronized (service/clock.py)
        self._issued_trusted = True  # the listener certificate was made while the clock was synchronized
        self.ca = LocalCA(Path(config.gateway.state_dir), config.gateway.thing_name)
        self._contexts: list[ssl.SSLContext] = []
        self._trusted: set[str] = set()
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.server: ServerIdentity | None = None
        d = config.downstream
        self.pending = PendingGate(d.max_pending_connections, d.max_pending_per_address)

    async def __aenter__(self) -> Downstream:
        d = self.config.downstream
        if self.ca.ensure():
            log.info("created the gateway's local CA in %s", self.ca.dir)
        self._issued_trusted = self.clock_trusted()
        server = self.ca.server_identity(
            *self._names_and_addresses(interface_addresses()), clock_trusted=self._issued_trusted
        )
        self.server = server
        try:
            for lst in d.listener:
                ctx = (
                    server_context(server.cert_file, server.key_file, lst.require_client_cert)
                    if lst.tls
                    else None
                )
                if ctx is not None:
                    ctx.load_verify_locations(cafile=str(self.ca.cert_file))
                    self._contexts.append(ctx)
                name = listener_name(lst)

                async def handle(
                    r: asyncio.StreamReader,
                    w: asyncio.StreamWriter,
                    name: str = name,
                    ctx: ssl.SSLContext | None = ctx,
                ) -> None:
                    await self._handle(r, w, name, ctx)

                if lst.address.startswith("unix:"):
                    path = Path(lst.address[5:])
                    if path.is_socket():
                        path.unlink()  # left by a previous run (the state-dir lock proves none is running)
                    srv = await asyncio.start_unix_server(handle, path=str(path))
                    path.chmod(0o660)  # local processes of this user and group only
                else:
                    srv = await asyncio.start_server(handle, lst.address, lst.port, reuse_address=True)
                self._servers.append(srv)
                mode = (
                    "TLS, client certificates required"
                    if lst.require_client_cert
                    else "TLS"
                    if lst.tls
                    else "plain"
                )
                log.info("listening for sensors on %s (%s)", name, mode)
        except (OSError, ssl.SSLError) as exc:
            await self.__aexit__(None, None, None)
            hint = ""
            tcp_ports = [lst.port for lst in d.listener if not lst.address.startswith("unix:")]
            if isinstance(exc, PermissionError) and any(0 < port < 1024 for port in tcp_ports):
                hint = (
                    " (a port below 1024 needs CAP_NET_BIND_SERVICE: give it to the unit in a drop-in with"
                    " AmbientCapabilities= and CapabilityBoundingSet=CAP_NET_BIND_SERVICE; see"
                    " /usr/share/doc/gatewayd/installation.md, Hardening)"
                )
            raise GatewaydError(f"cannot open the sensor listener: {exc}{hint}") from exc
        self.refresh_trust()
        self._time_checks()
        self._sweeper = asyncio.create_task(self._sweep(), name="session-expiry")
        return self

    async def _handle(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str, ctx: ssl.SSLContext | None
    ) -> None:
        """One accepted connection: admitted by the pending gate, then TLS (started here, not by the server,
        so that the gate and the CONNECT deadline count from the accept), then the broker."""
        accepted = time.monotonic()
        address = _address(w)
        if not self.pending.enter(address):
            w.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        left = False

        def connected() -> None:  # CONNECT accepted (or the connection ended): no longer pending
            nonlocal left
            if not left:
                left = True
                self.pending.leave(address)

        try:
            if ctx is not None:
                timeout = max(accepted + self.config.downstream.connect_timeout - time.monotonic(), 0.1)
                try:
                    await w.start_tls(ctx, ssl_handshake_timeout=timeout)
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    log.debug("TLS handshake with %s on %s failed: %s", address or "a local peer", name, exc)
                    self.broker.early.closed(address or name, f"TLS handshake: {exc}")
                    w.transport.abort()
                    return
            await self.broker.serve(r, w, name, accepted_at=accepted, connected=connected)
        finally:
            connected()
            self._connections.discard(task)

    def _names_and_addresses(self, interfaces: list[str] | None) -> tuple[list[str], list[str]]:
        listeners = [
            lst.address for lst in self.config.downstream.listener if not lst.address.startswith("unix:")
        ]
        return host_names_and_addresses(listeners, interfaces)

    def addresses_changed(self, interfaces: list[str]) -> bool:
        """The host's addresses changed: if the server certificate does not name exactly the new set, the
        local CA issues one that does. Each TLS context loads it for its next handshakes; connections already
        made keep theirs (nobody is disconnected). True when a new certificate was issued."""
        names, addresses = self._names_and_addresses(certificate_addresses(interfaces))
        if self.server is None or (tuple(names), tuple(addresses)) == (
            self.server.names,
            self.server.addresses,
        ):
            return False
        self._reissue(names, addresses, "the host's addresses changed")
        return True

    def _reissue(self, names: list[str], addresses: list[str], why: str) -> None:
        self._issued_trusted = self.clock_trusted()
        server = self.ca.server_identity(names, addresses, self._issued_trusted, reissue=True)
        for ctx in self._contexts:
            ctx.load_cert_chain(str(server.cert_file), str(server.key_file))
        self.server = server
        log.info(
            "listener certificate re-issued for %s (%s)", ", ".join(addresses), why,
            extra=logevents.extra(
                logevents.LISTENER_CERT_REISSUED, addresses=",".join(addresses), reason=why
            ),
        )  # fmt: skip

    def _time_checks(self) -> None:
        """Sensors' certificate dates are checked only by a synchronized clock (NO_CHECK_TIME)."""
        trusted = self.clock_trusted()
        for ctx in self._contexts:
            ctx.verify_flags = (
                ctx.verify_flags & ~NO_CHECK_TIME if trusted else ctx.verify_flags | NO_CHECK_TIME
            )

    def clock_changed(self, jump: float, synchronized: bool) -> bool:
        """Sensors' certificate dates are checked again once the clock is synchronized (and not while it is
        not). After a wall-clock jump of over an hour (either way), or once the clock is synchronized if the
        certificate was made while it was not, the listener certificate is made again: its dates were taken
        from a clock that was wrong. Connected sensors keep their connections. True when it was."""
        self._time_checks()
        if self.server is None:
            return False
        big_jump = abs(jump) > LARGE_JUMP
        if not big_jump and not (synchronized and not self._issued_trusted):
            return False
        why = "the clock jumped" if big_jump else "the clock is now synchronized"
        self._reissue(list(self.server.names), list(self.server.addresses), why)
        return True

    def refresh_trust(self) -> int:
        """Add the registry's new trust anchors to every TLS listener (takes effect for the next handshake).
        An anchor removed from the registry stays in TLS until a restart, but the registry refuses its
        certificates at CONNECT. Returns how many were added."""
        added = 0
        for anchor in self.anchors():
            if anchor in self._trusted:
                continue
            for ctx in self._contexts:
                ctx.load_verify_locations(cadata=anchor)
            self._trusted.add(anchor)
            added += 1
        return added

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for srv in self._servers:
            srv.close()
        for client_id in list(self.broker.clients):
            self.broker.disconnect(client_id, 0x8B, "gatewayd is shutting down")  # Server shutting down
        tasks = list(self._connections) + ([self._sweeper] if self._sweeper else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._servers.clear()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(10)
            self.broker.expire_sessions(time.monotonic())
