"""The dev stack: a software TPM and the AWS IoT Core stand-in, together, in one temp dir."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gatewayd_dev.softtpm import SoftTPM
from gatewayd_dev.standin import StandIn


class DevStack:
    def __init__(
        self, workdir: Path | None = None, persistent: bool = False, tuning: tuple[str, ...] = ()
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gatewayd-dev-"))
        self.tpm = SoftTPM(self.workdir / "tpm")
        self.standin = StandIn(self.workdir / "standin", persistent=persistent, tuning=tuning)

    def start(self) -> DevStack:
        try:
            self.tpm.start()
            self.standin.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.standin.stop()
        finally:
            self.tpm.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> dict[str, int]:
        procs = [*self.tpm.procs, *([self.standin.proc] if self.standin.proc else [])]
        return {p.name: p.pid for p in procs}

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
