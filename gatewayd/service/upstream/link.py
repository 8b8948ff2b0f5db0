"""The gateway's identity on AWS IoT Core: the supervised uplink connects with the live certificate version.

One component of the daemon (an async context manager) that owns the uplink process (uplink.py here) and
the components that act on it: renewal (renewal.py), the trust bundle (trustmanager.py) and the status
reporter (status.py); the composition root (service/root.py) hands each of them to the daemon as a component
of its own. What is left here: reading the live identity before each connection
(and telling a wrong clock from a bad certificate), routing inbound messages, and `gatewayctl identity`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.errors import CertificateError, IdentityError, TPMError, TPMUnavailable
from gatewayd.core.shaping import Quota
from gatewayd.service.upstream.childspec import child_spec
from gatewayd.service.upstream.identity import Identity, Ready, run_identity_action
from gatewayd.service.upstream.issuer import Route
from gatewayd.service.upstream.renewal import Renewer
from gatewayd.service.upstream.status import StatusReporter
from gatewayd.service.upstream.trustmanager import TrustManager, build_trust
from gatewayd.service.upstream.uplink import Blocked, ChildSpec, MessageHandler, Uplink, UplinkStatus
from gatewayd.stores import truststore
from gatewayd.stores.identity import IdentityStore, Version
from gatewayd.stores.renewal import RenewalStore

__all__ = ["DATE_FAILURES", "Upstream", "build_trust", "quota"]

log = logging.getLogger("gatewayd.upstream")
# OpenSSL's words for a certificate refused for its dates by the gateway's own clock (verify errors 9 and 10)
DATE_FAILURES = ("certificate is not yet valid", "certificate has expired")


def quota(config: Config) -> Quota:
    q = config.upstream.quota
    return Quota(
        q.publishes_per_second, q.bytes_per_second, q.max_message_bytes, q.max_inflight,
        q.max_subscriptions, q.filters_per_subscribe,
    )  # fmt: skip


class Upstream:
    def __init__(
        self,
        config: Config,
        store: IdentityStore,
        trust: truststore.TrustBundle,
        on_change: Callable[[], None] = lambda: None,
        on_message: MessageHandler | None = None,
        hold_at: frozenset[str] = frozenset(),
        tpm_absent: Callable[[], str | None] = lambda: None,
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.clock_trusted = clock_trusted  # the wall clock is synchronized (service/clock.py)
        self._suspect = ""  # the last clock problem reported (CLOCK_SUSPECT), so each is logged once
        self.store = store
        self.identity = Identity(config, store)
        self.on_change = on_change
        self.ready: Ready | None = None
        self.on_message = on_message or self._unhandled_message
        self.routes: dict[str, Route] = {}  # exact topics answered to the gateway itself (provisioning API)
        self.uplink = Uplink(
            self._prepare,
            self._dispatch,
            on_state=self._on_uplink_state,
            reconnect_max_delay=config.upstream.reconnect_max_delay,
            quota=quota(config),
            max_queued=100_000,  # the forwarder hands over 2 x max_inflight; the rest waits in the spool
        )
        self.trust = TrustManager(config, trust, self.uplink, clock_trusted)
        self.renewer = Renewer(
            config,
            store,
            RenewalStore(Path(config.gateway.state_dir)),
            self.uplink,
            self.routes,
            self.spec_for,
            self.connected_certificate,
            on_change=on_change,
            hold_at=hold_at,
            clock_trusted=clock_trusted,
        )
        self.status = StatusReporter(config, self.uplink, self.trust, self.renewer, lambda: self.ready)
        self._tasks: list[asyncio.Task[None]] = []
        self.tpm_absent = tpm_absent  # why the TPM device cannot be used now (gatewayd.service.hardware)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Upstream:
        if self.config.identity.key_backend == "file":
            log.warning(
                'identity.key_backend is "file": the private key is not protected by a TPM',
                extra=logevents.extra(logevents.INSECURE_KEY_BACKEND),
            )
        self.trust.check_roots()
        await self.uplink.__aenter__()
        self._tasks = [
            asyncio.create_task(self.status.run(), name="status-publisher"),
            asyncio.create_task(self.trust.run(), name="root-expiry"),
            asyncio.create_task(self.renewer.run(), name="renewal"),
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.uplink.__aexit__(exc_type, exc, tb)

    def reconfigure(self, config: Config) -> None:
        """Live keys changed (SIGHUP)."""
        self.config = config
        self.identity = Identity(config, self.store)
        self.renewer.configure(config)
        self.status.config = config
        self.trust.configure(config)

    # ------------------------------------------------------------------ the live identity

    async def _prepare(self) -> ChildSpec | Blocked:
        try:
            ready = await asyncio.to_thread(self.identity.check_live, self.tpm_absent, self.clock_trusted())
        except TPMUnavailable as exc:
            self.ready = None
            return Blocked(f"waiting for TPM: {exc}", "waiting-for-tpm")
        except (IdentityError, TPMError, CertificateError) as exc:
            self.ready = None
            return Blocked(str(exc))
        self.ready = ready
        if ready.date_problem:
            self._clock_suspect(f"the gateway's own {ready.date_problem} (connecting anyway: AWS IoT judges)")
        return self.spec_for(ready.version, self.config.gateway.thing_name)

    def _clock_suspect(self, reason: str) -> None:
        """A certificate refused (or doubtful) for its dates while the clock is not known to be right; logged
        once per problem (the dates and the time in parentheses change at every attempt)."""
        key = reason.split(" (", 1)[0]
        if key == self._suspect:
            return
        self._suspect = key
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        log.warning(
            "certificate dates and an unsynchronized clock (it says %s): %s; most likely the clock is wrong; "
            "trying again as soon as it is synchronized", now, reason,
            extra=logevents.extra(logevents.CLOCK_SUSPECT, wall_clock=now, reason=reason),
        )  # fmt: skip

    def clock_changed(self, synchronized: bool) -> None:
        """The wall clock was synchronized or jumped: renewal looks at its schedule again, and an uplink that
        is not connected tries again now (a failure for certificate dates may be gone)."""
        self._suspect = ""
        self.renewer.clock_changed()
        if synchronized:
            self.trust.check_roots()
        if not self.uplink.connected:
            self.uplink.kick()

    def connected_certificate(self) -> str | None:
        """The certificate id the uplink is connected with now, if it is connected."""
        if self.ready is None or not self.uplink.connected:
            return None
        return self.ready.summary.certificate_id

    def spec_for(self, version: Version, client_id: str, ca_bundle: Path | None = None) -> ChildSpec:
        """How an uplink process connects with this certificate version (live, or staged for a trial), and
        this CA bundle (default: the current one)."""
        return child_spec(self.config, self.store, version, client_id, ca_bundle or self.trust.bundle.path)

    def live_spec(self, ca_bundle: Path) -> ChildSpec | None:
        """How a trial connects with the live identity and another CA bundle (trust update); None when
        there is no working identity."""
        live = self.store.live()
        if live is None or self.ready is None:
            return None
        client_id = self.config.renewal.trial_client_id or self.config.gateway.thing_name
        return self.spec_for(live, client_id, ca_bundle)

    def _on_uplink_state(self, status: UplinkStatus) -> None:
        if (
            status.last_error
            and not self.clock_trusted()
            and any(words in status.last_error for words in DATE_FAILURES)
        ):
            self._clock_suspect(status.last_error)
        self.on_change()

    def _dispatch(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        route = self.routes.get(topic)
        if route is not None:
            route(topic, payload)
        else:
            self.on_message(topic, payload, qos, retain)

    def _unhandled_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        log.debug("message on %s with no handler (%d bytes)", topic, len(payload))

    # ------------------------------------------------------------------ control commands

    async def trust_update(self, mode: str, ca_file: str, from_config: bool) -> dict[str, Any]:
        return await self.trust.update(mode, ca_file, from_config, self.live_spec)

    async def cmd_identity(self, action: str, args: dict[str, Any]) -> Any:
        if action == "renew":
            return self.renewer.request(bool(args.get("now")))
        before = self.store.live()
        result = await asyncio.to_thread(run_identity_action, self.identity, action, args)
        if action == "install-certificate":
            self.uplink.kick()  # connect with the new identity now
            old = str(before.meta.get("certificateId")) if before is not None else None
            new = str(result.get("certificateId") or "") or None
            if new != old:
                self.renewer.identity_event("installed", old, new, "installed by hand")
        return result
