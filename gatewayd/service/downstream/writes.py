"""Writing to sensors' sockets: what a connection's sans-IO machine has to send, written at once or once the
current burst of callbacks is over, so that the many acknowledgements one read from the uplink brings go to
each sensor in one write (one TLS record, one system call) instead of one each."""

from __future__ import annotations

import asyncio
import contextlib

from gatewayd.core.mqtt.session import ServerConnection


class Writes:
    def __init__(self) -> None:
        self._dirty: dict[ServerConnection, asyncio.StreamWriter] = {}
        self._scheduled = False

    def now(self, conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        data = conn.data_to_send()
        if data and not writer.is_closing():
            writer.write(data)

    def soon(self, conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        """Write this connection's pending bytes at the end of the event loop's current pass."""
        self._dirty[conn] = writer
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write_dirty)

    def _write_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        self._scheduled = False
        for conn, writer in dirty.items():
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self.now(conn, writer)
