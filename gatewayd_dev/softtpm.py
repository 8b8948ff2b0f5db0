"""A software TPM for tests and the demo: swtpm behind tpm2-abrmd on a private D-Bus (PLATFORM.md).

swtpm alone has no resource manager, and a TLS handshake through tpm2-openssl then runs out of object
slots (TPM_RC_OBJECT_MEMORY); tpm2-abrmd in front fixes that, as the kernel's /dev/tpmrm0 does on a Pi.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gatewayd_dev.procs import Proc, free_port, port_open, wait_for

TCTI = "tabrmd:bus_type=session"


class SoftTPM:
    """swtpm + dbus-daemon + tpm2-abrmd, all under `workdir`. Use as a context manager or call stop()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "tpmstate"
        self.bus_path = workdir / "dbus.sock"
        self.port = 0
        self.procs: list[Proc] = []

    @property
    def tcti(self) -> str:
        return TCTI

    def env(self) -> dict[str, str]:
        """Environment for a TPM client (tpm2-tools, tpm2-pytss, tpm2-openssl) to reach this TPM."""
        return {
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.bus_path}",
            "TPM2TOOLS_TCTI": TCTI,
            "TPM2OPENSSL_TCTI": TCTI,
        }

    def start(self) -> SoftTPM:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            self._start_swtpm()
            self._start_dbus()
            self._start_abrmd()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_swtpm(self) -> None:
        # The swtpm TCTI expects the control channel on port+1.
        self.port = free_port(pair=True)
        swtpm = Proc(
            "swtpm",
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            self.workdir / "swtpm.log",
        )
        self.procs.append(swtpm)
        wait_for("swtpm", lambda: port_open(self.port) and port_open(self.port + 1), swtpm)

    def _start_dbus(self) -> None:
        dbus = Proc(
            "dbus-daemon",
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                "--nosyslog",
                f"--address=unix:path={self.bus_path}",
            ],
            self.workdir / "dbus.log",
        )
        self.procs.append(dbus)
        wait_for("private D-Bus", self.bus_path.exists, dbus)

    def _start_abrmd(self) -> None:
        argv = ["tpm2-abrmd", "--session", f"--tcti=swtpm:host=127.0.0.1,port={self.port}"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        env = {**os.environ, **self.env()}
        abrmd = Proc("tpm2-abrmd", argv, self.workdir / "abrmd.log", env=env)
        self.procs.append(abrmd)
        wait_for("tpm2-abrmd", self.answers, abrmd)

    def stop_abrmd(self) -> None:
        """Make the TPM unreachable (as a missing /dev/tpmrm0 would), keeping its state."""
        abrmd = next(p for p in self.procs if p.name == "tpm2-abrmd")
        abrmd.stop()
        self.procs.remove(abrmd)

    def start_abrmd(self) -> None:
        self._start_abrmd()

    def answers(self) -> bool:
        """True when a TPM command through abrmd succeeds."""
        result = subprocess.run(
            ["tpm2_getrandom", "-T", TCTI, "--hex", "4"],
            env={**os.environ, **self.env()},
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> SoftTPM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
