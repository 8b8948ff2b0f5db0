"""`make bench`: sensors -> gateway -> AWS IoT stand-in -> subscriber, for gatewayd and, in the same run, for
a mosquitto bridge tuned to lose nothing; prints messages/s, latency, lost, duplicated, peak RSS, CPU and
bytes written to storage per message of each, and the ratios. Not part of `make test`; see
docs/performance.md.

Parts: the dev stack (swtpm, the stand-in's mosquitto with its queue limits lifted so the subscriber never
drops), gatewayd (its real uplink: TPM key, mutual TLS), mosquitto as the bridge (software key, mutual TLS).
The load generator and the subscriber are asyncio raw MQTT 3.1.1 clients in this process: every sensor a
TLS connection with its own certificate, QoS 1 with 20 messages in flight (paho's default), payloads of 200
bytes that carry the sensor, a sequence number and the send time. The generator's solo rate (straight into a
plain mosquitto, no forwarding) is printed so it can be seen not to be the bottleneck. The outage run
(--outage) puts each system's uplink behind a proxy (gatewayd_dev/proxy.py) that goes down in the middle of a
load; --rtt puts every run's uplinks behind one that adds that many milliseconds to each round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gatewayd.core.mqtt.codec import encode
from gatewayd.core.mqtt.packets import MQTT_311, Connect, Subscribe, Subscription
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import Gateway, gateway_env, provision, register_ca, standin_config, write_config
from gatewayd_dev.procs import Proc, current_user, free_port, port_open
from gatewayd_dev.proxy import RecordingProxy
from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack

PAYLOAD = 200
WINDOW = 20  # QoS 1 messages in flight per sensor
SETTLE = 3.0  # seconds without a new arrival after which a run is over
OUTAGE_RECONNECT_MAX = 4  # both systems' reconnect backoff cap (s), so an outage's end is seen alike
OUTAGE_GRACE = 30.0  # seconds the outage run's load may run late before the system counts as stalled

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the load generator


def payload(sensor: int, seq: int, sent_ns: int) -> bytes:
    """A JSON reading of exactly PAYLOAD bytes: {"s": sensor, "n": seq, "t": sent_ns, "pad": "xx..."}."""
    head = b'{"s":%d,"n":%d,"t":%d,"pad":"' % (sensor, seq, sent_ns)
    return head + b"x" * (PAYLOAD - len(head) - 2) + b'"}'


def _fields(reading: dict[str, int]) -> tuple[int, int, int]:
    return reading["s"], reading["n"], reading["t"]


def publish_packet(topic: bytes, body: bytes, qos: int, packet_id: int) -> bytes:
    variable = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"")
    length = len(variable) + len(body)
    out = bytearray([0x30 | (qos << 1)])
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes(out) + variable + body


@dataclass
class SensorConn:
    index: int
    client_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    inflight: set[int] = field(default_factory=set)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    acked: int = 0
    next_id: int = 0

    async def read_acks(self) -> None:
        """PUBACKs (3.1.1: exactly 4 bytes, 0x40 0x02 id)."""
        buf = b""
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            buf += data
            usable = len(buf) - len(buf) % 4
            for i in range(0, usable, 4):
                if buf[i] == 0x40:
                    self.inflight.discard((buf[i + 2] << 8) | buf[i + 3])
                    self.acked += 1
            buf = buf[usable:]
            self.room.set()

    async def send(self, topic: bytes, seq: int, qos: int) -> None:
        while qos and len(self.inflight) >= WINDOW:
            self.room.clear()
            await self.room.wait()
        self.next_id = self.next_id % 65535 + 1
        if qos:
            self.inflight.add(self.next_id)
        self.writer.write(publish_packet(topic, payload(self.index, seq, time.time_ns()), qos, self.next_id))
        if self.writer.transport.get_write_buffer_size() > 1 << 20:
            await self.writer.drain()


async def connect_sensor(
    index: int, client_id: str, port: int, ctx: ssl.SSLContext | None
) -> tuple[SensorConn, asyncio.Task[None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(encode(Connect(client_id, MQTT_311, keepalive=600), MQTT_311))
    connack = await reader.readexactly(4)
    if connack[3] != 0:
        raise RuntimeError(f"{client_id}: CONNACK {connack[3]}")
    conn = SensorConn(index, client_id, reader, writer)
    return conn, asyncio.create_task(conn.read_acks())


@dataclass
class Fleet:
    conns: list[SensorConn]
    tasks: list[asyncio.Task[None]]
    topics: list[bytes]
    sent: int = 0  # open_loop's progress, for a run cut short

    async def closed_loop(self, per_sensor: int, qos: int) -> float:
        """Every sensor publishes `per_sensor` messages as fast as its window allows; returns seconds."""
        start = time.monotonic()

        async def one(c: SensorConn, topic: bytes) -> None:
            for seq in range(per_sensor):
                await c.send(topic, seq, qos)
            await c.writer.drain()
            if qos:
                while c.inflight:
                    c.room.clear()
                    await c.room.wait()

        await asyncio.gather(*(one(c, t) for c, t in zip(self.conns, self.topics, strict=True)))
        return time.monotonic() - start

    async def open_loop(self, rate: float, seconds: float, qos: int, first_seq: int) -> int:
        """`rate` messages/s in all, round robin over the sensors, for `seconds`; returns how many."""
        total = int(rate * seconds)
        start = time.monotonic()
        for n in range(total):
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            c = self.conns[n % len(self.conns)]
            seq = first_seq + n // len(self.conns)
            await c.send(self.topics[c.index], seq, qos)  # with a full window: late, never skipped
            self.sent = n + 1
        for c in self.conns:
            await c.writer.drain()
        return total

    async def close(self) -> None:
        for c in self.conns:
            c.writer.write(b"\xe0\x00")  # DISCONNECT
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.writer.drain(), 1.0)  # bounded: a stalled broker reads nothing
            c.writer.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def fleet(n: int, port: int, ctx_for: Callable[[int], ssl.SSLContext | None], prefix: str) -> Fleet:
    conns, tasks = [], []
    for start in range(0, n, 50):  # connect 50 at a time
        made = await asyncio.gather(
            *(connect_sensor(i, f"bench-{i:05d}", port, ctx_for(i)) for i in range(start, min(n, start + 50)))
        )
        for c, t in made:
            conns.append(c)
            tasks.append(t)
    return Fleet(conns, tasks, [f"{prefix}sensors/bench-{i:05d}/b".encode() for i in range(n)])


# ---------------------------------------------------------------------------- the subscriber


@dataclass
class Arrival:
    at_ns: int
    topic: bytes
    body: bytes


class Subscriber:
    """At the stand-in's back office (plain MQTT): records every PUBLISH with its arrival time."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self, port: int, filters: list[str]) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(encode(Connect(f"bench-sub-{os.getpid()}", MQTT_311, keepalive=600), MQTT_311))
        await self.reader.readexactly(4)
        subs = tuple(Subscription(f, 0) for f in filters)
        self.writer.write(encode(Subscribe(1, subs), MQTT_311))
        await self.reader.readexactly(4 + len(filters))  # SUBACK: header, packet id, one code each
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        buf = bytearray()
        while True:
            data = await self.reader.read(1 << 20)
            if not data:
                return
            now = time.time_ns()
            buf += data
            pos = 0
            while True:
                if len(buf) - pos < 2:
                    break
                first = buf[pos]
                length, mult, i = 0, 1, pos + 1
                while i < len(buf):
                    byte = buf[i]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not byte & 0x80:
                        break
                else:
                    break
                if len(buf) - i < length:
                    break
                if first >> 4 == 3:
                    tlen = (buf[i] << 8) | buf[i + 1]
                    body_at = i + 2 + tlen + (2 if (first >> 1) & 3 else 0)
                    topic = bytes(buf[i + 2 : i + 2 + tlen])
                    self.arrivals.append(Arrival(now, topic, bytes(buf[body_at : i + length])))
                pos = i + length
            del buf[:pos]

    async def settle(self, expected: int, timeout: float) -> None:
        """Until `expected` arrived, or nothing new for SETTLE seconds, or `timeout`."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.arrivals)
            if n >= expected:
                await asyncio.sleep(0.5)  # late duplicates
                return
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > SETTLE:
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.writer.close()


# ---------------------------------------------------------------------------- figures


@dataclass
class Figures:
    rate: float = 0.0  # messages per second, first send to last arrival
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    lost: int = 0
    duplicated: int = 0
    rss_mb: float = 0.0
    cpu_us: float = 0.0  # CPU time of the system under test (all its processes) per message delivered
    written: float = -1.0  # bytes it wrote to storage (/proc/PID/io write_bytes) per message delivered


def readings(arrivals: list[Arrival]) -> list[tuple[int, int, int, int]]:
    """(sensor, seq, sent_ns, arrival_ns) of every reading; batch messages carry many."""
    out = []
    for a in arrivals:
        doc = json.loads(a.body)
        for reading in (item["payload"] for item in doc["batch"]) if "batch" in doc else [doc]:
            out.append((*_fields(reading), a.at_ns))
    return out


def figures(arrivals: list[Arrival], expected: set[tuple[int, int]], started_ns: int) -> Figures:
    got = readings(arrivals)
    keys = [(s, q) for s, q, _, _ in got]
    unique = set(keys)
    lat = sorted((at - sent) / 1e6 for _, _, sent, at in got)
    last = max((at for *_, at in got), default=started_ns)
    return Figures(
        rate=len(unique & expected) / max((last - started_ns) / 1e9, 1e-9),
        p50_ms=statistics.median(lat) if lat else 0.0,
        p99_ms=lat[int(len(lat) * 0.99) - 1] if lat else 0.0,
        lost=len(expected - unique),
        duplicated=len(keys) - len(unique),
    )


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far (clock ticks of /proc/PID/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def written_bytes(pids: list[int]) -> int:
    """Bytes the processes caused to be written to storage so far (write_bytes of /proc/PID/io, counted when
    a page is dirtied, so a buffered write counts at once; a tmpfs counts nothing: the work directory is on
    the disk). Logs count too: the daemon's stdout is a file here, as the journal is on a gateway."""
    return _proc_sum(pids, "io", "write_bytes:")


def peak_rss_mb(pids: list[int]) -> float:
    return _proc_sum(pids, "status", "VmHWM:") / 1024  # kB


def _proc_sum(pids: list[int], name: str, key: str) -> int:
    """The sum over the processes of the number after `key` in /proc/PID/NAME (a process gone counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
    return total


# ---------------------------------------------------------------------------- the systems under test


@dataclass
class System:
    name: str
    port: int  # the sensors' listener
    prefix: str  # what the upstream topic starts with
    pids: Callable[[], list[int]]
    ctx_for: Callable[[int], ssl.SSLContext]
    stop: Callable[[], object]
    upstream_filter: str
    spilled: Callable[[], int] = lambda: 0  # readings written to storage so far (gatewayd's status)


class Certs:
    """One sensor CA and N sensor certificates, written once and reused by both systems."""

    def __init__(self, workdir: Path, n: int) -> None:
        self.dir = workdir / "sensors"
        self.dir.mkdir(exist_ok=True)
        self.ca = pki.make_root("Bench Sensor CA", "ecc")
        self.ca_file = pki.write(self.dir / "ca.pem", self.ca.cert_pem())
        self.files: list[tuple[Path, Path]] = []
        self.extend(n)

    def extend(self, n: int) -> None:
        for i in range(len(self.files), n):
            issued = pki.make_client(self.ca, f"bench-{i:05d}")
            cert = pki.write(self.dir / f"{i}.pem", issued.cert_pem())
            key = pki.write(self.dir / f"{i}.key", issued.key_pem(), 0o600)
            self.files.append((cert, key))

    def contexts(self, server_ca: Path) -> Callable[[int], ssl.SSLContext]:
        def ctx(i: int) -> ssl.SSLContext:
            c = ssl.create_default_context(cafile=str(server_ca))
            c.load_cert_chain(*map(str, self.files[i]))
            return c

        return ctx


def start_gatewayd(
    stack: DevStack,
    workdir: Path,
    certs: Certs,
    quota: bool,
    batch: bool,
    via: int | None = None,
    name: str = "",
) -> System:
    """gatewayd as in production; `via`: the port of a proxy in front of the stand-in's endpoint."""
    wd = workdir / (name or ("gw-quota" if quota else "gw"))
    wd.mkdir()
    thing = "bench-gw"
    tables = standin_config(stack, wd, thing, downstream={"auto_activate": True, "max_connections": 2000})
    if via is not None:  # the same endpoint name and certificate, reached through the proxy
        tables["upstream"]["port"] = via
    tables["upstream"]["reconnect_max_delay"] = OUTAGE_RECONNECT_MAX
    tables["downstream"]["policy"] = {"publish": ["sensors/${iot:ClientId}/#"]}
    tables["logging"] = {"level": "warning"}
    tables["status"] = {"interval": 0}
    if not quota:  # the stand-in has no quota: nothing to shape for (max_inflight stays AWS's 100)
        tables["upstream"]["quota"] = {"publishes_per_second": 1_000_000, "bytes_per_second": 1 << 30}
    if batch:
        tables["forwarding"] = {"batch": [{"topic": "sensors/+/b", "max_delay": "2s"}]}
    config = write_config(wd / "g.toml", tables)
    provision(stack, config)
    register_ca(config, certs.ca, auto_registration=True)
    gw = Gateway(config, wd, env={**gateway_env(stack), "PYTHONPATH": str(REPO)})
    gw.wait_ready(30)
    sock = wd / "control.sock"
    wait_until(lambda: request(sock, "status", None)["uplink"]["state"] == "connected", 30, "the uplink")

    def pids() -> list[int]:
        child = request(sock, "status", None)["uplink"]["uplinkPid"]
        return [gw.pid, *([child] if child else [])]

    return System(
        "gatewayd",
        int(tables["downstream"]["listener"][0]["port"]),
        f"{thing}/",
        pids,
        certs.contexts(wd / "state" / "localca" / "ca.pem"),
        gw.stop,
        f"{thing}/sensors/#",
        lambda: int(request(sock, "status", None)["spool"]["spilled"]),
    )


def listener_files(wd: Path, ca_name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 for a mosquitto listener: (CA file, cert, key)."""
    server_ca = pki.make_root(ca_name, "ecc")
    server = pki.make_server(server_ca, ["localhost"], "ecc", ips=["127.0.0.1"])
    ca_file = pki.write(wd / "listener-ca.pem", server_ca.cert_pem())
    cert = pki.write(wd / "server.pem", server.cert_pem())
    return ca_file, cert, pki.write(wd / "server.key", server.key_pem(), 0o600)


def start_bridge(
    stack: DevStack, workdir: Path, certs: Certs, name: str = "bridge", via: int | None = None
) -> System:
    """The tuned mosquitto bridge; `via`: the port of a proxy in front of the stand-in's endpoint."""
    wd = workdir / name
    wd.mkdir()
    ca_file, cert, key = listener_files(wd, "Bench Bridge Listener CA")
    client = stack.standin.client_files(f"bench-{name}")
    ep = stack.standin.endpoint("rsa")
    port = free_port()
    conf = wd / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                "persistence false",
                f"user {current_user()}",
                "allow_anonymous true",
                "max_inflight_messages 100",  # tuned as the issue measured: 100 in flight
                "max_queued_messages 0",  # and no queue limit, so it loses nothing
                f"listener {port} 127.0.0.1",
                f"cafile {certs.ca_file}",
                f"certfile {cert}",
                f"keyfile {key}",
                "require_certificate true",
                "use_identity_as_username true",
                "connection aws",
                f"address 127.0.0.1:{via or ep.port}",
                f"restart_timeout 1 {OUTAGE_RECONNECT_MAX}",  # reconnect backoff capped as gatewayd's
                f"bridge_cafile {stack.standin.system_bundle_file}",
                f"bridge_certfile {client.cert}",
                f"bridge_keyfile {client.key}",
                "bridge_insecure true",  # the endpoint name is not 127.0.0.1 (gatewayd: connect_address)
                f"remote_clientid bench-{name}",
                "try_private false",
                "cleansession true",
                "bridge_protocol_version mqttv311",
                f'topic sensors/# out 1 "" bench-{name}/',
                "",
            ]
        )
    )
    proc = Proc("mosquitto-bridge", ["mosquitto", "-c", str(conf)], wd / "mosquitto.log")
    wait_until(lambda: port_open(port), 10, "the bridge's listener")
    time.sleep(1.0)  # the bridge connects
    return System(
        "bridge", port, f"bench-{name}/", lambda: [proc.pid], certs.contexts(ca_file), proc.stop,
        f"bench-{name}/sensors/#",
    )  # fmt: skip


# ---------------------------------------------------------------------------- runs


async def throughput(system: System, stack: DevStack, n: int, per_sensor: int, qos: int) -> Figures:
    sub = Subscriber()
    await sub.start(stack.standin.observer_port, [system.upstream_filter])
    f = await fleet(n, system.port, system.ctx_for, "")
    try:
        started, cpu, written = time.time_ns(), cpu_seconds(system.pids()), written_bytes(system.pids())
        await f.closed_loop(per_sensor, qos)
        await sub.settle(n * per_sensor, 120)
        used = cpu_seconds(system.pids()) - cpu
        expected = {(i, s) for i in range(n) for s in range(per_sensor)}
        result = figures(sub.arrivals, expected, started)
        delivered = max(len(expected) - result.lost, 1)
        result.cpu_us = used / delivered * 1e6
        result.written = (written_bytes(system.pids()) - written) / delivered
        return result
    finally:
        await f.close()
        await sub.stop()


async def latency(system: System, stack: DevStack, n: int, rate: float, seconds: float) -> Figures:
    sub = Subscriber()
    await sub.start(stack.standin.observer_port, [system.upstream_filter])
    f = await fleet(n, system.port, system.ctx_for, "")
    try:
        started, written = time.time_ns(), written_bytes(system.pids())
        total = await f.open_loop(rate, seconds, 1, 0)
        await sub.settle(total, 120)
        expected = {(i % n, i // n) for i in range(total)}
        result = figures(sub.arrivals, expected, started)
        result.written = (written_bytes(system.pids()) - written) / max(total - result.lost, 1)
        return result
    finally:
        await f.close()
        await sub.stop()


async def quota_run(
    system: System, stack: DevStack, n: int, rate: float, seconds: float, quota: int
) -> tuple[float, int, int, float]:
    """Readings per second AWS IoT would take when it allows `quota` publishes per second on the connection:
    in every second, only the first `quota` publishes that arrive count (AWS throttles the rest). Also the
    publishes, those within the quota, and the bytes written to storage per reading sent."""
    sub = Subscriber()
    await sub.start(stack.standin.observer_port, [system.upstream_filter, "$aws/rules/#"])
    f = await fleet(n, system.port, system.ctx_for, "")
    try:
        started, written = time.time_ns(), written_bytes(system.pids())
        total = await f.open_loop(rate, seconds, 1, 0)
        await sub.settle(total, 60)
        per_reading = (written_bytes(system.pids()) - written) / max(total, 1)
        per_second: dict[int, int] = {}
        accepted: list[Arrival] = []
        for a in sub.arrivals:
            sec = (a.at_ns - started) // 1_000_000_000
            per_second[sec] = per_second.get(sec, 0) + 1
            if per_second[sec] <= quota:
                accepted.append(a)
        got = {(s, q) for s, q, _, _ in readings(accepted)}
        last = max((a.at_ns for a in accepted), default=started)
        return len(got) / max((last - started) / 1e9, 1e-9), len(sub.arrivals), len(accepted), per_reading
    finally:
        await f.close()
        await sub.stop()


@dataclass
class Outage:
    lost: int
    duplicated: int
    caught_up_s: float  # from the last reading sent to the last one's arrival
    written: float  # bytes written to storage per reading sent
    stalled: str = ""  # why the run was cut short: the system stopped acknowledging its sensors
    spilled: int = 0  # readings the system wrote to storage (gatewayd: its spool's count)
    written_total: int = 0  # bytes written to storage in the run


async def outage_run(
    system: System, stack: DevStack, proxy: RecordingProxy, n: int, rate: float, outage: float
) -> Outage:
    """`rate` readings/s (QoS 1) for 3 x `outage` seconds; in the middle third the uplink is down (the proxy
    in front of the stand-in drops the connection and refuses new ones). Every reading must arrive."""
    sub = Subscriber()
    await sub.start(stack.standin.observer_port, [system.upstream_filter])
    f = await fleet(n, system.port, system.ctx_for, "")
    try:
        written, spilled = written_bytes(system.pids()), system.spilled()
        load = asyncio.create_task(f.open_loop(rate, 3 * outage, 1, 0))
        await asyncio.sleep(outage)
        proxy.forward = False
        proxy.cut()
        await asyncio.sleep(outage)
        proxy.forward = True
        stalled = ""
        try:  # bounded: a system that stops acknowledging would hold the sensors' windows for ever
            total = await asyncio.wait_for(load, outage + OUTAGE_GRACE)
        except TimeoutError:
            total = f.sent
            stalled = f"stopped acknowledging its sensors: {total} of {int(rate * 3 * outage)} readings sent"
        sent_ns = time.time_ns()
        await sub.settle(total, 5 if stalled else 120)
        expected = {(i % n, i // n) for i in range(total)}
        result = figures(sub.arrivals, expected, sent_ns)
        last = max((a.at_ns for a in sub.arrivals), default=sent_ns)
        return Outage(
            result.lost,
            result.duplicated,
            max(0.0, (last - sent_ns) / 1e9),
            (written_bytes(system.pids()) - written) / max(total, 1),
            stalled,
            system.spilled() - spilled,
            written_bytes(system.pids()) - written,
        )
    finally:
        await f.close()
        await sub.stop()


async def solo_rate(stack: DevStack, workdir: Path, certs: Certs, n: int, per_sensor: int) -> float:
    """The generator alone: into a plain mosquitto with the same TLS listener, no forwarding, QoS 1."""
    wd = workdir / "solo"
    wd.mkdir()
    ca_file, cert, key = listener_files(wd, "Bench Solo CA")
    port = free_port()
    (wd / "m.conf").write_text(
        f"persistence false\nuser {current_user()}\nallow_anonymous true\nmax_inflight_messages 0\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {certs.ca_file}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n"
    )
    proc = Proc("mosquitto-solo", ["mosquitto", "-c", str(wd / "m.conf")], wd / "m.log")
    try:
        wait_until(lambda: port_open(port), 10, "the solo broker")
        f = await fleet(n, port, certs.contexts(ca_file), "")
        try:
            seconds = await f.closed_loop(per_sensor, 1)
        finally:
            await f.close()
        return n * per_sensor / seconds
    finally:
        proc.stop()


def _median(runs: list[Figures]) -> Figures:
    return Figures(
        rate=statistics.median(r.rate for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        lost=max(r.lost for r in runs),
        duplicated=max(r.duplicated for r in runs),
        rss_mb=max(r.rss_mb for r in runs),
        cpu_us=statistics.median(r.cpu_us for r in runs),
        written=statistics.median(r.written for r in runs),
    )


def _line(label: str, g: Figures, b: Figures) -> str:
    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y else "n/a"

    def cpu(f: Figures) -> str:
        return (f"  CPU {f.cpu_us:>4.0f} us/msg" if f.cpu_us else "") + (
            f"  disk {f.written:>7.0f} B/msg" if f.written >= 0 else ""
        )

    return (
        f"{label:<30} gatewayd {g.rate:>8.0f} msg/s  p50 {g.p50_ms:>7.1f} ms  p99 {g.p99_ms:>7.1f} ms  "
        f"lost {g.lost:>5}  dup {g.duplicated:>4}  RSS {g.rss_mb:>5.0f} MB{cpu(g)}\n"
        f"{'':<30} bridge   {b.rate:>8.0f} msg/s  p50 {b.p50_ms:>7.1f} ms  p99 {b.p99_ms:>7.1f} ms  "
        f"lost {b.lost:>5}  dup {b.duplicated:>4}  RSS {b.rss_mb:>5.0f} MB{cpu(b)}\n"
        f"{'':<30} gatewayd/bridge: rate {ratio(g.rate, b.rate)}, p50 {ratio(g.p50_ms, b.p50_ms)}, "
        f"p99 {ratio(g.p99_ms, b.p99_ms)}, RSS {ratio(g.rss_mb, b.rss_mb)}"
        + (f", CPU per message {ratio(g.cpu_us, b.cpu_us)}" if g.cpu_us and b.cpu_us else "")
        + (
            f"\n{'':<30} storage written at 100 readings/s: gatewayd {per_day(g.written)}, "
            f"bridge {per_day(b.written)} a day"
            if g.written >= 0 and b.written >= 0
            else ""
        )
    )


def per_day(bytes_per_reading: float, readings_per_second: int = 100) -> str:
    """What `bytes_per_reading` comes to in a day at `readings_per_second`, in the largest fitting unit."""
    total = bytes_per_reading * readings_per_second * 86400
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if total >= size:
            return f"{total / size:.1f} {unit}"
    return f"{total:.0f} B"


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gatewayd-bench-"))
    sizes = [args.sensors, *([1000] if args.large and args.sensors != 1000 else [])]
    print(f"gatewayd benchmark: {os.cpu_count()} CPUs, sensors {sizes}, {args.messages} messages per sensor, "
          f"{PAYLOAD}-byte payloads, {WINDOW} in flight per sensor, medians of {args.repeat}; "
          f"work dir {workdir}", flush=True)  # fmt: skip
    tuning = ("max_queued_messages 0", "max_inflight_messages 0", "max_queued_bytes 0")
    with DevStack(workdir / "stack", tuning=tuning) as stack:
        endpoint_port = stack.standin.endpoint("rsa").port
        delay = args.rtt / 2000  # seconds each way
        rtt_proxy = RecordingProxy(endpoint_port, delay=delay) if args.rtt else None
        via = rtt_proxy.port if rtt_proxy is not None else None
        if args.rtt:
            print(f"uplinks of both systems through a proxy adding {args.rtt:.0f} ms to each round trip")
        certs = Certs(workdir, max(sizes))
        solo = await solo_rate(stack, workdir, certs, args.sensors, args.messages)
        print(f"load generator solo rate (QoS 1 into plain mosquitto, {args.sensors} sensors): "
              f"{solo:.0f} msg/s", flush=True)  # fmt: skip
        results: dict[str, dict[str, Figures]] = {"gatewayd": {}, "bridge": {}}
        for name in ("gatewayd", "bridge"):
            system = (
                start_gatewayd(stack, workdir, certs, quota=False, batch=False, via=via)
                if name == "gatewayd"
                else start_bridge(stack, workdir, certs, via=via)
            )
            try:
                for n in sizes:
                    for qos in (0, 1):
                        runs = []
                        for _ in range(args.repeat):
                            runs.append(await throughput(system, stack, n, args.messages, qos))
                        results[name][f"{n} sensors, QoS {qos}"] = _median(runs)
                        print(f"  {name}: {n} sensors QoS {qos}: {_median(runs).rate:.0f} msg/s", flush=True)
                runs = [await latency(system, stack, args.sensors, args.rate, args.seconds)]
                results[name][f"open loop {args.rate:.0f} msg/s, QoS 1"] = _median(runs)
                rss = peak_rss_mb(system.pids())
                for fig in results[name].values():
                    fig.rss_mb = rss
            finally:
                system.stop()
        print()
        for label in results["gatewayd"]:
            print(_line(label, results["gatewayd"][label], results["bridge"][label]))
        print(f"\nquota run: AWS IoT allows {args.quota} publishes/s per connection; {args.sensors} sensors "
              f"send {args.rate:.0f} readings/s for {args.seconds:.0f} s", flush=True)  # fmt: skip
        gq = start_gatewayd(stack, workdir, certs, quota=True, batch=True, via=via)
        try:
            g_rate, g_pub, g_ok, g_disk = await quota_run(
                gq, stack, args.sensors, args.rate, args.seconds, args.quota
            )
        finally:
            gq.stop()
        bridge = start_bridge(stack, workdir, certs, "bridge-quota", via=via)
        try:
            b_rate, b_pub, b_ok, b_disk = await quota_run(
                bridge, stack, args.sensors, args.rate, args.seconds, args.quota
            )
        finally:
            bridge.stop()
        print(
            f"  gatewayd (batching, shaped): {g_rate:>8.0f} readings/s delivered ({g_pub} publishes, "
            f"{g_pub - g_ok} over the quota), disk {g_disk:.0f} B/reading"
        )
        print(
            f"  bridge:                      {b_rate:>8.0f} readings/s delivered ({b_pub} publishes, "
            f"{b_pub - b_ok} over the quota: AWS would throttle them), disk {b_disk:.0f} B/reading"
        )
        print(f"  gatewayd/bridge: {g_rate / b_rate if b_rate else float('inf'):.1f}x")
        if args.outage:
            await outage_runs(stack, workdir, certs, args, endpoint_port, delay)
        if rtt_proxy is not None:
            rtt_proxy.close()
    return 0


async def outage_runs(
    stack: DevStack, workdir: Path, certs: Certs, args: argparse.Namespace, endpoint_port: int, delay: float
) -> None:
    """Each system with its uplink through a proxy of its own that goes down for `args.outage` seconds."""
    print(
        f"\nuplink outage: {args.sensors} sensors send {args.outage_rate:.0f} readings/s (QoS 1) for "
        f"{3 * args.outage:.0f} s; the uplink is down for the middle {args.outage:.0f} s", flush=True
    )  # fmt: skip
    for name in ("gatewayd", "bridge"):
        proxy = RecordingProxy(endpoint_port, delay=delay)
        system = (
            start_gatewayd(stack, workdir, certs, quota=False, batch=False, via=proxy.port, name="gw-outage")
            if name == "gatewayd"
            else start_bridge(stack, workdir, certs, "bridge-outage", via=proxy.port)
        )
        try:
            o = await outage_run(system, stack, proxy, args.sensors, args.outage_rate, args.outage)
        finally:
            system.stop()
            proxy.close()
        print(
            f"  {name:<9} lost {o.lost:>5}  dup {o.duplicated:>4}  caught up {o.caught_up_s:5.1f} s after "
            f"the last reading was sent  disk {o.written:>7.0f} B/reading "
            f"({per_day(o.written)} a day at 100 readings/s)"
            + (
                f"\n            {o.spilled} readings spilled to storage: "
                f"{o.written_total / o.spilled:.0f} bytes written per spilled reading"
                if o.spilled
                else ""
            )
            + (f"\n            STALLED: {o.stalled}" if o.stalled else ""),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    global WINDOW  # read by SensorConn.send
    p = argparse.ArgumentParser(prog="python -m gatewayd_dev.bench", description=__doc__.split("\n")[0])
    p.add_argument("--sensors", type=int, default=100)
    p.add_argument("--large", action="store_true", help="also run the throughput runs with 1000 sensors")
    p.add_argument("--messages", type=int, default=200, help="per sensor, per throughput run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rate", type=float, default=2000.0, help="open-loop rate, messages per second")
    p.add_argument("--seconds", type=float, default=10.0, help="open-loop duration")
    p.add_argument("--quota", type=int, default=100, help="publishes per second AWS IoT allows")
    p.add_argument(
        "--rtt", type=float, default=0.0, help="ms added to every uplink round trip (both systems), e.g. 200"
    )
    p.add_argument(
        "--outage", type=float, default=10.0, help="seconds of uplink outage in the outage run (0: none)"
    )
    p.add_argument("--outage-rate", type=float, default=500.0, help="readings per second in the outage run")
    p.add_argument(
        "--window", type=int, default=20,
        help="QoS 1 messages each sensor keeps in flight (1: many embedded clients)",
    )  # fmt: skip
    args = p.parse_args(argv)
    WINDOW = max(1, args.window)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
