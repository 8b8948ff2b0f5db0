"""A Debian virtual machine (qemu-system, software emulation) for system tests that a container cannot run:
Debian 13's systemd (257) cannot set up a service's namespaces under qemu-user (units fail with 226/NAMESPACE,
journald with 243/CREDENTIALS), so trixie/arm64 boots as a whole machine with its own kernel.

The image is the cached debootstrap root file system plus Debian's kernel, python3 and a small command agent
on a virtio serial port (the host's only way in: no network login). It has its own network (qemu's user
mode, which also forwards the guest's connections to HOST_ADDRESS to the host's loopback, where the stand-in
listens) and its own software TPM service, like the containers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatewayd_dev.nspawn import (
    ContainerError,
    Machine,
    cached_tree,
    copy_rootfs,
    ensure_rootfs,
    nspawn_run,
    prepare_services,
)

HOST_ADDRESS = "10.0.2.2"  # qemu user-mode networking: the host's 127.0.0.1 as the guest sees it
SWTPM_PORT = 2321  # inside the guest's own network
VM_FORMAT = "1"
QEMU = {"arm64": ["qemu-system-aarch64", "-M", "virt", "-cpu", "max"]}
CONSOLE = {"arm64": "ttyAMA0"}

AGENT = r'''#!/usr/bin/python3
"""gatewayd system test agent: runs the host's commands (JSON lines on a virtio serial port)."""
import json, os, subprocess, time

PORT = "/dev/virtio-ports/gwsys.agent"
while not os.path.exists(PORT):
    time.sleep(0.5)
fd = os.open(PORT, os.O_RDWR)
buf = b""
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        time.sleep(0.1)  # no host connected
        continue
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        try:
            r = subprocess.run(req["argv"], input=req.get("input"), capture_output=True, text=True,
                               env=req["env"], timeout=req["timeout"], cwd="/")
            resp = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
        except subprocess.TimeoutExpired:
            resp = {"rc": 124, "stdout": "", "stderr": "timed out after %s s" % req["timeout"]}
        except OSError as exc:
            resp = {"rc": 127, "stdout": "", "stderr": str(exc)}
        resp["id"] = req["id"]
        data = (json.dumps(resp) + "\n").encode()
        while data:
            data = data[os.write(fd, data):]
'''

AGENT_UNIT = """\
[Unit]
Description=gatewayd system test agent (virtio serial)

[Service]
ExecStart=/usr/local/sbin/gwsys-agent
Restart=always

[Install]
WantedBy=multi-user.target
"""

NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"


def _enable(root: Path, unit: str, target: str = "multi-user.target") -> None:
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / Path(unit).name
    if not link.exists():
        link.symlink_to(unit)


def ensure_vm_root(release: str, arch: str, log: Path) -> Path:
    """The cached root file system of the virtual machine (the container one plus kernel, python3, network
    and the agent), built when missing (about 5-10 minutes for arm64)."""
    base = ensure_rootfs(release, arch, log)

    def build(tmp: Path) -> None:
        copy_rootfs(base, tmp)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                   f"linux-image-{arch}", "python3", "systemd-resolved"]  # fmt: skip
        nspawn_run(tmp, ["apt-get", "update", "-qq"], 600, log)
        nspawn_run(tmp, install, 1800, log)
        nspawn_run(tmp, ["apt-get", "clean"], 120, log)
        (tmp / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
        (tmp / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (tmp / "etc/systemd/network/10-systest.network").write_text(NETWORK)
        _enable(tmp, "/usr/lib/systemd/system/systemd-networkd.service")
        _enable(tmp, "/usr/lib/systemd/system/systemd-resolved.service")
        agent = tmp / "usr/local/sbin/gwsys-agent"
        agent.write_text(AGENT)
        agent.chmod(0o755)
        (tmp / "etc/systemd/system/gwsys-agent.service").write_text(AGENT_UNIT)
        _enable(tmp, "/etc/systemd/system/gwsys-agent.service")
        prepare_services(tmp, SWTPM_PORT)
        (tmp / "etc/machine-id").write_text("")

    recipe = f"{VM_FORMAT} {(base / '.gatewayd-systest').read_text()}"
    return cached_tree(f"{release}-{arch}-vm", recipe, build, stamp=".gatewayd-systest-vm")


class VirtualMachine(Machine):
    """A booted qemu-system guest on a fresh disk image of the cached root file system."""

    def __init__(self, root: Path, arch: str, name: str, workdir: Path, log: Path) -> None:
        self.root = root
        self.arch = arch
        self.name = name
        self.workdir = workdir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self._id = 0

    def _image(self) -> Path:
        agent = self.root / "usr/local/sbin/gwsys-agent"
        if agent.read_text() != AGENT:  # the agent is the host's counterpart: always this version
            agent.write_text(AGENT)
        image = self.workdir / "disk.raw"
        image.unlink(missing_ok=True)
        cmd = ["mkfs.ext4", "-q", "-F", "-L", "gwsystest", "-d", str(self.root), str(image), "6G"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if out.returncode != 0:
            raise ContainerError(f"mkfs.ext4 -d failed: {out.stderr.strip()}")
        return image

    def boot(self, timeout: float = 600) -> VirtualMachine:
        boot = self.root / "boot"
        kernel = sorted(boot.glob("vmlinuz-*"))[-1]
        initrd = sorted(boot.glob("initrd.img-*"))[-1]
        agent = self.workdir / "agent.sock"
        agent.unlink(missing_ok=True)
        argv = [*QEMU[self.arch], "-smp", "2", "-m", "3072", "-nographic", "-no-reboot",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"root=/dev/vda rw console={CONSOLE[self.arch]} systemd.log_color=0",
                "-drive", f"if=virtio,format=raw,file={self._image()}",
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={agent},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=gwsys.agent"]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.sock is None:
            if self.proc.poll() is not None:
                raise ContainerError(f"qemu exited {self.proc.returncode} while booting; see {self.log}")
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: no agent socket after {timeout} s")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(agent))
                self.sock = s
            except OSError:
                time.sleep(1)
        self.wait_booted(deadline, timeout, pause=2)
        return self

    def _execute(
        self, argv: Sequence[str], timeout: float, env: dict[str, str], input: str | None
    ) -> subprocess.CompletedProcess[str]:
        """Through the agent in the guest."""
        if self.sock is None:
            raise ContainerError("not booted")
        self._id += 1
        request = {"id": self._id, "argv": list(argv), "env": env, "input": input, "timeout": timeout}
        self.sock.sendall((json.dumps(request) + "\n").encode())
        self.sock.settimeout(timeout + 30)
        answer: dict[str, Any] = {}
        try:
            while answer.get("id") != self._id:  # a late answer to an earlier request (while booting): skip
                while b"\n" not in self._buf:
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:
                        raise ContainerError(f"{self.name}: the agent went away")
                    self._buf += chunk
                line, self._buf = self._buf.split(b"\n", 1)
                answer = json.loads(line)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: no answer to {' '.join(argv)} in {timeout + 30} s") from None
        return subprocess.CompletedProcess(list(argv), answer["rc"], answer["stdout"], answer["stderr"])

    def poweroff(self, timeout: float = 120) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.sock is not None:
            try:
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=30)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, TimeoutError, ContainerError, OSError):
                with self.log.open("a") as f:
                    f.write(
                        f"\n[systest] {self.name} did not power off in {timeout} s: killing qemu by PID\n"
                    )
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.proc = None
        (self.workdir / "disk.raw").unlink(missing_ok=True)
