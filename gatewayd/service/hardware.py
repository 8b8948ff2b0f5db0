"""Hardware events: gatewayd reacts to udev and rtnetlink instead of polling.

- The TPM (identity.tpm_device): absent at start, the uplink waits ("waiting for TPM") while sensors are
  served and spooled; udev's "add" lets it connect at once; "remove" stops the uplink cleanly.
- The network: an interface added or removed (udev), a link going up or down, an address added or removed
  (rtnetlink) make the uplink try again at once, and re-issue the listener's certificate when the addresses
  changed. Events within NETWORK_SETTLE seconds are handled together.
- Serial sensors: ttys are handed to gatewayd.service.downstream.serial.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from gatewayd.adapters import netlink
from gatewayd.adapters.udev import UdevDevice, UdevMonitor
from gatewayd.core import logevents
from gatewayd.core.config import Config
from gatewayd.core.errors import UdevUnavailable

log = logging.getLogger("gatewayd.hardware")

NETWORK_SETTLE = 0.1  # seconds: a DHCP lease or a link coming up is a burst of events; act once
TPM_SUBSYSTEMS = ("tpmrm", "tpm")


def tpm_device(config: Config) -> str:
    """The device node to watch: identity.tpm_device, where "auto" is the path of a device: TCTI."""
    setting = config.identity.tpm_device
    if setting != "auto":
        return setting
    if config.identity.key_backend != "tpm":
        return ""
    tcti = config.identity.tcti
    if tcti == "device" or tcti.startswith("device:"):
        path = tcti.partition(":")[2].split(",")[0]
        return path or "/dev/tpmrm0"
    return ""  # abrmd, swtpm, mssim: no device node of ours to watch


def _devnames(device: UdevDevice) -> set[str]:
    name = device.devname
    return {name, name if name.startswith("/") else f"/dev/{name}"} if name else set()


class Hardware:
    def __init__(
        self,
        config: Config,
        tpm_changed: Callable[[bool], None],
        network_changed: Callable[[list[str] | None, str], None],
    ) -> None:
        self.tpm_path = tpm_device(config)
        self.tpm_changed = tpm_changed
        self.network_changed = network_changed
        self.tty_event: Callable[[UdevDevice], None] | None = None
        self.watch_ttys = bool(config.downstream.serial)
        self.udev: UdevMonitor | None = None
        self.routes: netlink.RouteMonitor | None = None
        self._udev_tpm = False  # udev lists or announced the TPM device
        self._pending: list[str] = []
        self._settle: asyncio.TimerHandle | None = None
        self._last_change: dict[str, Any] | None = None  # when, what, the addresses then

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Hardware:
        subsystems = [*TPM_SUBSYSTEMS, "net"] + (["tty"] if self.watch_ttys else [])
        udev = UdevMonitor(subsystems, self._on_udev)
        try:
            udev.start()
            self.udev = udev
        except UdevUnavailable as exc:
            log.warning(
                "udev events unavailable (%s): no hotplug for the TPM or serial sensors", exc,
                extra=logevents.extra(logevents.HARDWARE_EVENTS_UNAVAILABLE, reason=f"udev: {exc}"),
            )  # fmt: skip
        routes = netlink.RouteMonitor(self._on_route)
        try:
            routes.start()
            self.routes = routes
        except OSError as exc:
            log.warning(
                "rtnetlink events unavailable (%s): the uplink reconnects on its backoff only", exc,
                extra=logevents.extra(logevents.HARDWARE_EVENTS_UNAVAILABLE, reason=f"rtnetlink: {exc}"),
            )  # fmt: skip
        if self.udev is not None and self.tpm_path:
            self._udev_tpm = any(
                self.tpm_path in _devnames(d) for s in TPM_SUBSYSTEMS for d in self.udev.present(s)
            )
        if self.tpm_path:
            present = self.tpm_present()
            log.info("TPM device %s: %s", self.tpm_path, "present" if present else "absent; waiting for udev")
        return self

    def attach_serial(self, handler: Callable[[UdevDevice], None]) -> None:
        """From now on ttys go to `handler`, starting with those present (udev's database lists every tty
        plugged in before, including during start-up, when their events had no handler yet)."""
        self.tty_event = handler
        if self.udev is not None:
            for device in self.udev.present("tty"):
                handler(device)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._settle is not None:
            self._settle.cancel()
        if self.udev is not None:
            self.udev.close()
        if self.routes is not None:
            self.routes.close()

    def summary(self) -> dict[str, Any]:
        """For `gatewayctl status`: what is watched and what is known now."""
        return {
            "udevEvents": self.udev is not None,
            "netlinkEvents": self.routes is not None,
            "tpmDevice": self.tpm_path or None,
            "tpmPresent": self.tpm_present() if self.tpm_path else None,
            "lastNetworkChange": self._last_change,
        }

    # ------------------------------------------------------------------ the TPM

    def tpm_absent(self) -> str | None:
        """Why the uplink must wait for the TPM, or None (present, or no device to watch)."""
        if not self.tpm_path or self.tpm_present():
            return None
        return f"{self.tpm_path} is not present"

    def tpm_present(self) -> bool:
        """udev announced it, or its node exists (udev's database may not list a node a container was
        given: the node alone must never lock the gateway out)."""
        return bool(self._udev_tpm) or os.path.exists(self.tpm_path)

    def _on_tpm(self, device: UdevDevice) -> None:
        if self.tpm_path not in _devnames(device):
            return
        before = self.tpm_present()
        if device.action == "remove":
            self._udev_tpm = False
        elif device.action in ("add", "change", "bind"):
            self._udev_tpm = True
        after = self.tpm_present()
        if after == before:
            return
        if after:
            log.info(
                "TPM device %s appeared", self.tpm_path,
                extra=logevents.extra(logevents.TPM_ARRIVED, device=self.tpm_path),
            )  # fmt: skip
        else:
            log.warning(
                "TPM device %s was removed: stopping the uplink until it returns", self.tpm_path,
                extra=logevents.extra(logevents.TPM_REMOVED, device=self.tpm_path),
            )  # fmt: skip
        self.tpm_changed(after)

    # ------------------------------------------------------------------ events

    def _on_udev(self, device: UdevDevice) -> None:
        if device.subsystem in TPM_SUBSYSTEMS:
            self._on_tpm(device)
        elif device.subsystem == "net":
            if device.action in ("add", "remove", "move"):
                self._network(f"interface {device.sys_name} {device.action}")
        elif device.subsystem == "tty" and self.tty_event is not None:
            self.tty_event(device)

    def _on_route(self, what: str) -> None:
        self._network({"link": "link state", "address": "address", "overflow": "events lost"}[what])

    def _network(self, what: str) -> None:
        if what not in self._pending:
            self._pending.append(what)
        if self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(NETWORK_SETTLE, self._network_settled)

    def _network_settled(self) -> None:
        self._settle = None
        reasons, self._pending = self._pending, []
        found: list[str] | None
        try:
            found = netlink.addresses()
        except OSError as exc:  # unknown is not "none": nothing is judged gone on this
            log.warning("cannot list the host's addresses: %s", exc)
            found = None
        reason = ", ".join(reasons)
        self._last_change = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
            "addresses": found,
        }
        shown = "unknown" if found is None else " ".join(found) or "none"
        log.info(
            "network changed (%s); addresses now %s", reason, shown,
            extra=logevents.extra(logevents.NETWORK_CHANGED, reason=reason, addresses=",".join(found or [])),
        )  # fmt: skip
        self.network_changed(found, reason)
