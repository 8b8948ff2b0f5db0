"""Wills waiting for their Will Delay Interval (MQTT 5.0 section 3.1.3.2.2): published after the delay or
when the session ends, whichever comes first; a connection that resumes the session before then cancels
it [MQTT-3.1.3-9], one that starts a new session has it published at once (the old session ended)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WillDelays:
    def __init__(self) -> None:
        # by client id: the timer, and what publishes the will (never raises: the broker logs a failure)
        self.pending: dict[str, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}

    def wait(self, client_id: str, delay: float, publish: Callable[[], None]) -> None:
        handle = asyncio.get_running_loop().call_later(delay, self._due, client_id)
        self.pending[client_id] = (handle, publish)

    def _due(self, client_id: str) -> None:
        pending = self.pending.pop(client_id, None)
        if pending is not None:
            pending[1]()

    def reconnected(self, client_id: str, resumed: bool) -> None:
        """The sensor connected again while its will waited: cancelled if it resumed the session,
        published now if it started a new one."""
        pending = self.pending.pop(client_id, None)
        if pending is None:
            return
        pending[0].cancel()
        if not resumed:
            pending[1]()

    def session_ended(self, client_id: str) -> None:
        """The session expired while its will waited: the will goes now."""
        pending = self.pending.pop(client_id, None)
        if pending is not None:
            pending[0].cancel()
            pending[1]()
