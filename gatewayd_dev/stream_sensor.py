"""A sensor that streams QoS 1 readings the way people write them, for tests: connect(), loop_start(), then
publish() at once and on, with a persistent session, letting the client library reconnect by itself.

    python -m gatewayd_dev.stream_sensor --port P --ca CA --cert C --key K --client-id ID --out OUT.json
        [--library paho|awscrt] [--mqtt5] [--count N] [--rate R] [--clean] [--timeout S] [--host H]
    python -m gatewayd_dev.stream_sensor ... --clients N --cert-dir DIR --client-id PREFIX --out OUT.json
        (N sensors PREFIX-0 ... PREFIX-N-1 in one process, each in its own thread, with DIR/<id>.pem and .key)

Runs under any interpreter: Debian 12's python3 (paho-mqtt 1.6, which sends its first PUBLISHes in the same
write as CONNECT and re-sends its in-flight messages so on every reconnect), the dev venv (paho-mqtt 2.x,
the AWS IoT Device SDK v2 with --library awscrt). Reading i has the payload "<client id> <i>" on
sensors/<client id>/stream. It stops by itself: when every reading is acknowledged, or after --timeout.
OUT gets JSON: when each reading was handed to the library and acknowledged (Unix seconds), CONNACKs
(time, session present) and disconnects (time, code); with --clients, one such object per client id.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Record:
    def __init__(self, count: int) -> None:
        self.lock = threading.Lock()
        self.published: list[float | None] = [None] * count
        self.acked: list[float | None] = [None] * count
        self.connacks: list[tuple[float, bool]] = []
        self.disconnects: list[tuple[float, int]] = []
        self.connect_failures: list[tuple[float, str]] = []  # the first connect() raised (then tried again)
        self.all_acked = threading.Event()
        self._left = count

    def ack(self, seq: int) -> None:
        with self.lock:
            if self.acked[seq] is None:
                self.acked[seq] = time.time()
                self._left -= 1
                if self._left == 0:
                    self.all_acked.set()

    def dump(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "acked": self.acked,
            "connacks": self.connacks,
            "disconnects": self.disconnects,
            "connectFailures": self.connect_failures,
        }


def _code(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else -1


def run_paho(args: argparse.Namespace, rec: Record, client_id: str, cert: str, key: str) -> None:
    import paho.mqtt.client as paho

    api = getattr(paho, "CallbackAPIVersion", None)  # paho-mqtt 2.x
    kw: dict[str, Any] = {"client_id": client_id}
    if args.mqtt5:
        kw["protocol"] = paho.MQTTv5
    else:
        kw["protocol"], kw["clean_session"] = paho.MQTTv311, args.clean
    v2 = api is not None
    client = paho.Client(api.VERSION2, **kw) if api is not None else paho.Client(**kw)
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(cert, key)
    client.tls_set_context(ctx)
    client.reconnect_delay_set(1, 2)  # paho's default backs off to 120 s; sensors that must catch up set less
    mids: dict[int, int] = {}  # paho's message id -> reading
    early: set[int] = set()  # acknowledged before publish() returned its mid (possible in paho 1.6)

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
        present = flags.get("session present") if isinstance(flags, dict) else flags.session_present
        rec.connacks.append((time.time(), bool(present)))

    def on_disconnect(c: Any, userdata: Any, *rest: Any) -> None:
        rc = rest[1] if v2 else rest[0]  # 2.x: (flags, reason, properties); 1.6: (rc[, properties])
        rec.disconnects.append((time.time(), _code(rc)))

    def on_publish(c: Any, userdata: Any, mid: int, *rest: Any) -> None:
        with rec.lock:
            seq = mids.get(mid)
            if seq is None:
                early.add(mid)
        if seq is not None:
            rec.ack(seq)

    client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
    connect_kw: dict[str, Any] = {}
    if args.mqtt5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if args.clean else 600
        connect_kw = {"clean_start": args.clean, "properties": props}
    _first_connect(client, args, rec, connect_kw)
    client.loop_start()
    try:
        for seq in range(args.count):
            _pace(seq, args.rate, args.started)
            _keep_loop_alive(client)
            rec.published[seq] = time.time()
            info = client.publish(f"sensors/{client_id}/stream", f"{client_id} {seq}", qos=1)
            with rec.lock:
                mids[info.mid] = seq
                acked_early = info.mid in early
            if acked_early:
                rec.ack(seq)
        while not rec.all_acked.wait(min(1.0, max(0.0, args.deadline - time.time()))):
            if time.time() >= args.deadline:
                break
            _keep_loop_alive(client)
    finally:
        client.disconnect()
        client.loop_stop()


def _keep_loop_alive(client: Any) -> None:
    """paho-mqtt 1.6's network thread dies on ssl.SSLEOFError when the server vanishes in the middle of a
    write (a SIGKILLed gateway): a bug of the library, which applications guard against as here, by starting
    the loop again (paho then reconnects and re-sends what it holds)."""
    thread = getattr(client, "_thread", None)
    if thread is not None and not thread.is_alive():
        client._thread = None
        client.loop_start()


def _first_connect(client: Any, args: argparse.Namespace, rec: Record, connect_kw: dict[str, Any]) -> None:
    """paho's connect() is synchronous and raises when the gateway goes away during it (killed in the middle
    of a TLS handshake, not listening yet while it restarts); a sensor written to survive that, as deployed
    ones are, tries again (every second, until its deadline). paho reconnects by itself after that."""
    while True:
        try:
            client.connect(args.host, args.port, 30, **connect_kw)
            return
        except (OSError, ssl.SSLError) as exc:  # ConnectionRefusedError, SSLEOFError, ...
            rec.connect_failures.append((time.time(), repr(exc)))
            if time.time() + 1 > args.deadline:
                raise
            time.sleep(1)


def run_awscrt(args: argparse.Namespace, rec: Record, client_id: str, cert: str, key: str) -> None:
    """The AWS IoT Device SDK v2 (MQTT 3.1.1): its publish() before the connection is up is queued by the
    SDK; its futures say when AWS IoT (here: the gateway) acknowledged."""
    from awscrt import mqtt
    from awsiot import mqtt_connection_builder

    def on_resumed(connection: Any, return_code: Any, session_present: bool, **kw: Any) -> None:
        rec.connacks.append((time.time(), bool(session_present)))

    def on_interrupted(connection: Any, error: Any, **kw: Any) -> None:
        rec.disconnects.append((time.time(), -1))

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=args.host,
        port=args.port,
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=args.ca,
        client_id=client_id,
        clean_session=args.clean,
        keep_alive_secs=30,
        min_reconnect_timeout_secs=1,
        max_reconnect_timeout_secs=2,
        on_connection_resumed=on_resumed,
        on_connection_interrupted=on_interrupted,
    )
    connected = connection.connect()  # not waited for: the first readings are published at once
    try:
        for seq in range(args.count):
            _pace(seq, args.rate, args.started)
            rec.published[seq] = time.time()
            future, _ = connection.publish(
                f"sensors/{client_id}/stream", f"{client_id} {seq}".encode(), mqtt.QoS.AT_LEAST_ONCE
            )
            future.add_done_callback(lambda f, seq=seq: rec.ack(seq) if f.exception() is None else None)
        result = connected.result(max(1.0, args.deadline - time.time()))
        rec.connacks.insert(0, (time.time(), bool(result.get("session_present"))))
        rec.all_acked.wait(max(0.0, args.deadline - time.time()))
    finally:
        connection.disconnect().result(10)


def _pace(seq: int, rate: float, started: float) -> None:
    if rate > 0:
        delay = started + seq / rate - time.time()
        if delay > 0:
            time.sleep(delay)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", help="the client certificate (one client)")
    p.add_argument("--key", help="its key")
    p.add_argument("--client-id", required=True, help="the client id, or with --clients their prefix")
    p.add_argument("--clients", type=int, default=0, help="run this many clients, each in a thread")
    p.add_argument("--cert-dir", help="with --clients: DIR/<client id>.pem and .key")
    p.add_argument("--out", required=True)
    p.add_argument("--library", choices=["paho", "awscrt"], default="paho")
    p.add_argument("--mqtt5", action="store_true")
    p.add_argument("--clean", action="store_true", help="a clean session (default: persistent)")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--rate", type=float, default=0, help="readings per second (0: all at once)")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args(argv)
    if args.clients and not args.cert_dir:
        p.error("--clients needs --cert-dir")
    if not args.clients and not (args.cert and args.key):
        p.error("one client needs --cert and --key")
    args.started = time.time()
    args.deadline = args.started + args.timeout
    run = run_awscrt if args.library == "awscrt" else run_paho
    if not args.clients:
        rec = Record(args.count)
        try:
            run(args, rec, args.client_id, args.cert, args.key)
        finally:
            with rec.lock:
                Path(args.out).write_text(json.dumps(rec.dump()))
        return 0 if rec.all_acked.is_set() else 1
    records = {f"{args.client_id}-{i}": Record(args.count) for i in range(args.clients)}
    threads = [
        threading.Thread(
            target=run,
            args=(args, rec, cid, f"{args.cert_dir}/{cid}.pem", f"{args.cert_dir}/{cid}.key"),
            daemon=True,
        )
        for cid, rec in records.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, args.deadline + 15 - time.time()))  # each ends by its deadline, then disconnects
    out = {}
    for cid, rec in records.items():
        with rec.lock:
            out[cid] = rec.dump()
    Path(args.out).write_text(json.dumps(out))
    return 0 if all(rec.all_acked.is_set() for rec in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
