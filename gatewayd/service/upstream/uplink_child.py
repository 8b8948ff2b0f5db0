"""The uplink child process: the only process that does TLS with the TPM-held key (docs/architecture.md).

OpenSSL 3.0 cannot do TLS with a TPM key and with a software key in one process, so the daemon starts this
small process with OPENSSL_CONF naming the tpm2 provider. It is a thin pump: one thread, one select() loop
over the IPC socket and the MQTT socket. It owns no message state beyond the MQTT packet ids in flight:
when the connection drops, every message in flight is reported back as not delivered, and the daemon
(which owns them) sends them again after the reconnect.

Run as: python -m gatewayd.service.upstream.uplink_child FD   (FD: this end of the socketpair)
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import random
import select
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from gatewayd.adapters import tls
from gatewayd.adapters.mqtt import Event, UpstreamClient
from gatewayd.core import ipc
from gatewayd.core.backoff import Backoff
from gatewayd.core.der import certificate_validity as der_validity

EXIT_BAD_SETUP = 3  # the TLS context could not be built (bad certificate/key/bundle): restarting cannot help
READ_PACKETS = 128  # MQTT packets read per pass (a burst of PUBACKs is one pass, not one pass each)


class Child:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ipc.Decoder()
        self.pending: list[ipc.Frame] = []
        self.config: dict[str, Any] = {}
        self.client: UpstreamClient | None = None
        self.connected = False
        self.inflight: dict[int, int] = {}  # MQTT packet id -> daemon message id
        self.acks: list[bytes] = []  # ACK frames not sent yet (flushed once per loop pass)
        self.sub_mids: dict[int, list[Any]] = {}
        self.stopping = False
        self.retry_now = False  # the network changed: the next attempt need not wait for the backoff
        self._server_dates: tuple[dt.datetime, ...] | None = None  # fetched after a refusal for them

    # ---------------------------------------------------------------- IPC

    def send(self, data: bytes) -> None:
        if self.acks:  # in order: the acknowledgements gathered so far go first
            data = b"".join([*self.acks, data])
            self.acks.clear()
        self.sock.sendall(data)

    def flush(self) -> None:
        """Send the acknowledgements gathered in one pass of the loop, in one write."""
        if self.acks:
            self.send(b"")

    def state(self, state: str, **fields: Any) -> None:
        self.send(ipc.json_frame(ipc.Kind.STATE, {"state": state, "at": time.time(), **fields}))

    def read_ipc(self, timeout: float | None = None) -> bool:
        """Read what the daemon sent; False when it has gone (EOF)."""
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return True
        data = self.sock.recv(262144)
        if not data:
            return False
        self.pending += self.decoder.feed(data)
        return True

    def handle_frames(self) -> None:
        frames, self.pending = self.pending, []
        for f in frames:
            match f.kind:
                case ipc.Kind.PUBLISH:
                    self.publish(ipc.decode_publish(f.body))
                case ipc.Kind.SUBSCRIBE:
                    self.subscribe(f.json()["filters"])
                case ipc.Kind.UNSUBSCRIBE:
                    if self.client is not None and self.connected:
                        try:
                            self.client.unsubscribe(f.json()["filters"])
                        except (OSError, ValueError) as exc:
                            self.drop_connection(error=describe(exc))
                case ipc.Kind.STOP:
                    self.stopping = True
                case ipc.Kind.NETWORK:
                    self.network_changed(f.json().get("addresses"))
                case _:
                    pass

    def network_changed(self, addresses: list[str] | None) -> None:
        """Waiting for the next attempt: make it now (the one-per-second rule still holds). Connected or
        connecting from an address the host no longer has: that connection is dead, so drop it and
        reconnect now. A connection whose address is still there, or when the addresses are unknown (None),
        is kept (the keepalive watches it)."""
        if self.client is None:
            self.retry_now = True
            return
        if addresses is None:
            return
        sock = self.client.socket()
        try:
            local = str(sock.getsockname()[0]).split("%")[0] if sock is not None else ""
        except OSError:
            local = ""
        local = local.removeprefix("::ffff:")  # an IPv4 address on an IPv6 socket
        if local and local not in ("0.0.0.0", "::") and local not in addresses:
            self.drop_connection(error=f"the local address {local} is gone")
            self.retry_now = True

    def publish(self, p: ipc.Publish) -> None:
        if self.client is None or not self.connected:
            self.send(ipc.encode_ack(ipc.Ack(p.id, False, "not connected")))
            return
        try:
            rc, mid = self.client.publish(p.topic, p.payload, p.qos, p.retain)
        except (OSError, ValueError) as exc:  # paho 1.6 writes at once and lets a dead TLS socket's error out
            self.send(ipc.encode_ack(ipc.Ack(p.id, False, "connection lost")))
            self.drop_connection(error=describe(exc))
            return
        if rc != 0:
            self.send(ipc.encode_ack(ipc.Ack(p.id, False, f"publish refused by the client (rc {rc})")))
        elif p.qos == 0:
            self.send(ipc.encode_ack(ipc.Ack(p.id, True, "sent")))
        else:
            self.inflight[mid] = p.id

    def subscribe(self, filters: list[Any]) -> None:
        if self.client is None or not self.connected:
            self.send(
                ipc.json_frame(ipc.Kind.SUBACK, {"filters": filters, "codes": [], "error": "not connected"})
            )
            return
        try:
            rc, mid = self.client.subscribe([(f, int(q)) for f, q in filters])
        except (OSError, ValueError) as exc:
            self.drop_connection(error=describe(exc))  # re-subscribed after the reconnect
            return
        if rc != 0:
            self.send(ipc.json_frame(ipc.Kind.SUBACK, {"filters": filters, "codes": [], "error": f"rc {rc}"}))
        else:
            self.sub_mids[mid] = filters

    # ---------------------------------------------------------------- MQTT events

    def drain_events(self) -> None:
        client = self.client
        # An event may end the connection (and clear self.client): stop there, the rest are moot.
        while client is not None and client is self.client and client.events:
            self.on_event(client.events.popleft())

    def on_event(self, ev: Event) -> None:
        match ev.kind:
            case "connack":
                if ev.code == 0:
                    self.connected = True
                    self.state("connected")
                else:
                    self.state("refused", error=f"CONNACK {ev.code}: {ev.detail}")
                    self.drop_connection()
            case "disconnect":
                self.drop_connection(error=f"connection lost (rc {ev.code})" if ev.code else "disconnected")
            case "puback":
                mid_id = self.inflight.pop(ev.mid, None)
                if mid_id is not None:
                    self.acks.append(ipc.encode_ack(ipc.Ack(mid_id, True, "puback")))
            case "suback":
                filters = self.sub_mids.pop(ev.mid, [])
                self.send(ipc.json_frame(ipc.Kind.SUBACK, {"filters": filters, "codes": list(ev.codes)}))
            case "message":
                m = ev.message
                self.send(ipc.encode_message(ipc.Message(m.qos, bool(m.retain), m.topic, bytes(m.payload))))

    def drop_connection(self, error: str = "") -> None:
        """Forget the connection; every message in flight goes back to the daemon as not delivered."""
        was_connected = self.connected
        self.connected = False
        for message_id in self.inflight.values():
            self.send(ipc.encode_ack(ipc.Ack(message_id, False, "connection lost before PUBACK")))
        self.inflight.clear()
        self.sub_mids.clear()
        if self.client is not None:
            sock = self.client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self.client = None
        if was_connected or error:
            self.state("disconnected", error=error)

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        while not self.pending:
            if not self.read_ipc():
                return 0
        first = self.pending.pop(0)
        if first.kind != ipc.Kind.CONFIG:
            return 2
        self.config = first.json()
        cfg = self.config
        try:
            context = tls.client_context(
                Path(cfg["ca_bundle"]), Path(cfg["cert_file"]), Path(cfg["key_file"]), cfg["alpn"]
            )
        except (ssl.SSLError, OSError) as exc:
            self.state("setup-failed", error=f"cannot use the certificate, key or CA bundle: {exc}")
            return EXIT_BAD_SETUP
        backoff = Backoff(cap=float(cfg["reconnect_max_delay"]))
        since_last = cfg.get("seconds_since_last_attempt")
        if since_last is not None:
            backoff.attempted(time.monotonic() - float(since_last))
        while not self.stopping:
            if self.retry_now:
                self.retry_now = False
                backoff.reset_now()
            delay = backoff.delay(time.monotonic(), random.random())
            if delay > 0:
                self.state("waiting", retry_in=round(delay, 3), attempt=backoff.attempt)
                if not self.sleep_serving_ipc(delay):
                    return 0
                if self.stop_requested():
                    break
                if self.retry_now:
                    continue  # the network changed while waiting: the delay again, without the backoff
            backoff.attempted(time.monotonic())
            self.state("connecting", attempt=backoff.attempt)
            if self.connect(context) and self.serve():
                backoff.succeeded()
            else:
                backoff.failed()
        return 0

    def stop_requested(self) -> bool:
        return self.stopping  # a method, so type narrowing of the attribute does not outlive a call

    def sleep_serving_ipc(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.stopping and not self.retry_now:
            if not self.read_ipc(timeout=left):
                return False
            self.handle_frames()
        return True

    def connect(self, context: ssl.SSLContext) -> bool:
        cfg = self.config
        self.client = UpstreamClient(
            cfg["client_id"], context, cfg.get("connect_address", ""), int(cfg.get("max_inflight", 100))
        )
        try:
            self.client.connect(cfg["endpoint"], int(cfg["port"]), int(cfg["keepalive"]))
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self.client = None
            self.state("failed", error=describe(exc) + self._dates_if_refused_for_them(exc))
            return False
        return True

    def _dates_if_refused_for_them(self, exc: BaseException) -> str:
        """For a server certificate refused for its dates (verify errors 9 and 10): its dates and this
        gateway's time, so that a wrong clock can be told from a wrong certificate. The certificate is fetched
        once per uplink process (a connection that sends nothing)."""
        if not isinstance(exc, ssl.SSLCertVerificationError) or exc.verify_code not in (9, 10):
            return ""
        if self._server_dates is None:
            cfg = self.config
            der = tls.peer_certificate(
                Path(cfg["ca_bundle"]), Path(cfg["cert_file"]), Path(cfg["key_file"]), cfg["alpn"],
                cfg["endpoint"], int(cfg["port"]), cfg.get("connect_address", ""),
            )  # fmt: skip
            try:
                self._server_dates = der_validity(der) if der else ()
            except ValueError:
                self._server_dates = ()
        now = _iso(dt.datetime.now(dt.UTC))
        if not self._server_dates:
            return f" (this gateway's clock says {now})"
        start, end = (_iso(d) for d in self._server_dates)
        return f" (the server's certificate is valid from {start} to {end}; this gateway's clock says {now})"

    def serve(self) -> bool:
        """Pump until the connection ends; True if it had been accepted (CONNACK 0)."""
        accepted = False
        deadline = time.monotonic() + 30  # CONNACK must come within 30 s
        while self.client is not None and not self.stopping:
            client = self.client
            sock = client.socket()
            if sock is None:
                self.drop_connection(error="socket closed")
                break
            wants = [sock] if client.want_write() else []
            timeout = 0.0 if client.pending() else 1.0
            try:
                readable, writable, _ = select.select([self.sock, sock], wants, [], timeout)
            except (OSError, ValueError):
                self.drop_connection(error="socket error")
                break
            if self.sock in readable:
                if not self.read_ipc():
                    self.stopping = True
                self.handle_frames()
            try:
                if sock in readable or client.pending():
                    client.loop_read(READ_PACKETS)
                if sock in writable:
                    client.loop_write()
                client.loop_misc()
            except (ssl.SSLError, OSError) as exc:
                self.drop_connection(error=describe(exc))
            if self.client is not None:
                self.drain_events()
            self.flush()
            accepted = accepted or self.connected
            if not self.connected and self.client is not None and time.monotonic() > deadline:
                self.drop_connection(error="no CONNACK within 30 s")
        if self.stopping and self.client is not None:
            self.client.disconnect()
            for _ in range(10):  # flush the DISCONNECT
                if not self.client.want_write():
                    break
                self.client.loop_write()
            self.drop_connection()
        return accepted


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(exc: BaseException) -> str:
    """A one-line reason a person can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"server certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the endpoint: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection failed: {exc.strerror}"
    return f"connection failed: {exc}"


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the daemon


def main() -> int:
    _die_with_parent()
    if os.getppid() == 1:
        return 1  # the daemon is already gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop (STOP frame)
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        return Child(sock).run()
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
