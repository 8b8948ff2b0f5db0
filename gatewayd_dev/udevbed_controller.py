"""Runs under `umockdev-wrapper /usr/bin/python3` (Debian's python, for the GObject binding): owns a umockdev
testbed and changes it on request. One JSON request per stdin line, one JSON reply per stdout line.
Started and driven by gatewayd_dev.udevbed; not imported by anything.
"""

import json
import sys

import gi  # type: ignore[import-not-found]  # Debian python3-gi; not in the venv

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # type: ignore[import-not-found]  # noqa: E402


def flat(table: dict[str, str]) -> list[str]:
    return [item for pair in table.items() for item in pair]


def main() -> int:
    bed = UMockdev.Testbed.new()
    print(json.dumps({"root": bed.get_root_dir(), "sys": bed.get_sys_dir()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            match req["op"]:
                case "add":  # add_device() also sends the "add" uevent
                    path = bed.add_device(
                        req["subsystem"], req["name"], req.get("parent"), flat(req.get("attrs", {})),
                        flat(req.get("props", {})),
                    )  # fmt: skip
                    reply = {"syspath": path}
                case "uevent":
                    bed.uevent(req["syspath"], req["action"])
                    reply = {}
                case "remove":  # as the kernel does: the "remove" uevent, then the device is gone
                    bed.uevent(req["syspath"], "remove")
                    bed.remove_device(req["syspath"])
                    reply = {}
                case other:
                    reply = {"error": f"unknown op {other!r}"}
        except Exception as exc:  # the reply carries it to the test
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
