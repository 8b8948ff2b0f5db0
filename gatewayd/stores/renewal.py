"""The renewal state on disk: STATE_DIR/renewal.json, replaced atomically at every step (a power cut leaves
the step before or the step after, never a torn file), mode 0600.

Every change goes through gatewayd.core.renewal.next_step: a refused transition writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gatewayd.core.errors import RenewalStateError
from gatewayd.core.renewal import Event, Step, next_step
from gatewayd.stores import atomic

FILE = "renewal.json"
FORMAT = 1


@dataclass(frozen=True)
class Outcome:
    at: float
    result: str  # "renewed", "failed", "rolled-back"
    reason: str = ""
    certificate_id: str = ""


@dataclass(frozen=True)
class RenewalState:
    step: Step = Step.IDLE
    started_at: float | None = None
    attempt: int = 0  # failed renewals since the last success (drives the retry backoff)
    key_number: int | None = None  # the key this renewal made (or reuses, rotate_key = false)
    key_created: bool = False  # True when this renewal made the key (so a failure must remove it)
    staged_version: int | None = None
    previous_version: int | None = None  # live before promotion: the rollback target
    promoted_at: float | None = None
    last: Outcome | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # issuer bookkeeping (e.g. request ids)

    def to_json(self) -> bytes:
        body = asdict(self)
        body["format"] = FORMAT
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> RenewalState:
        body = json.loads(data)
        if not isinstance(body, dict) or body.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        last = body.pop("last", None)
        body["step"] = Step(body["step"])
        return cls(**body, last=Outcome(**last) if last else None)


class RenewalStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE

    def load(self) -> RenewalState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return RenewalState()
        except OSError as exc:
            raise RenewalStateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            return RenewalState.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise RenewalStateError(f"{self.path} is not a renewal state file ({exc})") from exc

    def save(self, state: RenewalState) -> RenewalState:
        atomic.write_file(self.path, state.to_json(), 0o600)
        return state

    def advance(self, state: RenewalState, event: Event, **changes: Any) -> RenewalState:
        """The state after `event` (with `changes`), written durably before it is returned; a transition the
        table refuses raises RenewalRefused and writes nothing."""
        step = next_step(state.step, event)
        new = replace(state, step=step, **changes)
        if step is Step.IDLE:  # a renewal ended: nothing of it stays in progress
            new = replace(
                new, started_at=None, key_number=None, key_created=False, staged_version=None,
                previous_version=None, promoted_at=None, extra={},
            )  # fmt: skip
        return self.save(new)
