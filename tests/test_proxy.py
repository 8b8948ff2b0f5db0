"""The dev proxy that stands between the gateway and the stand-in (gatewayd_dev/proxy.py): a delayed
connection keeps every byte, in order, and adds 2 x delay to a round trip; refusing and cutting work as the
tests and the benchmark's outage rely on. Loopback only, every loop bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gatewayd_dev.proxy import RecordingProxy


@pytest.fixture
def echo() -> Iterator[int]:
    """An echo server on 127.0.0.1; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _ended(sock: socket.socket) -> bool:
    """The peer ended the connection: end of stream, or a reset."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_delayed_connection_keeps_every_byte_in_order_and_adds_the_round_trip(echo: int) -> None:
    proxy = RecordingProxy(echo, delay=0.1)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            round_trip = time.monotonic() - started
            assert 0.2 <= round_trip < 1.0, round_trip
            data = b"".join(i.to_bytes(4, "big") for i in range(50_000))  # 200 kB in many writes
            for start in range(0, len(data), 1000):
                sock.sendall(data[start : start + 1000])
            assert _recv_exactly(sock, len(data)) == data
    finally:
        proxy.close()
    print(f"\nround trip through a 100 ms proxy: {round_trip * 1000:.0f} ms")


def test_refusing_and_cutting(echo: int) -> None:
    proxy = RecordingProxy(echo, delay=0.05)
    try:
        live = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        live.sendall(b"x")
        assert _recv_exactly(live, 1) == b"x"
        proxy.forward = False  # an outage: new connections are closed at once
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as refused:
            assert refused.recv(1) == b""
        proxy.cut()  # and the open one is dropped
        live.settimeout(5)
        assert _ended(live)  # a timeout (still open) fails the test
        live.close()
        proxy.forward = True
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as back:
            back.sendall(b"y")
            assert _recv_exactly(back, 1) == b"y"
        assert len(proxy.accepts) == 3
    finally:
        proxy.close()
