"""Serial sensors: a tty that udev announces with properties matching a `[[downstream.serial]]` rule is opened
with the rule's line settings; each newline-terminated record it sends is published as the rule's sensor,
through the same policy, spool and quotas as a network sensor's messages.

The tty is read on the event loop (non-blocking, `add_reader`). Reading pauses while the spool asks sensors to
wait (the same flow control as for network sensors); the kernel's tty buffer holds what arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gatewayd.adapters.udev import UdevDevice
from gatewayd.core import jsonsafe, logevents
from gatewayd.core.config import Config, SerialSection

log = logging.getLogger("gatewayd.serial")

READ_SIZE = 4096
DROP_LOG_EVERY = 10.0  # seconds: the first dropped record of a port is logged at once, the rest summed up

_BAUD = {rate: getattr(termios, f"B{rate}") for rate in (1200, 2400, 4800, 9600, 19200, 38400, 57600,
                                                         115200, 230400, 460800, 921600)}  # fmt: skip
_DATA_BITS = {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}

# (sensor client id, common name, topic, payload, qos) -> a reason code >= 0x80 when refused, else None
Publish = Callable[[str, str, str, bytes, int], int | None]
# certificate id -> (its common name, why it is refused now or None)
Identify = Callable[[str], tuple[str, str | None]]


def matches(rule: SerialSection, device: UdevDevice) -> bool:
    return device.subsystem == "tty" and all(device.properties.get(k) == v for k, v in rule.match)


def configure_tty(fd: int, rule: SerialSection) -> None:
    """Raw mode (no echo, no line editing, no translation) with the rule's speed, data bits, parity and stop
    bits; the modem lines are ignored (CLOCAL)."""
    iflag, oflag, cflag, lflag, _ispeed, _ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON | termios.IXOFF)  # fmt: skip
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB | termios.PARODD | termios.CSTOPB)
    cflag |= _DATA_BITS[rule.data_bits] | termios.CREAD | termios.CLOCAL
    if rule.parity != "none":
        cflag |= termios.PARENB | (termios.PARODD if rule.parity == "odd" else 0)
        iflag |= termios.INPCK
    if rule.stop_bits == 2:
        cflag |= termios.CSTOPB
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    speed = _BAUD[rule.baudrate]
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])


def _exclusive(fd: int, path: str) -> None:
    """Nothing else (ModemManager probing a new tty, a stray `screen`) may open the port while it is a
    sensor's; root still can. Not essential: a tty that refuses it is used all the same."""
    try:
        fcntl.ioctl(fd, termios.TIOCEXCL)
    except OSError as exc:
        log.debug("%s cannot be opened exclusively (%s); using it shared", path, exc.strerror)


@dataclass
class Port:
    device: str
    rule: SerialSection
    index: int  # of the rule in downstream.serial
    fd: int
    client_id: str
    topic: str = ""  # the rule's topic for this sensor (${iot:ClientId} expanded)
    common_name: str = ""
    refusal: str | None = None  # why records are dropped now (certificate not ACTIVE), or None
    since: float = field(default_factory=time.time)
    buffer: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an oversized record: skip to the next newline
    bytes_in: int = 0
    records: int = 0
    dropped: int = 0
    unlogged_drops: int = 0
    last_drop_log: float = -DROP_LOG_EVERY
    paused: bool = False

    def __post_init__(self) -> None:
        self.topic = self.rule.topic.replace("${iot:ClientId}", self.client_id)


class SerialSensors:
    def __init__(
        self,
        config: Config,
        publish: Publish,
        identify: Identify,
        room: Callable[[], Awaitable[None]],
        may_read: Callable[[], bool],
    ) -> None:
        self.rules = config.downstream.serial
        self.publish = publish
        self.identify = identify
        self.room = room
        self.may_read = may_read
        self.ports: dict[str, Port] = {}
        self._waiters: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ udev

    def device_event(self, device: UdevDevice) -> None:
        if device.subsystem != "tty" or not device.devname:
            return
        if device.action == "remove":
            port = self.ports.get(device.devname)
            if port is not None:
                self.close(port, "unplugged")
            return
        if device.action not in ("add", "present", "change", "bind") or device.devname in self.ports:
            return
        for index, rule in enumerate(self.rules):
            if matches(rule, device):
                self.open(device.devname, rule, index)
                return
        if device.action == "add":
            log.debug("tty %s matches no [[downstream.serial]] rule; ignored", device.devname)

    # ------------------------------------------------------------------ one port

    def open(self, path: str, rule: SerialSection, index: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.error(
                "cannot open serial sensor %s (downstream.serial[%d]): %s", path, index, exc.strerror,
                extra=logevents.extra(logevents.SERIAL_OPEN_FAILED, device=path, reason=str(exc.strerror)),
            )  # fmt: skip
            return
        try:
            _exclusive(fd, path)
            configure_tty(fd, rule)
            termios.tcflush(fd, termios.TCIFLUSH)  # what was buffered before we owned the port is stale
        except termios.error as exc:
            os.close(fd)
            log.error(
                "cannot configure serial sensor %s (downstream.serial[%d]): %s", path, index, exc,
                extra=logevents.extra(logevents.SERIAL_OPEN_FAILED, device=path, reason=str(exc)),
            )  # fmt: skip
            return
        port = Port(path, rule, index, fd, rule.client_id)
        self._identify(port)
        self.ports[path] = port
        asyncio.get_running_loop().add_reader(fd, self._readable, port)
        log.info(
            "serial sensor %s opened on %s (%d baud, %d%s%d, %s records)", port.client_id or "?", path,
            rule.baudrate, rule.data_bits, rule.parity[0].upper(), rule.stop_bits, rule.format,
            extra=logevents.extra(logevents.SERIAL_OPENED, client_id=port.client_id, device=path),
        )  # fmt: skip

    def _identify(self, port: Port) -> None:
        if not port.rule.certificate_id:
            port.refusal = None
            return
        common_name, refusal = self.identify(port.rule.certificate_id)
        port.client_id, port.common_name = common_name or port.rule.certificate_id, common_name
        if refusal != port.refusal and refusal is not None:
            log.warning(
                "serial sensor on %s: %s; its records are dropped until it is ACTIVE", port.device, refusal,
                extra=logevents.extra(logevents.SENSOR_REFUSED, client_id=port.client_id, reason=refusal,
                                     certificate_id=port.rule.certificate_id),
            )  # fmt: skip
        port.refusal = refusal
        port.topic = port.rule.topic.replace("${iot:ClientId}", port.client_id)

    def enforce_admission(self) -> None:
        """After a registry change: certificates that stopped (or started) being ACTIVE."""
        for port in self.ports.values():
            self._identify(port)

    def close(self, port: Port, why: str) -> None:
        if self.ports.get(port.device) is not port:
            return
        del self.ports[port.device]
        with contextlib.suppress(RuntimeError):  # the loop is closing
            asyncio.get_running_loop().remove_reader(port.fd)
        os.close(port.fd)
        self._log_drops(port, force=True)
        log.info(
            "serial sensor %s on %s closed (%s): %d records published, %d dropped", port.client_id,
            port.device, why, port.records, port.dropped,
            extra=logevents.extra(logevents.SERIAL_CLOSED, client_id=port.client_id, device=port.device,
                                 reason=why),
        )  # fmt: skip

    def close_all(self) -> None:
        for port in list(self.ports.values()):
            self.close(port, "gatewayd is stopping")
        for task in self._waiters:
            task.cancel()

    def _readable(self, port: Port) -> None:
        try:
            data = os.read(port.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENXIO, errno.ENODEV):  # unplugged before udev said so
                self.close(port, "device gone")
                return
            raise
        if not data:
            self.close(port, "end of input")
            return
        port.bytes_in += len(data)
        self._feed(port, data)
        if not self.may_read() and not port.paused:
            self._pause(port)

    def _pause(self, port: Port) -> None:
        """The spool asks sensors to wait: stop reading until it has room (the tty buffers meanwhile)."""
        port.paused = True
        asyncio.get_running_loop().remove_reader(port.fd)

        async def wait() -> None:
            await self.room()
            port.paused = False
            if self.ports.get(port.device) is port:
                asyncio.get_running_loop().add_reader(port.fd, self._readable, port)

        task = asyncio.create_task(wait(), name=f"serial-room-{port.device}")
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    def _feed(self, port: Port, data: bytes) -> None:
        limit = port.rule.max_record_bytes
        while data:
            newline = data.find(b"\n")
            chunk, data = (data, b"") if newline < 0 else (data[:newline], data[newline + 1 :])
            if port.discarding:
                port.discarding = newline < 0
                continue
            port.buffer += chunk
            if len(port.buffer.rstrip(b"\r")) > limit:
                self._drop(port, f"record longer than {limit} bytes")
                port.buffer.clear()
                port.discarding = newline < 0
                continue
            if newline >= 0:
                record = bytes(port.buffer).rstrip(b"\r")
                port.buffer.clear()
                if record.strip():
                    self._record(port, record)

    def _record(self, port: Port, record: bytes) -> None:
        if port.rule.format == "json":
            try:
                jsonsafe.loads(record)
            except ValueError as exc:
                self._drop(port, f"not JSON ({exc})")
                return
        if port.refusal is not None:
            self._drop(port, port.refusal)
            return
        reason = self.publish(port.client_id, port.common_name, port.topic, record, port.rule.qos)
        if reason is not None and reason >= 0x80:
            self._drop(port, f"refused with reason 0x{reason:02x}")
            return
        port.records += 1

    def _drop(self, port: Port, why: str) -> None:
        port.dropped += 1
        port.unlogged_drops += 1
        self._log_drops(port, why=why)

    def _log_drops(self, port: Port, why: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if port.unlogged_drops == 0 or (not force and now - port.last_drop_log < DROP_LOG_EVERY):
            return
        log.warning(
            "serial sensor %s on %s: %d record(s) dropped (last: %s)", port.client_id, port.device,
            port.unlogged_drops, why or "see above",
            extra=logevents.extra(logevents.SERIAL_RECORD_DROPPED, client_id=port.client_id,
                                 device=port.device, reason=why, dropped=port.unlogged_drops),
        )  # fmt: skip
        port.unlogged_drops, port.last_drop_log = 0, now

    # ------------------------------------------------------------------ administration

    def list_connections(self) -> list[dict[str, Any]]:
        return [
            {
                "clientId": p.client_id,
                "transport": "serial",
                "device": p.device,
                "rule": f"downstream.serial[{p.index}]",
                "certificateId": p.rule.certificate_id or None,
                "commonName": p.common_name,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.since)),
                "bytesIn": p.bytes_in,
                "messagesIn": p.records,
                "dropped": p.dropped,
                "admitted": p.refusal is None,
                "paused": p.paused,
            }
            for p in sorted(self.ports.values(), key=lambda p: p.device)
        ]
