"""The sensors' side of the gateway: the local CA, the listeners, and the broker behind them."""

from __future__ import annotations

import asyncio
import contextlib
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
from gatewayd.core import messages
from gatewayd.core.config import Config, ListenerSection
from gatewayd.core.errors import GatewaydError
from gatewayd.service.broker import Broker
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

                async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name) -> None:
                    task = asyncio.current_task()
                    assert task is not None
                    self._connections.add(task)
                    try:
                        await self.broker.serve(r, w, name)
                    finally:
                        self._connections.discard(task)

                if lst.address.startswith("unix:"):
                    path = Path(lst.address[5:])
                    if path.is_socket():
                        path.unlink()  # left by a previous run (the state-dir lock proves none is running)
                    srv = await asyncio.start_unix_server(handle, path=str(path), ssl=ctx)
                    path.chmod(0o660)  # local processes of this user and group only
                else:
                    srv = await asyncio.start_server(
                        handle, lst.address, lst.port, ssl=ctx, reuse_address=True
                    )
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
                    " AmbientCapabilities= and CapabilityBoundingSet=CAP_NET_BIND_SERVICE; see README)"
                )
            raise GatewaydError(f"cannot open the sensor listener: {exc}{hint}") from exc
        self.refresh_trust()
        self._time_checks()
        self._sweeper = asyncio.create_task(self._sweep(), name="session-expiry")
        return self

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
            extra=messages.extra(messages.LISTENER_CERT_REISSUED, addresses=",".join(addresses), reason=why),
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
