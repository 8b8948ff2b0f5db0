"""Run a real gatewayd as a child process, with a test NOTIFY_SOCKET that records what it tells systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gatewayd_dev import pki
from gatewayd_dev.procs import Proc, free_port
from gatewayd_dev.stack import DevStack


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write a small TOML config from {section: {key: value}} (str, int, float, bool, list; a dict inside an
    array of tables is an inline table)."""

    def fmt(value: Any) -> str:
        match value:
            case bool():
                return "true" if value else "false"
            case int() | float():
                return repr(value)
            case str():
                return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            case list():
                return "[" + ", ".join(fmt(v) for v in value) + "]"
            case dict():  # an inline table
                return "{ " + ", ".join(f"{k} = {fmt(v)}" for k, v in value.items()) + " }"
        raise TypeError(f"cannot write {value!r} as TOML")

    lines: list[str] = []

    def table(section: str, keys: dict[str, Any]) -> None:
        lines.append(f"[{section}]")
        arrays = {k: v for k, v in keys.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        subtables = {k: v for k, v in keys.items() if isinstance(v, dict)}
        plain = {k: v for k, v in keys.items() if k not in arrays and k not in subtables}
        lines.extend(f"{key} = {fmt(value)}" for key, value in plain.items())
        lines.append("")
        for key, items in arrays.items():  # arrays of tables: [[section.key]]
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(f"{k} = {fmt(v)}" for k, v in item.items())
                lines.append("")
        for key, sub in subtables.items():  # nested tables: [section.key]
            table(f"{section}.{key}", sub)

    for section, keys in tables.items():
        table(section, keys)
    path.write_text("\n".join(lines))
    return path


class NotifyListener:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; a thread collects every message at
    once (as systemd does), each stamped with its arrival time in "_t" (monotonic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._seen = 0
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            fields["_t"] = repr(time.monotonic())
            self.messages.append(fields)

    def poll(self) -> list[dict[str, str]]:
        """Messages received since the last poll()."""
        new = self.messages[self._seen :]
        self._seen += len(new)
        return new

    def collect(self, seconds: float) -> None:
        """Wait `seconds` while the collector thread records what arrives."""
        time.sleep(seconds)

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 15.0, after: int = 0
    ) -> dict[str, str]:
        """The first message (index >= after) carrying `key` (= `value` if given)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for msg in self.messages[after:]:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {key}={value or '*'} from the daemon within {timeout} s: {self.messages}"
                )
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Gateway:
    """`gatewayd --config PATH` as a child process, output to `workdir/gatewayd.log`."""

    def __init__(
        self, config: Path, workdir: Path, env: dict[str, str] | None = None, watchdog_usec: int = 0
    ):
        self.config = config
        self.workdir = workdir
        self.notify = NotifyListener(workdir / "notify.sock")
        environ = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
        environ.update(env or {})
        environ["NOTIFY_SOCKET"] = str(self.notify.path)
        environ["PYTHONUNBUFFERED"] = "1"
        if watchdog_usec:
            environ["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = Proc(
            "gatewayd",
            [sys.executable, "-m", "gatewayd.cli.gatewayd", "--config", str(config)],
            workdir / "gatewayd.log",
            env=environ,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> dict[str, str]:
        return self.notify.wait_for("READY", "1", timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.alive():
            self.signal(signal.SIGTERM)
        return self.proc.popen.wait(timeout)

    def stop(self) -> None:
        self.proc.stop()
        self.notify.close()


def loopback_listener(tls: bool = True) -> dict[str, Any]:
    """A sensor listener on 127.0.0.1 and a free port (tests and the demo never listen beyond loopback)."""
    return {"address": "127.0.0.1", "port": free_port(), "tls": tls, "require_client_cert": tls}


def standin_config(
    stack: DevStack, workdir: Path, thing: str, endpoint: str = "rsa", **sections: Any
) -> dict[str, dict[str, Any]]:
    """Config tables for a gatewayd that uses the dev stack's TPM and connects to a stand-in endpoint."""
    ep = stack.standin.endpoint(endpoint)
    mode = "ecc" if endpoint == "ecc" else "rsa"
    tables: dict[str, dict[str, Any]] = {
        "gateway": {
            "thing_name": thing,
            "state_dir": str(workdir / "state"),
            "control_socket": str(workdir / "control.sock"),
        },
        "identity": {"tcti": stack.tpm.tcti},
        "upstream": {
            "endpoint": ep.hostname,
            "port": ep.port,
            "connect_address": "127.0.0.1",
            "validation_mode": mode,
            "system_ca_bundle": str(stack.standin.system_bundle_file),
        },
        "status": {"interval": 5},
        "downstream": {"listener": [loopback_listener()]},
        # the stand-in dates its certificates by this host's clock: here that clock is the reference, whatever
        # NTP says of it (tests of an unsynchronized clock use a flag file, tests/test_clock_daemon.py)
        "time": {"synchronized": "always"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    return tables


def gateway_env(stack: DevStack) -> dict[str, str]:
    """What a gatewayd (or gatewayctl) needs in its environment to use the dev stack."""
    return {**stack.tpm.env(), **stack.standin.gateway_env()}


def gatewayctl(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run gatewayctl --config CONFIG ARGS...; returns its JSON output ({} when it printed nothing, as a
    registry command whose AWS operation returns nothing), raises with its error."""
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gatewayctl {' '.join(args)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout) if result.stdout.strip() else {}


def provision(stack: DevStack, config: Path, days: float = 365, new_key: bool = True) -> dict[str, Any]:
    """Key in the TPM (via gatewayctl), CSR, certificate from the stand-in CA, installed. Returns `show`."""
    env = gateway_env(stack)
    if new_key:
        gatewayctl(config, "identity", "create-key", env=env)
    csr = gatewayctl(config, "identity", "create-csr", env=env)["csrPem"].encode()
    cert = config.parent / f"cert-{time.monotonic_ns()}.pem"
    cert.write_bytes(stack.standin.sign_csr(csr, days))
    result: dict[str, Any] = gatewayctl(config, "identity", "install-certificate", str(cert), env=env)
    return result


def register_ca(config: Path, ca: pki.Issued, active: bool = True, auto_registration: bool = False) -> str:
    """Register a sensor CA with the gateway the way an operator does (get-registration-code, a verification
    certificate with that code as CN signed by the CA's key, register-ca-certificate). Returns its id."""
    code = gatewayctl(config, "get-registration-code")["registrationCode"]
    ca_file = pki.write(config.parent / f"ca-{time.monotonic_ns()}.pem", ca.cert_pem())
    verification = pki.write(
        config.parent / f"verification-{time.monotonic_ns()}.pem", pki.make_client(ca, code).cert_pem()
    )
    flags = ["--set-as-active"] if active else []
    flags += ["--allow-auto-registration"] if auto_registration else []
    args = ["--ca-certificate", f"file://{ca_file}", "--verification-certificate", str(verification)]
    result = gatewayctl(config, "register-ca-certificate", *args, *flags)
    return str(result["certificateId"])
