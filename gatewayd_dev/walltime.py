"""A wall clock that tests can move under a live daemon (and its child processes): walltime.c, built with the
system's C compiler and preloaded. Only CLOCK_REALTIME moves; monotonic clocks and sleeps stay real, as on a
Raspberry Pi whose stale clock NTP sets with one jump."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("walltime.c")


class WallClock:
    def __init__(self, workdir: Path, offset: float = 0.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.library = workdir / "walltime.so"
        subprocess.run(
            [
                "gcc",
                "-shared",
                "-fPIC",
                "-O2",
                "-Wall",
                "-Werror",
                "-o",
                str(self.library),
                str(SOURCE),
                "-ldl",
            ],
            check=True,
            capture_output=True,
        )
        self.file = workdir / "walltime-offset"
        self.set(offset)

    def set(self, offset: float) -> None:
        """The wall clock of every process started with env() is now `offset` seconds off the real one."""
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{offset}\n")
        os.replace(tmp, self.file)  # a new inode: the preloaded library reads it again at its next call

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "GATEWAYD_WALLTIME_FILE": str(self.file)}
