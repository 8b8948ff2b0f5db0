"""Renewal of the gateway's own certificate ahead of expiry, with a proven switch-over and rollback.

The steps and what a crash at each leaves are in gatewayd.core.renewal; the state is in
STATE_DIR/renewal.json.
One renewal runs at a time, on the daemon's event loop; blocking work (TPM, files) goes to a thread.

Trial connection: with `renewal.trial_client_id` set, a second uplink process connects with the staged
identity under that client id while the main uplink keeps running. Without it (AWS IoT policies often allow
only the thing name as client id, and AWS IoT allows one connection per client id), the main uplink is
suspended for the trial: sensor messages wait in the gateway's queue, the trial connects as the thing, and
the main uplink resumes (with the new identity if the trial passed, else the old one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from gatewayd.core import logevents
from gatewayd.core.config import Config, RenewalSection
from gatewayd.core.errors import GatewaydError, RenewalFailed
from gatewayd.core.renewal import (
    RESUME,
    Event,
    Resume,
    Step,
    renewal_due,
    retry_delay,
)
from gatewayd.core.templates import expand
from gatewayd.core.timefmt import iso_utc
from gatewayd.service.upstream.identity import Identity
from gatewayd.service.upstream.issuer import CommandIssuer, FleetProvisioningIssuer, Issuer, Route
from gatewayd.service.upstream.switchover import confirm, prove
from gatewayd.service.upstream.uplink import ChildSpec, Uplink
from gatewayd.stores.identity import IdentityStore, Version
from gatewayd.stores.renewal import Outcome, RenewalStore
from gatewayd.stores.x509util import CertSummary

log = logging.getLogger("gatewayd.renewal")

SpecFor = Callable[[Version, str], ChildSpec]  # (version, client id) -> how to connect with it


def jitter_for(certificate_id: str) -> float:
    """A stable per-certificate value in [0, 1): the same after a restart, different across a fleet."""
    return int(certificate_id[:8], 16) / 2**32


class Renewer:
    def __init__(
        self,
        config: Config,
        store: IdentityStore,
        state: RenewalStore,
        uplink: Uplink,
        routes: MutableMapping[str, Route],
        spec_for: SpecFor,
        connected_id: Callable[[], str | None],
        on_change: Callable[[], None] = lambda: None,
        now: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        hold_at: frozenset[str] = frozenset(),
        clock_trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.states = state
        self.clock_trusted = clock_trusted  # the wall clock is synchronized (service/clock.py)
        self._waiting_for_clock = False
        self.uplink = uplink
        self.routes = routes
        self.spec_for = spec_for
        self.connected_id = connected_id  # the certificate id the uplink is connected with now, if any
        self.on_change = on_change
        self.now = now
        self.rand = rand
        self.state = state.load()
        self._retry_mono: float | None = None  # monotonic: when a failed renewal may be tried again
        self._scheduled: float | None = None
        self.finished = 0  # renewals ended (renewed, failed or rolled back) since the daemon started
        self._wake = asyncio.Event()
        self._force = False
        self.hold_at = hold_at  # debug only (tests kill the daemon at each step): pause at these checkpoints
        self.held: str | None = None
        self._release = asyncio.Event()
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.settings: RenewalSection = config.renewal
        self.identity = Identity(config, self.store)
        self.issuer = self._issuer()
        self._wake.set()  # a reload may move the schedule (renew_before, max_age, issuer): look again now

    # ------------------------------------------------------------------ the schedule

    def _issuer(self) -> Issuer | None:
        s = self.settings
        timeout = s.issue_timeout.seconds
        if s.issuer == "command":
            env = {"GATEWAYD_THING_NAME": self.config.gateway.thing_name}
            return CommandIssuer(s.command, timeout, env)
        if s.issuer == "aws-fleet-provisioning":
            return FleetProvisioningIssuer(
                self.uplink, self.routes, s.template_name, dict(s.parameters), self.config.gateway.thing_name,
                timeout,
            )  # fmt: skip
        return None  # "": automatic renewal is off

    def due(self) -> float | None:
        """When the live certificate is due for renewal (the policy, jittered per certificate)."""
        return self.due_why()[0]

    def due_why(self) -> tuple[float | None, str]:
        """When the live certificate is due, and why: "expiry" (renew_before) or "age" (max_age)."""
        live = self.store.live()
        if live is None:
            return None, ""
        s = CertSummary.of(live.certificate())
        policy = self.settings.renew_before.policy
        max_age = self.settings.max_age.seconds or None
        return renewal_due(
            s.not_before.timestamp(), s.not_after.timestamp(), policy, max_age, jitter_for(s.certificate_id)
        )

    def next_attempt(self) -> float | None:
        due = self.due()
        if due is None:
            return None
        retry_at = self.retry_at()
        return max(due, retry_at) if retry_at is not None else due

    def retry_at(self) -> float | None:
        """When a failed renewal may be tried again, on the wall clock (counted on the monotonic clock, so a
        wall-clock jump neither hastens nor delays it)."""
        if self._retry_mono is None:
            return None
        return self.now() + max(self._retry_mono - time.monotonic(), 0.0)

    def _note_clock_wait(self, due: float) -> None:
        if not self._waiting_for_clock:
            self._waiting_for_clock = True
            log.warning(
                "renewal due at %s by the wall clock, which is not synchronized: waiting for it to be "
                "(`gatewayctl identity renew --now` renews regardless)", iso_utc(due),
            )  # fmt: skip

    def clock_changed(self) -> None:
        """The wall clock was synchronized or jumped: look at the schedule again now."""
        self._waiting_for_clock = False
        self._wake.set()

    def request(self, force: bool) -> dict[str, Any]:
        """`gatewayctl identity renew [--now]`: check now (renew if due), or renew now regardless."""
        if self.issuer is None:
            raise RenewalFailed('renewal.issuer is "": automatic renewal is off')
        if self.state.step is not Step.IDLE:
            return {"started": False, **self.summary(), "reason": "a renewal is already in progress"}
        self._force = self._force or force
        self._wake.set()
        return {"started": True, **self.summary()}

    def summary(self) -> dict[str, Any]:
        nxt = self.next_attempt()
        last = self.state.last
        return {
            "issuer": self.settings.issuer,
            "step": self.state.step.value,
            "nextRenewal": iso_utc(nxt) if nxt is not None and self.settings.issuer else None,
            "dueBy": self.due_why()[1] or None,
            "failedAttempts": self.state.attempt,
            "waitingForClock": self._waiting_for_clock,
            "finishedSinceStart": self.finished,
            **({"heldAt": self.held} if self.hold_at else {}),
            "last": None
            if last is None
            else {
                "at": iso_utc(last.at),
                "result": last.result,
                "reason": last.reason,
                "certificateId": last.certificate_id,
            },
        }

    def _log_schedule(self, nxt: float | None) -> None:
        if nxt is None or nxt == self._scheduled:
            return
        self._scheduled = nxt
        live = self.store.live()
        s = CertSummary.of(live.certificate()) if live is not None else None
        log.info(
            "next renewal due at %s (certificate %s valid until %s)",
            iso_utc(nxt),
            s.certificate_id if s else "-",
            iso_utc(s.not_after.timestamp()) if s else "-",
            extra=logevents.extra(
                logevents.RENEWAL_SCHEDULED,
                due=iso_utc(nxt),
                certificate_id=s.certificate_id if s else "",
                not_after=iso_utc(s.not_after.timestamp()) if s else "",
            ),
        )

    async def run(self) -> None:
        await self._resume()
        while True:
            issuer = self.issuer
            nxt = self.next_attempt()
            if issuer is not None:
                self._log_schedule(nxt)
            due_now = not self._force and issuer is not None and nxt is not None and nxt <= self.now()
            if due_now and nxt is not None and not self.clock_trusted():
                # due by a clock that may be wrong: wait for it to be set (clock_changed() wakes this loop;
                # else it looks again after check_interval)
                self._note_clock_wait(nxt)
                nxt = None
            wait = self.settings.check_interval.seconds
            if issuer is not None and nxt is not None:
                wait = min(wait, max(nxt - self.now(), 0.0))
            if not self._force and (issuer is None or nxt is None or nxt > self.now()):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            self._force = False
            if issuer is None:
                continue
            try:
                await self.renew(issuer)
            except Exception:  # a renewal bug must not end the daemon's renewals
                log.exception("renewal failed unexpectedly")
                await self._failed("internal error (see the log)")

    # ------------------------------------------------------------------ one renewal

    CHECKPOINTS = ("keyed", "requested", "staged", "trial", "promoting", "promoted")

    async def _checkpoint(self, name: str) -> None:
        """Debug builds of the flow (GATEWAYD_DEBUG_RENEWAL_HOLD): wait here until released, so a test can
        SIGKILL the daemon with the renewal at exactly this point."""
        if name not in self.hold_at:
            return
        self.held = name
        log.warning("debug: renewal held at %s", name)
        self._release.clear()
        await self._release.wait()
        self.held = None

    def release(self) -> None:
        self._release.set()

    def _advance(self, event: Event, **changes: Any) -> None:
        self.state = self.states.advance(self.state, event, **changes)
        if self.state.step is Step.IDLE:
            self.finished += 1
        self.on_change()

    async def renew(self, issuer: Issuer) -> None:
        live = self.store.live()
        if live is None:
            return
        self._advance(Event.START, started_at=self.now())
        log.info(
            "renewal started (issuer %s, certificate %s)",
            issuer.name,
            live.meta.get("certificateId"),
            extra=logevents.extra(
                logevents.RENEWAL_STARTED,
                issuer=issuer.name,
                certificate_id=str(live.meta.get("certificateId")),
            ),
        )
        try:
            if self.settings.rotate_key:
                key = await asyncio.to_thread(self.identity.create_key)
                self._advance(Event.KEY_CREATED, key_number=key.number, key_created=True)
            else:
                self._advance(Event.KEY_CREATED, key_number=live.key_number, key_created=False)
            await self._checkpoint("keyed")
            csr = await asyncio.to_thread(self.identity.create_csr)
            self._advance(Event.REQUESTED)
            await self._checkpoint("requested")
            chain = await issuer.issue(csr)
            assert self.state.key_number is not None
            version = await asyncio.to_thread(self.identity.stage_certificate, chain, self.state.key_number)
        except (GatewaydError, OSError) as exc:
            await self._failed(str(exc))
            return
        self._advance(Event.ISSUED, staged_version=version.number)
        await self._checkpoint("staged")
        s = CertSummary.of(version.certificate())
        log.info(
            "certificate %s issued (valid %s to %s), staged as version %s",
            s.certificate_id,
            iso_utc(s.not_before.timestamp()),
            iso_utc(s.not_after.timestamp()),
            version.number,
            extra=logevents.extra(
                logevents.RENEWAL_ISSUED,
                certificate_id=s.certificate_id,
                not_before=iso_utc(s.not_before.timestamp()),
                not_after=iso_utc(s.not_after.timestamp()),
            ),
        )
        await self._trial_and_promote()

    async def _trial_and_promote(self) -> None:
        assert self.state.staged_version is not None
        version = self.store.version(self.state.staged_version)
        s = CertSummary.of(version.certificate())
        self._advance(Event.TRIAL_STARTED)
        await self._checkpoint("trial")
        client_id = self.settings.trial_client_id or self.config.gateway.thing_name

        async def promote() -> None:
            live = self.store.live()
            self._advance(
                Event.TRIAL_PASSED, previous_version=live.number if live else None, promoted_at=self.now()
            )
            await self._checkpoint("promoting")
            await asyncio.to_thread(self.identity.promote, version, "renewal")
            await self._checkpoint("promoted")
            log.info(
                "certificate %s promoted (previous version %s kept for rollback)",
                s.certificate_id,
                self.state.previous_version,
                extra=logevents.extra(
                    logevents.RENEWAL_PROMOTED,
                    certificate_id=s.certificate_id,
                    not_after=iso_utc(s.not_after.timestamp()),
                ),
            )

        error = await prove(
            self.uplink,
            self.spec_for(version, client_id),
            bool(self.settings.trial_client_id),
            self.settings.trial_timeout.seconds,
            promote,
        )
        if error is not None:
            log.warning(
                "trial connection with certificate %s failed: %s",
                s.certificate_id,
                error,
                extra=logevents.extra(
                    logevents.RENEWAL_TRIAL_FAILED, certificate_id=s.certificate_id, reason=error
                ),
            )
            live = self.store.live()
            await self._failed(f"trial connection failed: {error}")
            # issued (and, by fleet provisioning, registered and attached to the thing) but never used
            self.identity_event(
                "abandoned",
                str(live.meta.get("certificateId")) if live else None,
                s.certificate_id,
                f"trial connection failed: {error}",
                keep="old",
            )
            return
        await self._confirm()

    async def _confirm(self) -> None:
        """The promoted identity must connect within the rollback window, else the previous one returns."""
        assert self.state.staged_version is not None and self.state.promoted_at is not None
        version = self.store.version(self.state.staged_version)
        cid = str(version.meta.get("certificateId"))
        old = self._certificate_id(self.state.previous_version)
        window = self.settings.rollback_window.seconds
        # what is left of the window by the (persisted) promotion time, never more than the window (a clock
        # set back), then counted on the monotonic clock (a jump during the window changes nothing)
        left = min(max(self.state.promoted_at + window - self.now(), 0.0), window)
        if await confirm(self.uplink, left, lambda: self.connected_id() == cid):
            self._advance(Event.CONFIRMED, attempt=0, last=Outcome(self.now(), "renewed", "", cid))
            self._retry_mono = None
            await asyncio.to_thread(self._prune)
            log.info("connected with certificate %s; renewal complete", cid)
            self.identity_event("promoted", old, cid, "renewal: the new certificate connected")
            return
        await self._rollback(f"certificate {cid} did not connect within the rollback window")

    async def _rollback(self, reason: str) -> None:
        previous = self.state.previous_version
        failed = self._certificate_id(self.state.staged_version)
        if previous is not None:
            await asyncio.to_thread(self.identity.promote, self.store.version(previous), "rollback")
        self.uplink.restart()
        log.error(
            "renewal rolled back to version %s: %s",
            previous,
            reason,
            extra=logevents.extra(logevents.RENEWAL_ROLLED_BACK, reason=reason, version=str(previous)),
        )
        attempt = self.state.attempt + 1
        self._advance(Event.ROLLED_BACK, attempt=attempt, last=Outcome(self.now(), "rolled-back", reason))
        self._schedule_retry(attempt)
        self.identity_event("rolledBack", failed, self._certificate_id(previous), reason)

    def _certificate_id(self, number: int | None) -> str | None:
        if number is None:
            return None
        try:
            return str(self.store.version(number).meta.get("certificateId")) or None
        except (GatewaydError, OSError):
            return None

    def identity_event(
        self, event: str, old: str | None, new: str | None, reason: str, keep: str = "new"
    ) -> None:
        """Tell AWS IoT which certificate the gateway uses now and which it no longer will
        (renewal.identity_event_topic): `active` is the one in use, `unused` the one a cloud rule may
        deactivate (UpdateCertificate INACTIVE). Queued on the uplink (sent once it is connected; lost if
        the daemon stops first, the journal keeps IDENTITY_EVENT)."""
        active, unused = (new, old) if keep == "new" else (old, new)
        body = {
            "event": event,
            "thingName": self.config.gateway.thing_name,
            "oldCertificateId": old,
            "newCertificateId": new,
            "activeCertificateId": active,
            "unusedCertificateId": unused,
            "reason": reason,
            "timestamp": int(self.now() * 1000),
        }
        log.info(
            "identity event %s: certificate %s in use, %s no longer", event, active, unused,
            extra=logevents.extra(logevents.IDENTITY_EVENT, event=event, certificate_id=active or "",
                                 unused_certificate_id=unused or ""),
        )  # fmt: skip
        template = self.settings.identity_event_topic
        if not template:
            return
        topic = expand(template, {"gateway:ThingName": self.config.gateway.thing_name})
        try:
            self.uplink.enqueue(topic, json.dumps(body).encode(), 1)
        except Exception as exc:  # the uplink's queue is full: the journal still has it
            log.warning("identity event %s not queued: %s", event, exc)

    async def _failed(self, reason: str) -> None:
        """Anything before promotion: discard what this renewal made; the live identity stays."""
        removed = await asyncio.to_thread(self.store.discard)
        attempt = self.state.attempt + 1
        if self.state.step is not Step.IDLE:
            self._advance(Event.FAILED, attempt=attempt, last=Outcome(self.now(), "failed", reason))
        delay = self._schedule_retry(attempt)
        log.error(
            "renewal failed: %s; removed %s; next attempt in %.0f s",
            reason,
            ", ".join(removed) or "nothing",
            delay,
            extra=logevents.extra(logevents.RENEWAL_FAILED, reason=reason, retry_in=round(delay)),
        )

    def _schedule_retry(self, attempt: int) -> float:
        delay = retry_delay(
            attempt,
            self.settings.retry_interval.seconds,
            self.settings.retry_max.seconds,
            self.rand(),
        )
        self._retry_mono = time.monotonic() + delay
        return delay

    def _prune(self) -> None:
        self.store.keep = self.config.identity.keep_versions
        self.store.prune()

    # ------------------------------------------------------------------ after a crash

    async def _resume(self) -> None:
        match RESUME[self.state.step]:
            case Resume.NOTHING:
                return
            case Resume.DISCARD:
                log.warning("renewal interrupted in step %s: discarding it", self.state.step.value)
                await self._failed(f"interrupted in step {self.state.step.value} (restart)")
            case Resume.TRIAL:
                log.warning(
                    "renewal interrupted in step %s: trying the staged certificate again",
                    self.state.step.value,
                )
                if self.store.staged() is None or self.state.staged_version is None:
                    await self._failed("the staged certificate is gone")
                    return
                await self._trial_and_promote()  # STAGED or TRIAL: (again) prove it, then promote
            case Resume.CONFIRM:
                assert self.state.staged_version is not None
                live = self.store.live()
                if live is None or live.number != self.state.staged_version:  # the crash came before promote
                    await asyncio.to_thread(
                        self.identity.promote, self.store.version(self.state.staged_version), "renewal"
                    )
                    self.uplink.restart()
                await self._confirm()
