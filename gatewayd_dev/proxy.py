"""A TCP proxy on 127.0.0.1 that time-stamps every connection attempt, and forwards or refuses it.

Used to measure how often a client (re)connects, and to cut it off, without touching the broker behind it;
with `delay`, every byte is passed on that many seconds after it arrived, in each direction, in order (a
round trip of 2 x delay: a cellular or satellite uplink's 100-300 ms, which loopback hides).
Threads only; `close()` ends them all. Bounded: at most `max_connections` open at a time, and at most
DELAY_BUFFER bytes waiting in each direction of a delayed connection (reading pauses beyond it).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque

DELAY_BUFFER = 16 * 1024 * 1024


class _DelayLine:
    """Writes to `sock` what put() is given, `delay` seconds later, in order (one thread)."""

    def __init__(self, sock: socket.socket, delay: float) -> None:
        self.sock = sock
        self.delay = delay
        self._queue: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self.broken = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self._cond:
            while self._bytes > DELAY_BUFFER and not self.broken:
                self._cond.wait(0.1)
            self._queue.append((time.monotonic() + self.delay, data))
            self._bytes += len(data)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                due, data = self._queue[0]
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                self.sock.sendall(data)
            except OSError:
                with self._cond:
                    self.broken = True
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._bytes -= len(data)
                self._cond.notify_all()

    def finish(self) -> None:
        """Pass on what is waiting (at most `delay` more), then end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.delay + 5)


class RecordingProxy:
    def __init__(
        self, target_port: int, max_connections: int = 64, host: str = "127.0.0.1", delay: float = 0.0
    ) -> None:
        self.target_port = target_port
        self.delay = delay
        self.accepts: list[float] = []  # monotonic times of accepted connections
        self.forward = True  # False: close each new connection at once
        self.max_connections = max_connections
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))  # another address only inside a test's own network namespace
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepts.append(time.monotonic())
            if not self.forward or len(self._open) >= self.max_connections:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        lines = {a: _DelayLine(b, self.delay), b: _DelayLine(a, self.delay)} if self.delay > 0 else {}
        try:
            while not self._closed:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if lines:
                        lines[sock].put(data)
                        if lines[sock].broken:
                            return
                    else:
                        (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            for line in lines.values():
                line.finish()
            with self._lock:
                self._open -= {a, b}
            a.close()
            b.close()

    def cut(self) -> None:
        """Drop every open connection (the client sees its connection reset)."""
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone does not)
        self._listener.close()
        self._thread.join(5)
