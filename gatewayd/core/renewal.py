"""Renewal of the gateway's own certificate: when it is due, how retries are spaced, and the renewal state
machine (one table of allowed transitions; a refused one changes nothing and says why).

Pure: times are seconds since the epoch and randomness (uniform in [0, 1)) come in as arguments.

The flow (docs/identity.md, "Renewal"): a new key in the TPM (KEYED) -> a CSR to the issuer (REQUESTED) -> the
certificate staged, never live before it is proven (STAGED) -> a trial mutual-TLS connection with the staged
identity (TRIAL) -> promoted atomically, the uplink switches over, the previous version kept (PROMOTED) ->
the new identity connected within the rollback window (IDLE, succeeded) or rolled back (IDLE, failed).
Any failure before promotion discards the staged version and its key and leaves the current one live.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gatewayd.core.duration import parse_duration as parse_duration
from gatewayd.core.errors import RenewalRefused

JITTER_SHARE = 0.1  # the due time moves earlier by up to this share of the renew-before window
MAX_JITTER = 86400.0  # ... but never by more than a day


@dataclass(frozen=True)
class RenewBefore:
    """How long before expiry to renew: a share of the lifetime ("33%") or a duration ("30d")."""

    share: float | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> RenewBefore:
        text = text.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if not 0 < percent < 100:
                raise ValueError(f"{text!r}: a share must be between 0% and 100% (exclusive), like 33%")
            return cls(share=percent / 100)
        return cls(seconds=parse_duration(text))

    def window(self, lifetime: float) -> float:
        """Seconds before expiry at which renewal is due, for a certificate of this lifetime."""
        if self.share is not None:
            return self.share * lifetime
        assert self.seconds is not None
        return min(self.seconds, lifetime)


class RenewBeforeText(str):
    """renewal.renew_before as written ("33%", "30d"), parsed once at config load: `policy`."""

    policy: RenewBefore

    def __new__(cls, text: str) -> RenewBeforeText:
        self = super().__new__(cls, text)
        self.policy = RenewBefore.parse(text)
        return self


def due_time(not_before: float, not_after: float, policy: RenewBefore, jitter: float) -> float:
    """When renewal of a certificate valid [not_before, not_after] is due. `jitter` in [0, 1) moves it
    earlier by up to 10% of the window (at most a day), so a fleet issued together does not renew together.
    Never before not_before."""
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    lifetime = max(not_after - not_before, 0.0)
    window = policy.window(lifetime)
    spread = min(window * JITTER_SHARE, MAX_JITTER)
    return max(not_before, not_after - window - jitter * spread)


def age_due(not_before: float, max_age: float, jitter: float) -> float:
    """When a certificate valid from `not_before` is older than `max_age` (seconds): rotation by age, for
    certificates that expire too late for expiry-based renewal ever to rotate the key (AWS IoT's 2049 ones).
    Jittered earlier as due_time, by up to 10% of the age (at most a day)."""
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    return not_before + max_age - jitter * min(max_age * JITTER_SHARE, MAX_JITTER)


def renewal_due(
    not_before: float, not_after: float, policy: RenewBefore, max_age: float | None, jitter: float
) -> tuple[float, str]:
    """When renewal is due, and why: "expiry" (renew_before) or "age" (max_age, when set and sooner)."""
    by_expiry = due_time(not_before, not_after, policy, jitter)
    if max_age is None:
        return by_expiry, "expiry"
    by_age = age_due(not_before, max_age, jitter)
    return (by_age, "age") if by_age < by_expiry else (by_expiry, "expiry")


def retry_delay(attempt: int, interval: float, cap: float, rand: float) -> float:
    """Seconds before retry number `attempt` (1 = the first retry): capped exponential backoff with equal
    jitter (half fixed, half random), so retries never bunch at zero."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, interval * 2.0 ** min(attempt - 1, 32))
    return ceiling / 2 + rand * ceiling / 2


class Step(StrEnum):
    IDLE = "IDLE"
    KEYED = "KEYED"  # a new key exists (pending); nothing sent yet
    REQUESTED = "REQUESTED"  # the CSR went to the issuer
    STAGED = "STAGED"  # the issued certificate is stored and staged, not live
    TRIAL = "TRIAL"  # a trial connection with the staged identity is running
    PROMOTED = "PROMOTED"  # live; the previous version is kept until the new one has connected


class Event(StrEnum):
    START = "start"  # due, or `gatewayctl identity renew`
    KEY_CREATED = "key-created"  # or, with rotate_key = false, the current key chosen
    REQUESTED = "requested"
    ISSUED = "issued"  # certificate received, verified against the key and the trust, staged
    TRIAL_STARTED = "trial-started"
    TRIAL_PASSED = "trial-passed"  # -> promoted atomically
    CONFIRMED = "confirmed"  # the uplink connected with the promoted identity
    FAILED = "failed"  # anything before promotion: discard what was made
    ROLLED_BACK = "rolled-back"  # the promoted identity did not connect within the rollback window


_S, _E = Step, Event
TRANSITIONS: dict[tuple[Step, Event], Step] = {
    (_S.IDLE, _E.START): _S.KEYED,
    (_S.KEYED, _E.KEY_CREATED): _S.KEYED,  # the key number is recorded with it
    (_S.KEYED, _E.REQUESTED): _S.REQUESTED,
    (_S.REQUESTED, _E.ISSUED): _S.STAGED,
    (_S.STAGED, _E.TRIAL_STARTED): _S.TRIAL,
    (_S.TRIAL, _E.TRIAL_STARTED): _S.TRIAL,  # resumed after a restart
    (_S.TRIAL, _E.TRIAL_PASSED): _S.PROMOTED,
    (_S.PROMOTED, _E.CONFIRMED): _S.IDLE,
    (_S.PROMOTED, _E.ROLLED_BACK): _S.IDLE,
    (_S.KEYED, _E.FAILED): _S.IDLE,
    (_S.REQUESTED, _E.FAILED): _S.IDLE,
    (_S.STAGED, _E.FAILED): _S.IDLE,
    (_S.TRIAL, _E.FAILED): _S.IDLE,
}


def next_step(step: Step, event: Event) -> Step:
    try:
        return TRANSITIONS[(step, event)]
    except KeyError:
        raise RenewalRefused(step, event) from None


class Resume(StrEnum):
    """What to do with a renewal found in progress at start (after a crash or a power cut)."""

    NOTHING = "nothing"
    DISCARD = "discard"  # before anything was issued: remove the pending key; the renewal starts again
    TRIAL = "trial"  # a staged certificate exists: prove it again (it was never live)
    CONFIRM = "confirm"  # promoted: wait for the uplink to connect within what is left of the window


RESUME = {
    Step.IDLE: Resume.NOTHING,
    Step.KEYED: Resume.DISCARD,
    Step.REQUESTED: Resume.DISCARD,  # the issuer's answer was lost with the process: ask again later
    Step.STAGED: Resume.TRIAL,
    Step.TRIAL: Resume.TRIAL,
    Step.PROMOTED: Resume.CONFIRM,
}
