"""The composition root: builds the daemon's components and wires them to each other, in one place.

`build()` returns every component, none of them optional, for the daemon (service/daemon.py) to run;
`open_registry()` is the registry as both the daemon and gatewayctl's offline mode open it. The order
components start in is in docs/architecture.md ("Components").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.templates import expand
from gatewayd.service.downstream.broker import Broker, Peer
from gatewayd.service.downstream.listeners import Downstream
from gatewayd.service.downstream.registry import RegistryService
from gatewayd.service.downstream.serial import SerialSensors
from gatewayd.service.forwarder import Forwarder
from gatewayd.service.hardware import Hardware
from gatewayd.service.upstream.link import Upstream
from gatewayd.service.upstream.renewal import Renewer
from gatewayd.service.upstream.status import StatusReporter
from gatewayd.service.upstream.trustmanager import TrustManager, build_trust
from gatewayd.service.upstream.uplink import Uplink
from gatewayd.stores.identity import IdentityStore
from gatewayd.stores.localca import LocalCA
from gatewayd.stores.migrate import migrate_sqlite_spool
from gatewayd.stores.registry import Registry
from gatewayd.stores.spill import SpillStore

log = logging.getLogger("gatewayd.daemon")

JITR_EVENTS = "$aws/events/certificates/registered"  # AWS IoT's topic for JITR events (+ the CA's id)


@dataclass(frozen=True)
class Components:
    """The running daemon's parts. Started (entered) in `build()`'s order, closed in reverse."""

    store: IdentityStore
    hardware: Hardware
    upstream: Upstream  # the live identity and the uplink process it connects with
    uplink: Uplink
    renewer: Renewer
    trust: TrustManager
    status: StatusReporter
    forwarder: Forwarder
    broker: Broker
    downstream: Downstream
    registry: RegistryService
    serial: SerialSensors
    admission: RegistryGate


@dataclass(frozen=True)
class Hooks:
    """What the daemon itself is told (systemd's STATUS= line) and decides (debug holds, the clock)."""

    on_change: Callable[[], None]
    clock_trusted: Callable[[], bool]
    renewal_holds: frozenset[str] = frozenset()


@contextlib.contextmanager
def open_registry(
    config: Config, local_ca: LocalCA | None = None, clock_trusted: Callable[[], bool] = lambda: True
) -> Iterator[RegistryService]:
    """The sensor certificate registry (STATE_DIR/registry.db) and the local CA it issues with."""
    state_dir = Path(config.gateway.state_dir)
    if local_ca is None:
        local_ca = LocalCA(state_dir, config.gateway.thing_name)
    local_ca.ensure()
    registry = Registry(state_dir / "registry.db", config.gateway.thing_name)
    try:
        service = RegistryService(registry, local_ca, config.gateway.thing_name, clock_trusted=clock_trusted)
        service.configure(config)
        yield service
    finally:
        registry.close()


def open_spool(config: Config) -> SpillStore:
    """The spill store, its torn tails cut (logged), and an earlier version's spool.db moved into it."""
    state_dir = Path(config.gateway.state_dir)
    store = SpillStore(state_dir / "spool", config.spool.max_bytes, config.spool.when_full)
    for line in store.recovered.torn:
        log.warning("spool: %s", line, extra=logevents.extra(logevents.SPOOL_REPAIRED, detail=line))
    if store.recovered.readings:
        log.info(
            "spool: %d message(s) waiting from before the restart (%d segment file(s))",
            store.recovered.readings, store.recovered.segments,
        )  # fmt: skip
    moved = migrate_sqlite_spool(state_dir / "spool.db", store)
    if moved is not None:
        log.info(
            "spool: moved %d message(s) (%d bytes) from spool.db of an earlier version into %s; "
            "spool.db removed", moved.messages, moved.bytes, store.directory,
            extra=logevents.extra(logevents.SPOOL_MIGRATED, spool_messages=moved.messages,
                                 spool_bytes=moved.bytes),
        )  # fmt: skip
    return store


async def build(config: Config, stack: contextlib.AsyncExitStack, hooks: Hooks) -> Components:
    """Make, wire and start every component; `stack` closes them (in reverse order)."""
    state_dir = Path(config.gateway.state_dir)
    store = stack.enter_context(IdentityStore(state_dir, config.identity.keep_versions).locked())
    for cleaned in store.recover():
        log.warning("identity store: removed %s left by an interrupted write", cleaned)
    bundle = build_trust(config)
    late: dict[str, Any] = {}  # the components hardware events reach, once they exist

    def tpm_changed(present: bool) -> None:
        if "uplink" not in late:
            return
        if present:
            late["uplink"].kick()  # connect now
        else:
            late["uplink"].restart("wait for the TPM")  # preparing again finds it absent

    def network_changed(addresses: list[str] | None, reason: str) -> None:
        if "uplink" in late:
            late["uplink"].network_changed(addresses)
        if "downstream" in late and addresses is not None:
            late["downstream"].addresses_changed(addresses)

    hardware = Hardware(config, tpm_changed, network_changed)
    await stack.enter_async_context(hardware)  # before the uplink: the TPM gate
    upstream = Upstream(
        config,
        store,
        bundle,
        on_change=hooks.on_change,
        hold_at=hooks.renewal_holds,
        tpm_absent=hardware.tpm_absent,
        clock_trusted=hooks.clock_trusted,
    )
    late["uplink"] = uplink = upstream.uplink
    await stack.enter_async_context(upstream)
    spill = await asyncio.to_thread(open_spool, config)
    forwarder = Forwarder(config, spill, uplink)
    await stack.enter_async_context(forwarder)  # closes the spool
    admission = RegistryGate(config, uplink)
    broker = Broker(config, forwarder, admit=admission.admit)
    upstream.on_message = broker.on_upstream_message
    admission.broker = broker
    downstream = Downstream(config, broker, clock_trusted=hooks.clock_trusted)
    registry = stack.enter_context(open_registry(config, downstream.ca, hooks.clock_trusted))
    admission.registry = registry
    downstream.anchors = registry.trust_anchors
    late["downstream"] = downstream
    await stack.enter_async_context(downstream)
    serial = SerialSensors(
        config, broker.publish_as, registry.certificate_admission, forwarder.room, lambda: forwarder.accepting
    )
    stack.callback(serial.close_all)
    if config.downstream.serial:
        hardware.attach_serial(serial.device_event)
    return Components(
        store, hardware, upstream, uplink, upstream.renewer, upstream.trust, upstream.status,
        forwarder, broker, downstream, registry, serial, admission,
    )  # fmt: skip


class RegistryGate:
    """A sensor's certificate at CONNECT, judged by the registry; AWS IoT's JITR event when it is waiting
    for activation: on the local broker on $aws/events/certificates/registered/<caCertificateId> (for a
    provisioning agent on the gateway), and upstream on downstream.registration_event_topic + the CA's id
    (a device cannot publish under $aws/events/)."""

    def __init__(self, config: Config, uplink: Uplink) -> None:
        self.config = config
        self.uplink = uplink
        self.broker: Broker | None = None  # set by build(), before the listeners open
        self.registry: RegistryService | None = None

    def configure(self, config: Config) -> None:
        self.config = config

    def admit(self, peer: Peer, client_id: str) -> tuple[int, str] | None:
        assert self.registry is not None
        decision = self.registry.admission(peer.der, client_id)
        if decision.event is not None:
            self.publish_event(decision.event)
        return None if decision.admitted else (decision.code, decision.why)

    def publish_event(self, event: dict[str, Any]) -> None:
        payload = json.dumps(event).encode()
        ca_id = event["caCertificateId"]
        if self.broker is not None:
            self.broker.publish_event(f"{JITR_EVENTS}/{ca_id}", payload)
        template = self.config.downstream.registration_event_topic
        if not template:
            return
        topic = expand(template, {"gateway:ThingName": self.config.gateway.thing_name}) + f"/{ca_id}"
        try:
            self.uplink.enqueue(topic, payload, 1)
        except Exception as exc:  # the uplink's queue is full: the journald event still records it
            log.warning("registration event for %s not queued: %s", event["certificateId"], exc)
