"""The gateway's side of AWS IoT Core: trust bundle, identity, the supervised uplink, and status messages.

One component of the daemon (an async context manager). It exposes the uplink's publish/subscribe API to the
rest of the daemon, the identity operations to the control socket, and a status summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from gatewayd import __version__
from gatewayd.adapters import tls
from gatewayd.core import messages
from gatewayd.core.config import Config
from gatewayd.core.errors import GatewaydError, TPMError, TPMUnavailable
from gatewayd.core.renewal import Step, parse_duration
from gatewayd.core.shaping import Quota
from gatewayd.core.timefmt import iso_utc
from gatewayd.core.topics import expand
from gatewayd.core.trust import AMAZON, FILE_MODES, MODES, expiry_warnings
from gatewayd.service.identity import Identity, Ready
from gatewayd.service.issuer import Route
from gatewayd.service.renewal import Renewer, prove
from gatewayd.service.uplink import Blocked, ChildSpec, MessageHandler, Uplink, UplinkStatus
from gatewayd.stores import atomic, truststore
from gatewayd.stores.identity import IdentityError, IdentityStore, Version
from gatewayd.stores.renewal import RenewalStore
from gatewayd.stores.truststore import TrustError
from gatewayd.stores.x509util import CertificateError

log = logging.getLogger("gatewayd.upstream")
# OpenSSL's words for a certificate refused for its dates by the gateway's own clock (verify errors 9 and 10)
DATE_FAILURES = ("certificate is not yet valid", "certificate has expired")


def _iso_ms(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def build_trust(config: Config) -> truststore.TrustBundle:
    """The CA bundle for the validation mode (a TrustError stops the daemon at start); a mode set with
    `gatewayctl trust update` (STATE_DIR/trust/override.json) takes precedence over the config's."""
    up = config.upstream
    state_dir = Path(config.gateway.state_dir)
    override = truststore.read_override(state_dir)
    mode, ca_file = (up.validation_mode, up.ca_file) if override is None else override
    if override is not None and override != (
        up.validation_mode,
        up.ca_file if up.validation_mode in FILE_MODES else "",
    ):
        log.warning(
            "trust: using validation mode %s%s set by `gatewayctl trust update` instead of the config's %s; "
            "`gatewayctl trust update --from-config` returns to the config",
            mode, f" ({ca_file})" if ca_file else "", up.validation_mode,
        )  # fmt: skip
    catalog = truststore.catalog_from_env(AMAZON)
    if catalog is not AMAZON:
        log.warning(
            "using %s instead of the Amazon root pins",
            catalog.origin,
            extra=messages.extra(messages.DEV_TRUST_CATALOG),
        )
    if mode == "legacy":
        log.warning(
            "validation_mode legacy: trusting %s; AWS no longer supports legacy endpoints",
            ca_file,
            extra=messages.extra(messages.LEGACY_TRUST),
        )
    return truststore.build(
        mode, catalog, Path(up.system_ca_bundle), Path(ca_file) if mode in FILE_MODES else None, state_dir
    )


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
        on_change: Any = lambda: None,
        on_message: MessageHandler | None = None,
        hold_at: frozenset[str] = frozenset(),
        tpm_absent: Callable[[], str | None] = lambda: None,
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.clock_trusted = clock_trusted  # the wall clock is synchronized (service/clock.py)
        self._suspect = ""  # the last clock problem reported (CLOCK_SUSPECT), so each is logged once
        self.store = store
        self.trust = trust
        self.identity = Identity(config, store)
        self.on_change = on_change
        self.ready: Ready | None = None
        self.started = time.monotonic()
        self.root_warnings: list[dict[str, Any]] = []
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
        self._tasks: list[asyncio.Task[None]] = []
        self.tpm_absent = tpm_absent  # why the TPM device cannot be used now (gatewayd.service.hardware)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Upstream:
        if self.config.identity.key_backend == "file":
            log.warning(
                'identity.key_backend is "file": the private key is not protected by a TPM',
                extra=messages.extra(messages.INSECURE_KEY_BACKEND),
            )
        self.check_roots()
        await self.uplink.__aenter__()
        self._tasks = [
            asyncio.create_task(self._status_loop(), name="status-publisher"),
            asyncio.create_task(self._root_check_loop(), name="root-expiry"),
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
        self.check_roots()

    # ------------------------------------------------------------------ trust

    def check_roots(self) -> None:
        """Warn of trusted roots near expiry, by a synchronized clock only (checked again once it is)."""
        if not self.clock_trusted():
            self.root_warnings = []
            return
        now = dt.datetime.now(dt.UTC)
        found = expiry_warnings(
            truststore.root_expiries(self.trust), now, self.config.upstream.root_expiry_warning_days
        )
        self.root_warnings = [
            {"root": w.name, "notAfter": iso_utc(w.not_after), "daysLeft": w.days_left} for w in found
        ]
        for w in found:
            log.warning(
                "trusted root %s expires at %s (%s days): update ca-certificates, or "
                "`gatewayctl trust update --mode M` to a mode whose roots are current",
                w.name,
                iso_utc(w.not_after),
                w.days_left,
                extra=messages.extra(
                    messages.TRUST_ROOT_EXPIRING,
                    root=w.name,
                    not_after=iso_utc(w.not_after),
                    days_left=w.days_left,
                ),
            )

    async def _root_check_loop(self) -> None:
        while True:
            await asyncio.sleep(86400)
            self.check_roots()

    # ------------------------------------------------------------------ uplink

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
            extra=messages.extra(messages.CLOCK_SUSPECT, wall_clock=now, reason=reason),
        )  # fmt: skip

    def clock_changed(self, synchronized: bool) -> None:
        """The wall clock was synchronized or jumped: renewal looks at its schedule again, and an uplink that
        is not connected tries again now (a failure for certificate dates may be gone)."""
        self._suspect = ""
        self.renewer.clock_changed()
        if synchronized:
            self.check_roots()
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
        key = self.store.key(version.key_number)
        up, ident = self.config.upstream, self.config.identity
        env: dict[str, str] = {}
        if ident.key_backend == "tpm":
            conf = Path(self.config.gateway.state_dir) / "uplink" / "openssl-tpm2.cnf"
            conf.parent.mkdir(mode=0o700, exist_ok=True)
            if conf.parent.stat().st_mode & 0o777 != 0o700:  # heals one made 0600 by a umask race (0.1.0)
                conf.parent.chmod(0o700)
            if not conf.exists() or conf.read_text() != tls.OPENSSL_TPM2_CONF:
                atomic.write_file(conf, tls.OPENSSL_TPM2_CONF.encode(), 0o600)
            env = {"OPENSSL_CONF": str(conf), "TPM2OPENSSL_TCTI": ident.tcti}
        config = {
            "endpoint": up.endpoint,
            "port": up.port,
            "connect_address": up.connect_address,
            "client_id": client_id,
            "keepalive": up.keepalive,
            "max_inflight": up.quota.max_inflight,
            "alpn": tls.alpn_protocols(up.alpn, up.port),
            "ca_bundle": str(ca_bundle or self.trust.path),
            "cert_file": str(version.fullchain_file),
            "key_file": str(key.key_file),
            "reconnect_max_delay": up.reconnect_max_delay,
        }
        return ChildSpec(config, env)

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

    # ------------------------------------------------------------------ status

    def days_left(self) -> float | None:
        if self.ready is None:
            return None
        return self.ready.summary.days_left(dt.datetime.now(dt.UTC))

    def summary(self) -> dict[str, Any]:
        s, up = self.uplink.status, self.config.upstream
        return {
            "state": s.state,
            "since": iso_utc(s.since),
            "lastError": s.last_error,
            "connectedSince": iso_utc(s.connected_since) if s.connected_since else None,
            "endpoint": up.endpoint,
            "port": up.port,
            "validationMode": self.trust.mode,
            "trustedRoots": list(self.trust.names),
            "trustBundle": str(self.trust.path),
            "rootWarnings": self.root_warnings,
            "certificateId": self.ready.summary.certificate_id if self.ready else None,
            "certificateNotAfter": iso_utc(self.ready.summary.not_after) if self.ready else None,
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

    def status_line(self) -> str:
        """The summary of `gatewayctl status` in one line, for sd_notify STATUS=."""
        s, up = self.uplink.status, self.config.upstream
        since = iso_utc(s.since)
        if s.state == "connected":
            line = f"Connected to {up.endpoint}:{up.port} since {since}"
        elif s.last_error:
            line = f"Uplink {s.state} since {since}: {s.last_error}"
        else:
            line = f"Uplink {s.state} since {since}"
        line += f"; trust {self.trust.mode}"
        days = self.days_left()
        if days is not None and self.ready is not None:
            left = (
                f"{days:.0f} days"
                if days >= 2
                else f"{days * 24:.1f} hours"
                if days * 24 >= 2
                else f"{days * 1440:.0f} min"
            )
            line += f"; certificate {self.ready.summary.certificate_id[:12]} {left} left"
        if self.renewer.state.step is not Step.IDLE:
            line += f"; renewal in progress ({self.renewer.state.step.value})"
        if self.root_warnings:
            first = self.root_warnings[0]
            line += f"; root CA {first['root']} expires in {first['daysLeft']} days"
        return line

    async def _status_loop(self) -> None:
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

    # ------------------------------------------------------------------ trust update

    async def trust_update(self, mode: str, ca_file: str, from_config: bool) -> dict[str, Any]:
        """`gatewayctl trust update`: build the new bundle, prove it with a trial connection (with the live
        identity), then use it; if the uplink does not connect with it within renewal.trial_timeout, the
        previous bundle comes back. Either way the answer says what happened."""
        up, state_dir = self.config.upstream, Path(self.config.gateway.state_dir)
        if from_config:
            mode, ca_file = up.validation_mode, up.ca_file if up.validation_mode in FILE_MODES else ""
        if mode not in MODES:
            raise TrustError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode in FILE_MODES and not ca_file:
            raise TrustError(f"--mode {mode} needs --ca-file")
        if mode not in FILE_MODES and ca_file:
            raise TrustError(f"--ca-file is used only with --mode custom or legacy, not {mode}")
        if ca_file and not Path(ca_file).is_absolute():
            raise TrustError("--ca-file must be an absolute path (the daemon reads it)")
        live = self.store.live()
        if live is None or self.ready is None:
            raise TrustError(
                "no working identity to prove the new bundle with: the uplink must be able to connect"
            )
        catalog = truststore.catalog_from_env(AMAZON)
        candidate = await asyncio.to_thread(
            truststore.build, mode, catalog, Path(up.system_ca_bundle),
            Path(ca_file) if ca_file else None, state_dir, "candidate.pem",
        )  # fmt: skip
        s = self.config.renewal
        timeout = parse_duration(s.trial_timeout)
        old_trust, old_data = self.trust, self.trust.path.read_bytes()
        old_override = truststore.read_override(state_dir)

        async def install() -> None:
            new_override = None if from_config else (mode, ca_file)
            await asyncio.to_thread(self._install_bundle, candidate, new_override)

        try:
            spec = self.spec_for(live, s.trial_client_id or self.config.gateway.thing_name, candidate.path)
            error = await prove(self.uplink, spec, bool(s.trial_client_id), timeout, install)
        finally:
            candidate.path.unlink(missing_ok=True)
        if error is not None:
            log.warning(
                "trust update to %s refused: the trial connection failed: %s", mode, error,
                extra=messages.extra(messages.TRUST_UPDATE_FAILED, mode=mode, reason=error),
            )  # fmt: skip
            raise TrustError(f"the {mode} bundle did not verify the endpoint ({error}); trust unchanged")
        deadline = time.monotonic() + timeout
        while not self.uplink.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if not self.uplink.connected:
            atomic.write_file(old_trust.path, old_data, 0o644)
            truststore.write_override(state_dir, old_override)
            self.trust = old_trust
            self.uplink.restart()
            reason = f"the uplink did not connect with it within {timeout:g} s"
            log.warning(
                "trust update to %s rolled back: %s", mode, reason,
                extra=messages.extra(messages.TRUST_UPDATE_FAILED, mode=mode, reason=reason),
            )  # fmt: skip
            raise TrustError(f"trust update to {mode} rolled back: {reason}")
        log.info(
            "trust updated to %s (%s)", mode, ", ".join(self.trust.names),
            extra=messages.extra(messages.TRUST_UPDATED, mode=mode, roots=",".join(self.trust.names)),
        )  # fmt: skip
        self.check_roots()
        return {
            "validationMode": self.trust.mode,
            "trustedRoots": list(self.trust.names),
            "fromConfig": from_config,
            "previousMode": old_trust.mode,
        }

    def _install_bundle(self, candidate: truststore.TrustBundle, override: tuple[str, str] | None) -> None:
        state_dir = Path(self.config.gateway.state_dir)
        path = state_dir / "trust" / "bundle.pem"
        atomic.write_file(path, candidate.path.read_bytes(), 0o644)
        truststore.write_override(state_dir, override)
        self.trust = truststore.TrustBundle(
            candidate.mode, path, candidate.certs, candidate.names, candidate.source
        )

    # ------------------------------------------------------------------ control commands

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


def run_identity_action(identity: Identity, action: str, args: dict[str, Any]) -> Any:
    """One `gatewayctl identity` action, in the daemon or offline; JSON-ready result."""
    match action:
        case "create-key":
            key = identity.create_key()
            return {"key": key.number, **key.meta}
        case "create-csr":
            return {"csrPem": identity.create_csr().decode()}
        case "install-certificate":
            cert = str(args.get("certificatePem", "")).encode()
            chain = str(args.get("chainPem", "")).encode()
            version = identity.install_certificate(cert, chain)
            return {"version": version.number, **identity.show()}
        case "show":
            return identity.show()
    raise IdentityError(f"unknown identity action {action!r}")
