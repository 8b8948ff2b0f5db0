"""The uplink's connection state (pure: states, events, a transition table; time passed in, no I/O), as the
daemon tracks it from its own decisions (prepare blocked, suspended for a renewal) and from what the uplink
process reports (connecting, CONNACK, lost, backing off). service/upstream/uplink.py feeds it; `gatewayctl
status`, STATUS= and the renewal's trial connection read it.

An event not allowed in the current state raises IllegalTransition and changes nothing (the caller logs it:
a report that makes no sense must not bend the state, e.g. CONNECTED without CONNECTING first).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gatewayd.core.errors import IllegalTransition


class UplinkState(Enum):
    STARTING = "starting"
    BLOCKED = "blocked"  # prepare() says the gateway cannot connect yet (no certificate, expired...)
    WAITING_FOR_TPM = "waiting-for-tpm"
    SUSPENDED = "suspended"  # a renewal's trial connection uses the client id
    WAITING = "waiting"  # backing off before the next attempt
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    FAILED = "failed"  # TCP or TLS failed
    REFUSED = "refused"  # CONNACK with an error
    SETUP_FAILED = "setup-failed"  # the certificate, key or CA bundle cannot be used


class UplinkEvent(Enum):
    BLOCKED = "blocked"
    TPM_ABSENT = "tpm-absent"
    SUSPEND = "suspend"
    BACKOFF = "backoff"
    CONNECTING = "connecting"
    CONNACK_OK = "connack-ok"
    CONNACK_REFUSED = "connack-refused"
    CONNECT_FAILED = "connect-failed"
    SETUP_FAILED = "setup-failed"
    CONNECTION_LOST = "connection-lost"
    PROCESS_ENDED = "process-ended"  # the uplink process exited (or was stopped)


S, E = UplinkState, UplinkEvent
_NOT_CONNECTED = frozenset(S) - {S.CONNECTED}
_LIVE = frozenset({S.CONNECTING, S.CONNECTED})

# event -> (the states it may happen in, the state it leads to)
TRANSITIONS: dict[UplinkEvent, tuple[frozenset[UplinkState], UplinkState]] = {
    E.BLOCKED: (_NOT_CONNECTED - {S.CONNECTING}, S.BLOCKED),
    E.TPM_ABSENT: (_NOT_CONNECTED - {S.CONNECTING}, S.WAITING_FOR_TPM),
    E.SUSPEND: (_NOT_CONNECTED - {S.CONNECTING}, S.SUSPENDED),
    E.BACKOFF: (_NOT_CONNECTED, S.WAITING),
    E.CONNECTING: (_NOT_CONNECTED, S.CONNECTING),
    E.CONNACK_OK: (frozenset({S.CONNECTING}), S.CONNECTED),
    E.CONNACK_REFUSED: (frozenset({S.CONNECTING}), S.REFUSED),
    E.CONNECT_FAILED: (frozenset({S.CONNECTING}), S.FAILED),
    E.SETUP_FAILED: (_NOT_CONNECTED, S.SETUP_FAILED),
    E.CONNECTION_LOST: (_LIVE, S.DISCONNECTED),
    E.PROCESS_ENDED: (_LIVE, S.DISCONNECTED),
}
IGNORED = {E.PROCESS_ENDED: _NOT_CONNECTED - {S.CONNECTING}}  # events that change nothing in these states
FAILURES = frozenset({S.FAILED, S.REFUSED, S.SETUP_FAILED})


@dataclass(frozen=True)
class Transition:
    old: UplinkState
    new: UplinkState
    event: UplinkEvent


class UplinkMachine:
    """The state, since when (wall-clock seconds, for display), the last error, and connection figures."""

    def __init__(self, now: float) -> None:
        self.state = S.STARTING
        self.since = now
        self.last_error = ""
        self.connected_since: float | None = None
        self.connect_attempts = 0

    @property
    def connected(self) -> bool:
        return self.state is S.CONNECTED

    def fire(self, event: UplinkEvent, now: float, error: str | None = None) -> Transition | None:
        """Apply `event`; returns the transition (None when the event changes nothing here). `error` replaces
        the last error when given ("" clears it)."""
        allowed, new = TRANSITIONS[event]
        if self.state in IGNORED.get(event, ()):
            return None
        if self.state not in allowed:
            raise IllegalTransition(f"uplink: {event.value} is not possible in state {self.state.value}")
        old = self.state
        if error is not None:
            self.last_error = error
        if event is E.CONNECTING:
            self.connect_attempts += 1
        if new is S.CONNECTED:
            self.connected_since = now
            self.last_error = ""
        elif old is S.CONNECTED:
            self.connected_since = None
        if new is not old:
            self.state, self.since = new, now
        return Transition(old, new, event)
