"""The control socket: gatewayctl's way into the running daemon.

Protocol: the client connects, sends one JSON object on one line (`{"command": NAME, "args": {...}}`) and
reads one JSON line back: `{"ok": true, "result": ...}` or `{"ok": false, "error": "one line"}`, plus
`"code"`: AWS's exception name, for a refusal that mirrors one of AWS IoT's (the registry's commands).
A request is bounded (64 KiB) and must arrive within 5 s, so a stuck client cannot hold the daemon.

Who may ask: root, the daemon's own user, and members of the control group (gateway.control_group), checked
by the connecting process's credentials (SO_PEERCRED, and its supplementary groups, SO_PEERGROUPS) on every
connection, not only by the socket file's mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from gatewayd.core import jsonsafe, logevents
from gatewayd.core.errors import ControlError, DaemonUnreachable, GatewaydError

log = logging.getLogger("gatewayd.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Async context manager serving `handlers` on a unix socket (mode 0660)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler], group: str = "") -> None:
        self.path = path
        self.handlers = handlers
        self.group = group
        self.gid: int | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ControlServer:
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            _remove_stale_socket(self.path)
            sock = _bound_unix_socket(self.path)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        self._set_group()
        log.info("control socket listening on %s", self.path)
        return self

    def _set_group(self) -> None:
        if not self.group:
            return
        try:
            self.gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.info("control group %s does not exist: only root and uid %d may use gatewayctl", self.group,
                     os.geteuid())  # fmt: skip
            return
        if os.stat(self.path).st_gid == self.gid:
            return  # already (the daemon's own group, as under the package's unit): no chown, which its
            # system call filter refuses
        try:
            os.chown(self.path, -1, self.gid)
        except OSError as exc:  # not a member: the socket keeps the daemon's group; peer checks still apply
            log.warning("cannot give %s to group %s: %s", self.path, self.group, exc.strerror)

    def allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except (OSError, AttributeError, struct.error):
            return False
        if uid in (0, os.geteuid()):
            return True
        if self.gid is not None and self.gid in ({gid} | _peer_groups(sock)):
            return True
        log.warning(
            "control socket: refused uid %d (pid %d): not root, not uid %d, not in group %s",
            uid, pid, os.geteuid(), self.group or "(none)",
            extra=logevents.extra(logevents.CONTROL_DENIED, peer_uid=uid, peer_pid=pid),
        )  # fmt: skip
        return False

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
            if self.allowed(writer):
                reply = await self._answer(reader)
            else:
                # Read (and ignore) the request first: closing on a client still sending would leave it a
                # broken pipe instead of this answer.
                with contextlib.suppress(
                    asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError
                ):
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        await reader.readuntil(b"\n")
                reply = {"ok": False, "error": "permission denied: run as root or as a member of group "
                         f"{self.group or '(none configured)'}"}  # fmt: skip
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
            request = jsonsafe.loads(line)
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
            reply = {"ok": False, "error": str(exc)}
            if exc.code:
                reply["code"] = exc.code
            return reply
        except Exception as exc:
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python has no constant for it


def _peer_groups(sock: socket.socket) -> set[int]:
    """The connecting process's supplementary groups as they were at connect() time."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 65536)
    except OSError:
        return set()
    return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def _bound_unix_socket(path: Path) -> socket.socket:
    """A unix socket bound at `path`, 0660 from the start, never wider. The umask is process-wide: it is
    narrowed only around bind(), with no await in between, so no other coroutine or thread creating a file
    or directory meanwhile can be given the narrower mode (a directory made 0600 would lock its owner out)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
    except OSError:
        sock.close()
        raise
    return sock


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


def request(path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Client side (blocking): send one command, return its result or raise ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            # The daemon may answer early (a refusal) and close while this is still sending: read its answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
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
        raise ControlError(str(reply.get("error", "unknown error")), str(reply.get("code") or ""))
    return reply.get("result")
