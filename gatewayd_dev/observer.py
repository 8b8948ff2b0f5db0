"""mosquitto_sub at the AWS IoT stand-in's back office: records every message that reaches the stand-in."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from gatewayd_dev.sensor import wait_until
from gatewayd_dev.stack import DevStack


class Observer:
    def __init__(
        self, stack: DevStack, topic: str, out: Path, qos: int = 1, session: str = "", stamped: bool = False
    ) -> None:
        """session: a client id for a persistent session (with a persistent stand-in, nothing is missed
        while the stand-in restarts); stamped: each line starts with the arrival time (Unix seconds)."""
        self.out = out
        self.sink = out.open("w")
        port = str(stack.standin.observer_port)
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", topic, "-q", str(qos)]
        argv += ["-i", session, "-c"] if session else []
        argv += ["-F", "%U %t %p"] if stamped else ["-v"]
        self.proc = subprocess.Popen(argv, stdout=self.sink)
        time.sleep(0.3)  # subscribed before anything is published

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait(self, count: int = 1, timeout: float = 15) -> list[str]:
        wait_until(lambda: len(self.lines()) >= count, timeout, f"{count} messages at the stand-in")
        return self.lines()

    def stop(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(5)
        self.sink.close()
        return self.lines()
