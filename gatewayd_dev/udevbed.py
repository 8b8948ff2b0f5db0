"""A umockdev testbed for tests: mocked sysfs devices whose udev events reach pyudev in a process started
with `env()` in its environment (umockdev's preload library redirects libudev's netlink socket and /sys).

The testbed lives in a controller process (gatewayd_dev/udevbed_controller.py) run by Debian's python3,
which has the GObject binding; the tests and the daemon under test can use any python.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

CONTROLLER = Path(__file__).with_name("udevbed_controller.py")
SYSTEM_PYTHON = "/usr/bin/python3"
PRELOAD = "libumockdev-preload.so.0"


class UdevBedError(RuntimeError):
    pass


class UdevBed:
    def __init__(self) -> None:
        wrapper = shutil.which("umockdev-wrapper")
        if wrapper is None:
            raise UdevBedError("umockdev-wrapper is missing: `make deps` installs umockdev")
        self.proc = subprocess.Popen(
            [wrapper, SYSTEM_PYTHON, str(CONTROLLER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._reply()
        self.root = Path(first["root"])

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise UdevBedError(f"the umockdev controller ended (exit {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise UdevBedError(reply["error"])
        return reply

    def _call(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def env(self) -> dict[str, str]:
        """For the process under test: it sees the testbed's devices and events instead of the host's."""
        return {"UMOCKDEV_DIR": str(self.root), "LD_PRELOAD": PRELOAD}

    def add(
        self,
        subsystem: str,
        name: str,
        props: dict[str, str] | None = None,
        attrs: dict[str, str] | None = None,
        parent: str | None = None,
    ) -> str:
        """Add a device (udev sends "add"); returns its sysfs path."""
        reply = self._call(
            op="add", subsystem=subsystem, name=name, parent=parent, props=props or {}, attrs=attrs or {}
        )
        return str(reply["syspath"])

    def uevent(self, syspath: str, action: str) -> None:
        self._call(op="uevent", syspath=syspath, action=action)

    def remove(self, syspath: str) -> None:
        """udev sends "remove", then the device is gone from sysfs."""
        self._call(op="remove", syspath=syspath)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
