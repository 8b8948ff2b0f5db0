"""The control socket protocol: bounded, malformed input answered with an error, never a crash."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from gatewayd.core.errors import ControlError
from gatewayd.service.control import ControlServer, request


async def _echo(args: dict[str, Any]) -> Any:
    return {"echo": args}


async def _boom(args: dict[str, Any]) -> Any:
    raise RuntimeError("kaput")


def raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    result = json.loads(reply)
    assert isinstance(result, dict)
    return result


def test_protocol(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    async def scenario() -> None:
        async with ControlServer(path, {"echo": _echo, "boom": _boom}):
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
            call = asyncio.to_thread
            assert await call(request, path, "echo", {"a": 1}) == {"echo": {"a": 1}}
            with pytest.raises(ControlError, match="unknown command 'nope'"):
                await call(request, path, "nope")
            with pytest.raises(ControlError, match="internal error: kaput"):
                await call(request, path, "boom")
            assert (await call(raw, path, b"not json\n"))["error"].startswith("malformed request")
            assert (await call(raw, path, b'{"command": 5}\n'))["error"].startswith("malformed request")
            deep = b'{"command": "echo", "args": {"x": ' + b"[" * 30000 + b"]" * 30000 + b"}}\n"
            assert len(deep) < 65536  # within the request size: refused for its depth (issue 17, item 12)
            assert (await call(raw, path, deep))["error"].startswith("malformed request")
            assert (await call(raw, path, b'{"command": "echo"}'))["ok"] is False  # no newline before EOF
            too_big = b'{"command": "echo", "args": {"x": "' + b"a" * 70000 + b'"}}\n'
            assert (await call(raw, path, too_big))["ok"] is False
            with pytest.raises(ControlError, match="within 5 s and 64 KiB"):  # the answer, not a broken pipe
                await call(request, path, "echo", {"x": "a" * 4_000_000})
            assert await call(request, path, "echo") == {"echo": {}}  # still serving
        assert not path.exists()

    asyncio.run(scenario())


def test_refuses_to_replace_a_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("precious")

    async def scenario() -> None:
        async with ControlServer(path, {}):
            pass

    with pytest.raises(ControlError, match="is not a socket"):
        asyncio.run(scenario())
    assert path.read_text() == "precious"


def test_permission_denied_is_a_clear_one_line_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.sock"

    async def scenario() -> subprocess.CompletedProcess[str]:
        async with ControlServer(path, {"echo": _echo}):
            argv = [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--socket", str(path), "status"]
            if os.geteuid() == 0:  # root ignores modes: ask as an unprivileged user instead
                argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
                os.chmod(tmp_path, 0o755)
            else:
                path.chmod(0)
            return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)

    result = asyncio.run(scenario())
    assert result.returncode == 1
    assert result.stderr == f"gatewayctl: permission denied on {path}: run as root or in group gatewayd\n"


def test_socket_directory_is_created_traversable_for_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "run" / "gatewayd" / "c.sock"

    async def scenario() -> None:
        async with ControlServer(path, {}):
            assert stat.S_IMODE(path.parent.stat().st_mode) & 0o700 == 0o700
            assert stat.S_IMODE(path.stat().st_mode) == 0o660

    asyncio.run(scenario())


def test_the_umask_is_never_narrowed_while_other_coroutines_run(tmp_path: Path) -> None:
    """The umask is process-wide: narrowed across an await, it gave a directory another coroutine made at
    that moment mode 0600, locking the daemon out of it for good (found by the system test: the uplink's
    STATE_DIR/uplink). Other coroutines must always see the process's own umask."""
    path = tmp_path / "c.sock"
    seen: set[int] = set()

    def current_umask() -> int:
        mask = os.umask(0o077)
        os.umask(mask)
        return mask

    async def watcher(stop: asyncio.Event) -> None:
        while not stop.is_set():
            seen.add(current_umask())
            await asyncio.sleep(0)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher(stop))
        await asyncio.sleep(0)
        for _ in range(20):  # several starts, each yielding to the watcher while the server is made
            async with ControlServer(path, {}):
                assert stat.S_IMODE(path.stat().st_mode) == 0o660
        stop.set()
        await task

    own = os.umask(0o022)
    try:
        asyncio.run(scenario())
    finally:
        os.umask(own)
    assert seen == {0o022}, {oct(m) for m in seen}
