"""The control socket: gatewayctl's way into the running daemon.

Protocol: the client connects, sends one JSON object on one line (`{"command": NAME, "args": {...}}`) and
reads one JSON line back: `{"ok": true, "result": ...}` or `{"ok": false, "error": "one line"}`.
A request is bounded (64 KiB) and must arrive within 5 s, so a stuck client cannot hold the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from gatewayd.core.errors import ControlError, GatewaydError

log = logging.getLogger("gatewayd.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Async context manager serving `handlers` on a unix socket (mode 0660)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ControlServer:
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            _remove_stale_socket(self.path)
            old_umask = os.umask(0o117)  # the socket is created 0660 from the start, never wider
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=str(self.path), limit=MAX_REQUEST
                )
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        log.info("control socket listening on %s", self.path)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return {"ok": False, "error": "request must be one JSON line within 5 s and 64 KiB"}
        try:
            request = json.loads(line)
            command, args = request["command"], request.get("args", {})
            if not isinstance(command, str) or not isinstance(args, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'malformed request: expected {"command": NAME, "args": {...}}'}
        log.debug("control request %s", command)
        handler = self.handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except GatewaydError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse if a live daemon still answers on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ControlError(f"another gatewayd is already answering on {path}")


class DaemonUnreachable(ControlError):
    """No daemon listens on the control socket (it is not running)."""


def request(path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Client side (blocking): send one command, return its result or raise ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except FileNotFoundError as exc:
            raise DaemonUnreachable(f"no control socket at {path}: is gatewayd running?") from exc
        except ConnectionRefusedError as exc:
            raise DaemonUnreachable(f"nothing answers on {path}: is gatewayd running?") from exc
        except PermissionError as exc:
            raise ControlError(f"permission denied on {path}: run as root or in group gatewayd") from exc
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"garbled reply from {path}") from exc
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")
