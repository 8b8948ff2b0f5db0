"""A TCP proxy on 127.0.0.1 that time-stamps every connection attempt, and forwards or refuses it.

Used to measure how often a client (re)connects, and to cut it off, without touching the broker behind it.
Threads only; `close()` ends them all. Bounded: at most `max_connections` open at a time.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class RecordingProxy:
    def __init__(self, target_port: int, max_connections: int = 64, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
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
        try:
            while not self._closed:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
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
        self._listener.close()
        self._thread.join(5)
