"""Run inside a private mount namespace (`unshare --mount --propagation private`, as root):
a standalone systemd-journald on tmpfs, a real gatewayd under it (INVOCATION_ID set, as systemd would),
then the journal as JSON lines on stdout. Nothing outside the namespace sees any of it.

Usage: journal_ns.py WORKDIR GOOD_CONFIG BAD_CONFIG
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gatewayd_dev.gateway import Gateway
from gatewayd_dev.procs import Proc, wait_for


def mount_tmpfs(path: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)


def main() -> int:
    workdir, good, bad = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    mount_tmpfs("/run")  # hides the host's /run from this namespace only
    os.makedirs("/run/systemd/journal")
    os.makedirs("/run/log/journal")
    if os.path.isdir("/var/log/journal"):
        mount_tmpfs("/var/log/journal")  # never write into the host's persistent journal
    journald = Proc("systemd-journald", ["/lib/systemd/systemd-journald"], workdir / "journald.log")
    try:
        wait_for("journald socket", lambda: os.path.exists("/run/systemd/journal/socket"), journald)
        env = {"INVOCATION_ID": "0123456789abcdef0123456789abcdef"}

        gw = Gateway(good, workdir / "good", env=env)
        gw.wait_ready()
        mark = len(gw.notify.messages)
        gw.signal(signal.SIGHUP)
        reloading = gw.notify.wait_for("RELOADING", "1", after=mark)
        gw.notify.wait_for("READY", "1", after=gw.notify.messages.index(reloading))
        assert gw.terminate() == 0
        gw.stop()

        bad_gw = Gateway(bad, workdir / "bad", env=env)
        assert bad_gw.proc.popen.wait(15) == 78
        bad_gw.stop()

        time.sleep(0.3)  # let journald write the last entries
        out = subprocess.run(
            [
                "journalctl",
                "-D",
                "/run/log/journal",
                "-o",
                "json",
                "--no-pager",
                "SYSLOG_IDENTIFIER=gatewayd",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        sys.stdout.write(out.stdout)
    finally:
        journald.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
