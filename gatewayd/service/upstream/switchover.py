"""Switching the uplink to something new (a renewed certificate, a trust bundle) without losing the cloud.

One pattern, used by renewal (renewal.py) and by `gatewayctl trust update` (trustmanager.py), both in
service/upstream/:

1. prove: a trial connection with the candidate, in a process of its own (`prove`);
2. install: only after the trial connected, the candidate becomes the live one (the caller's `install`);
3. confirm: the live uplink must connect with it within a window (`confirm`);
4. roll back: otherwise the caller restores what was live before and restarts the uplink.

Renewal persists its step between 2 and 3 (a power cut during the window resumes at 3), so the steps are
separate functions rather than one; the trust update runs them in one go (`switch_over`).
docs/architecture.md, "A renewal", has the data flow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from gatewayd.service.upstream.uplink import Blocked, ChildSpec, Uplink, UplinkStatus


async def trial_connection(spec: ChildSpec, timeout: float) -> str | None:
    """Connect once with `spec` in a separate uplink process; None when it connected, else why not."""
    outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def on_state(status: UplinkStatus) -> None:
        if outcome.done():
            return
        if status.state == "connected":
            outcome.set_result(None)
        elif status.state in ("failed", "refused", "setup-failed") or (
            status.state == "disconnected" and status.last_error
        ):  # with TLS 1.3 a refused client certificate shows as a connection lost right after the handshake
            outcome.set_result(status.last_error or status.state)

    async def prepare() -> ChildSpec | Blocked:
        return spec

    trial = Uplink(prepare, lambda *a: None, on_state=on_state, blocked_retry=timeout, trial=True)
    async with trial:
        try:
            return await asyncio.wait_for(outcome, timeout)
        except TimeoutError:
            return f"no connection within {timeout:g} s"


async def prove(
    uplink: Uplink,
    spec: ChildSpec,
    separate_client_id: bool,
    timeout: float,
    install: Callable[[], Awaitable[None]],
) -> str | None:
    """Prove `spec` (a staged identity or a candidate trust bundle) with a trial connection; if it
    connects, await `install` (which makes what was proven the live one) before the uplink goes on with it.

    With the thing name as client id a trial would take over the live session, so the uplink is suspended
    for the trial (sensor traffic waits in the gateway) and resumes afterwards; with a separate trial
    client id the uplink keeps running and is restarted after a success to switch over. Returns the
    trial's error, or None.
    """
    if not separate_client_id:
        await uplink.suspend()
    try:
        error = await trial_connection(spec, timeout)
        if error is None:
            await install()
    finally:
        if not separate_client_id:
            uplink.resume()
    if error is None and separate_client_id:
        uplink.restart()
    return error


async def confirm(
    uplink: Uplink, window: float, is_new: Callable[[], bool] = lambda: True, poll: float = 1.0
) -> bool:
    """Did the live uplink connect with what was installed (`is_new`) within `window` seconds (looked at
    every `poll` seconds)? Counted on the monotonic clock: a wall-clock jump during the window changes
    nothing."""
    deadline = time.monotonic() + window
    while True:
        if uplink.connected and is_new():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(poll, max(left, 0.05)))


class Refused(NamedTuple):
    stage: str  # "trial": the candidate did not connect (nothing changed); "confirm": rolled back
    reason: str


async def switch_over(
    uplink: Uplink,
    spec: ChildSpec,
    separate_client_id: bool,
    timeout: float,
    install: Callable[[], Awaitable[None]],
    rollback: Callable[[], Awaitable[None]],
) -> Refused | None:
    """prove, install, confirm within `timeout`, else roll back (and restart the uplink with what was live
    before). None on success, else at which stage and why it was refused."""
    error = await prove(uplink, spec, separate_client_id, timeout, install)
    if error is not None:
        return Refused("trial", error)
    if await confirm(uplink, timeout, poll=0.1):
        return None
    await rollback()
    uplink.restart()
    return Refused("confirm", f"the uplink did not connect with it within {timeout:g} s")
