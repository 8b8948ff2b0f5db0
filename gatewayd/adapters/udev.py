"""udev through pyudev: the devices present now, and the events that follow, delivered on the event loop.

pyudev's monitor is a netlink socket; it is read by the asyncio loop (`add_reader`), never by a thread, so
handlers run on the loop like everything else. Devices are handed over as plain `UdevDevice` records (the
action, subsystem, sysfs name and the udev properties), so nothing beyond this module imports pyudev.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gatewayd.core.errors import UdevUnavailable

log = logging.getLogger("gatewayd.udev")


@dataclass(frozen=True)
class UdevDevice:
    action: str  # "add", "remove", "change", "bind", ...; "present" for devices listed at start
    subsystem: str
    sys_name: str
    sys_path: str
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def devname(self) -> str:
        return self.properties.get("DEVNAME", "")


def _record(device: Any, action: str) -> UdevDevice:
    props = {str(k): str(v) for k, v in device.properties.items()}
    return UdevDevice(action, str(device.subsystem or ""), str(device.sys_name), str(device.sys_path), props)


class UdevMonitor:
    """Subscribes to `subsystems`; `start()` calls `handler(device)` for every event from then on."""

    def __init__(self, subsystems: Iterable[str], handler: Callable[[UdevDevice], None]) -> None:
        self.subsystems = tuple(subsystems)
        self.handler = handler
        self._monitor: Any = None
        self._context: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        try:
            import pyudev

            self._context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(self._context)
            for subsystem in self.subsystems:
                monitor.filter_by(subsystem)
            monitor.start()
        except (ImportError, OSError, ValueError) as exc:
            raise UdevUnavailable(str(exc)) from exc
        self._monitor = monitor
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(monitor.fileno(), self._readable)

    def present(self, subsystem: str) -> list[UdevDevice]:
        """The devices of `subsystem` udev knows now (call after start(), so none is missed in between)."""
        if self._context is None:
            return []
        return [_record(d, "present") for d in self._context.list_devices(subsystem=subsystem)]

    def _readable(self) -> None:
        for _ in range(64):  # a burst is read in slices; the loop comes back for the rest
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: the kernel dropped events; the next ones still come
                log.warning("udev monitor: %s", exc)
                continue
            if device is None:
                return
            try:
                self.handler(_record(device, str(device.action or "change")))
            except Exception:
                log.exception("handling the udev event for %s failed", device.sys_path)

    def close(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        self._monitor = None
