"""`make demo`: the dev stack plus a gatewayd on a generated config, its log streamed, Ctrl-C to stop.

Options: --workdir DIR (kept afterwards; default a temp dir removed at exit), --duration S (stop by itself),
--rollback (the stand-in refuses the first renewed certificate once it is live, so the gateway rolls back).

The gateway's certificate lives 4 minutes and renews at half its life (a new TPM key, a CSR, a certificate
from the stand-in CA by a `command` issuer, a trial connection, the switch-over), while the sensors publish.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from cryptography import x509

from gatewayd.core.errors import GatewaydError
from gatewayd.service.control import request
from gatewayd_dev import pki
from gatewayd_dev.gateway import (
    Gateway,
    gateway_env,
    gatewayctl,
    provision,
    register_ca,
    standin_config,
    write_config,
)
from gatewayd_dev.procs import Proc, pid_alive
from gatewayd_dev.sensors_sim import TELEMETRY, VALVE
from gatewayd_dev.stack import DevStack

THING = "demo-gateway"
CERT_MINUTES = 4.0  # the gateway's certificates live this long in the demo, and renew at half-life


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep everything in this directory (kept afterwards)")
    parser.add_argument("--duration", type=float, default=0, help="stop by itself after this many seconds")
    parser.add_argument(
        "--cert-minutes", type=float, default=CERT_MINUTES, help="lifetime of the gateway's certificates"
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="make the first renewed certificate fail once live: a rollback",
    )
    args = parser.parse_args(argv)

    stop_requested = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gatewayd-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"gatewayd demo: working in {workdir}")
    stack = DevStack(workdir / "stack")
    gateway: Gateway | None = None
    watcher: Proc | None = None
    sim: Proc | None = None
    tail: LogTail | None = None
    pids: dict[str, int] = {}
    try:
        stack.start()
        pids.update(stack.pids())
        sensor_ca = pki.make_root("Demo Sensor CA", "ecc")
        certs = workdir / "sensor-certs"
        certs.mkdir(exist_ok=True)
        for cid in [name for name, _ in TELEMETRY] + [VALVE]:
            issued = pki.make_client(sensor_ca, cid)
            pki.write(certs / f"{cid}.pem", issued.cert_pem())
            pki.write(certs / f"{cid}.key", issued.key_pem(), 0o600)
        tables = standin_config(stack, workdir, THING, "rsa", status={"interval": 5})
        tables["renewal"] = {
            "issuer": "command",
            "command": stack.standin.issue_command("--minutes", str(args.cert_minutes)),
            "renew_before": "50%",
            "retry_interval": "30s",
            "retry_max": "2m",
            "trial_timeout": "20s",
            "rollback_window": "20s",
        }
        listener_port = tables["downstream"]["listener"][0]["port"]
        config = write_config(workdir / "gatewayd.toml", tables)
        _say("Provisioning: key generated inside the software TPM, CSR signed by it, certificate from the")
        _say("stand-in CA, installed (gatewayctl identity create-key / create-csr / install-certificate) ...")
        shown = provision(stack, config, days=args.cert_minutes / 1440)
        _say(f"  certificate {shown['certificateId']}")
        _say(f"  subject {shown['subject']}, valid until {shown['notAfter']}")
        _say(f"  {shown['keyType']} key inside the TPM under the storage key at {shown['tpmParent']}")
        watcher = Proc(
            "mosquitto_sub",
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(stack.standin.observer_port), "-t", "#", "-v"],
            workdir / "standin-traffic.log",
        )
        pids["mosquitto_sub"] = watcher.pid
        traffic = LogTail(watcher.log_path, prefix="[at the stand-in] ")
        env = gateway_env(stack)
        if args.rollback:  # pause each renewal once promoted, so the demo can make the cloud refuse it
            env |= {"GATEWAYD_DEBUG_COMMANDS": "1", "GATEWAYD_DEBUG_RENEWAL_HOLD": "promoted"}
        gateway = Gateway(config, workdir, env=env)
        pids["gatewayd"] = gateway.pid
        tail = LogTail(gateway.proc.log_path)
        (workdir / "demo.json").write_text(json.dumps({"pids": pids}))
        ready = gateway.wait_ready()
        _say("Registry: the sensors' CA registered with proof of possession (get-registration-code,")
        _say("register-ca-certificate), then each sensor's certificate (register-certificate) ...")
        ca_id = register_ca(config, sensor_ca)
        for pem_file in sorted(certs.glob("*.pem")):
            registered = gatewayctl(
                config,
                "register-certificate",
                "--certificate-pem",
                f"file://{pem_file}",
                "--status",
                "ACTIVE",
            )
            _say(f"  {pem_file.stem}: certificate {registered['certificateId'][:16]}... ACTIVE")
        _say(f"  CA {ca_id[:16]}... ACTIVE; `gatewayctl list-certificates` shows them")
        sim = Proc(
            "sensors",
            [sys.executable, "-m", "gatewayd_dev.sensors_sim", str(listener_port),
             str(workdir / "state" / "localca" / "ca.pem"), str(certs)],
            workdir / "sensors.log",
        )  # fmt: skip
        pids["sensors"] = sim.pid
        (workdir / "demo.json").write_text(json.dumps({"pids": pids}))
        sensors_tail = LogTail(sim.log_path, prefix="[sensors] ")
        _banner(stack, workdir, config, pids, ready.get("STATUS", ""), listener_port)
        cloud = CloudCommands(stack.standin.observer_port)
        renewals = RenewalWatch(stack, workdir, args.rollback)

        def tick() -> None:
            cloud.tick()
            renewals.tick()

        _stream(gateway, [tail, sensors_tail, traffic], lambda: stop_requested, args.duration, tick)
        _say("\ngatewayd demo: stopping ...")
    finally:
        status = gateway.terminate() if gateway is not None else None
        if sim is not None:
            sim.stop()
        if gateway is not None:
            gateway.stop()
        if watcher is not None:
            watcher.stop()
        stack.stop()
        if tail is not None:
            tail.flush()  # the daemon's last lines (its clean shutdown)
        left = [f"{name}={pid}" for name, pid in pids.items() if pid_alive(pid)]
        _say(
            f"gatewayd exited with status {status}; "
            + (f"STILL RUNNING: {left}" if left else "no process left")
        )
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _banner(
    stack: DevStack, workdir: Path, config: Path, pids: dict[str, int], status: str, port: int
) -> None:
    rsa, ecc = stack.standin.endpoint("rsa"), stack.standin.endpoint("ecc")
    venv_bin = Path(sys.executable).parent
    _say(
        f"""
Running (every process is ended by its PID on Ctrl-C):
  software TPM   swtpm pid {pids["swtpm"]} on 127.0.0.1:{stack.tpm.port},
                 behind tpm2-abrmd pid {pids["tpm2-abrmd"]}
                 on a private D-Bus (pid {pids["dbus-daemon"]}); TCTI {stack.tpm.tcti}
  AWS IoT stand-in  mosquitto pid {pids["mosquitto"]}, endpoint {rsa.hostname}
                 RSA-rooted mutual TLS on 127.0.0.1:{rsa.port}, ECC-rooted on 127.0.0.1:{ecc.port},
                 observer (plain, loopback only) on 127.0.0.1:{stack.standin.observer_port}
  gatewayd       pid {pids["gatewayd"]}, config {config}
                 its uplink: mutual TLS with the TPM-held key, in a child process
                 systemd status: {status}
  sensors        pid {pids["sensors"]}: three paho sensors (3.1.1 and 5.0) publishing readings, and {VALVE}
                 obeying commands, over mutual TLS to the gateway's listener on 127.0.0.1:{port}
  mosquitto_sub  pid {pids["mosquitto_sub"]}, printing what reaches the stand-in ("[at the stand-in]")

Where to look:
  {venv_bin}/gatewayctl --socket {workdir / "control.sock"} status
  {venv_bin}/gatewayctl --socket {workdir / "control.sock"} identity show
  {venv_bin}/gatewayctl --socket {workdir / "control.sock"} list-connections
  {venv_bin}/gatewayd check-config --config {config}
  TPM: env {" ".join(f"{k}={v}" for k, v in stack.tpm.env().items())} tpm2_getcap properties-fixed

gatewayd log follows; Ctrl-C stops everything.
"""
    )


class LogTail:
    """Prints what a log file gained since the last call (whole lines, with an optional prefix)."""

    def __init__(self, path: Path, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix
        self.offset = 0

    def flush(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        data = data[: data.rfind(b"\n") + 1]  # whole lines only
        self.offset += len(data)
        if data:
            lines = data.decode(errors="replace").splitlines()
            sys.stdout.write("".join(f"{self.prefix}{line}\n" for line in lines))
            sys.stdout.flush()


class RenewalWatch:
    """Says when the gateway's certificate will be renewed, and with --rollback makes the stand-in refuse the
    first renewed certificate once it is live (as AWS IoT would refuse a deactivated one): a rollback."""

    def __init__(self, stack: DevStack, workdir: Path, rollback: bool) -> None:
        self.stack, self.workdir, self.rollback = stack, workdir, rollback
        self.next = time.monotonic() + 2
        self.announced: str | None = None
        self.forced = False

    def tick(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + 1
        try:
            renewal = request(self.workdir / "control.sock", "status", timeout=5)["uplink"]["renewal"]
        except GatewaydError:
            return
        if renewal["nextRenewal"] != self.announced and renewal["step"] == "IDLE":
            self.announced = renewal["nextRenewal"]
            _say(f"[demo] next renewal of the gateway's certificate at {self.announced}")
        if renewal.get("heldAt") == "promoted":
            if not self.forced:
                self.forced = True
                live = x509.load_pem_x509_certificate(
                    (self.workdir / "state" / "identity" / "live" / "cert.pem").read_bytes()
                )
                _say(
                    "[demo] --rollback: the stand-in now refuses the renewed certificate (as if deactivated)"
                )
                self.stack.standin.set_status(live, "INACTIVE")
            request(self.workdir / "control.sock", "debug-renewal-release", timeout=5)


class CloudCommands:
    """Plays the cloud side: every 10 s a command for the valve, published at the stand-in."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.next = time.monotonic() + 5
        self.open = False

    def tick(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + 10
        self.open = not self.open
        state = "open" if self.open else "closed"
        topic = f"{THING}/commands/{VALVE}/set"
        _say(f"[cloud] publishing {topic} {state!r} at the stand-in")
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-q", "1", "-t", topic, "-m", state],
            check=False, timeout=10,
        )  # fmt: skip


def _stream(
    gateway: Gateway,
    tails: list[LogTail],
    stop: Callable[[], bool],
    duration: float,
    tick: Callable[[], None],
) -> None:
    deadline = time.monotonic() + duration if duration > 0 else None
    while not stop():
        tick()
        for tail in tails:
            tail.flush()
        for msg in gateway.notify.poll():
            if "STATUS" in msg:
                _say(f"[sd_notify] STATUS={msg['STATUS']}")
        if not gateway.proc.alive():
            _say(f"gatewayd exited unexpectedly with status {gateway.proc.popen.returncode}")
            return
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(0.2)
    for tail in tails:
        tail.flush()


if __name__ == "__main__":
    sys.exit(main())
