"""Booted Debian containers for the package's system tests: debootstrap root file systems (cached) and
systemd-nspawn boots, driven from the host with nsenter (there is no machined on the host, see PLATFORM.md).

Every root file system is built once per release and architecture under the cache directory
(GATEWAYD_SYSTEST_CACHE, default /var/cache/gatewayd-systest) and copied for each test run, so a run
starts from a clean Debian. Downloaded .debs are kept in the cache too. Every wait is bounded; containers
are powered off from inside and, failing that, killed by PID.
"""

from __future__ import annotations

import base64
import fcntl
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

# Services the tests run inside the container (a software TPM behind the resource manager), besides what
# debootstrap's minbase has. gatewayd's own dependencies are NOT here: apt resolves them from the .deb.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "swtpm", "swtpm-tools", "tpm2-abrmd", "libtss2-tcti-tabrmd0",
)  # fmt: skip
CACHE_FORMAT = "1"  # bump when the recipe changes: cached trees of another format are rebuilt

DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

# A plain environment for commands run in the container (nothing of the host's venv or pyenv).
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
}


class ContainerError(RuntimeError):
    pass


def host_arch() -> str:
    return DEBIAN_ARCH.get(platform.machine(), platform.machine())


def cache_dir() -> Path:
    return Path(os.environ.get("GATEWAYD_SYSTEST_CACHE", "/var/cache/gatewayd-systest"))


def _run(argv: Sequence[str], timeout: float, log: Path | None = None) -> None:
    """Run a host command; on failure raise with the end of its output."""
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}\n")
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        raise ContainerError(f"{' '.join(argv[:4])} ... exited {out.returncode}:\n" + "\n".join(tail))


def ensure_binfmt(arch: str) -> None:
    """Foreign root file systems run under qemu-user: register its binfmt handler (PLATFORM.md)."""
    if arch == host_arch():
        return
    qemu = {"arm64": "aarch64"}[arch]
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], 30)
    if (misc / f"qemu-{qemu}").exists():
        return
    conf = Path(f"/usr/lib/binfmt.d/qemu-{qemu}.conf")
    if not conf.exists():
        raise ContainerError(f"{conf} is missing: install qemu-user-static (make test-arm64 does)")
    lines = [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    (misc / "register").write_text(lines[0])


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_tree(
    name: str, recipe: str, build: Callable[[Path], None], stamp: str = ".gatewayd-systest"
) -> Path:
    """cache_dir()/NAME, made by BUILD (into a temporary directory, renamed when done) when it is missing or
    was made by another RECIPE (recorded in its STAMP file). Concurrent runs wait for each other."""
    tree = cache_dir() / name
    with locked(cache_dir() / f".{name}.lock"):
        if (tree / stamp).exists() and (tree / stamp).read_text() == recipe:
            return tree
        tmp = tree.with_name(name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        build(tmp)
        (tmp / stamp).write_text(recipe)
        tmp.rename(tree)
        return tree


def ensure_rootfs(release: str, arch: str, log: Path) -> Path:
    """The cached root file system of Debian RELEASE for ARCH, built when missing (about 1-2 minutes on
    x86_64, 4-6 minutes for arm64 under qemu)."""
    ensure_binfmt(arch)

    def build(tmp: Path) -> None:
        # debootstrap's default mirror; the host's apt configuration is not copied in.
        _run(
            ["debootstrap", "--variant=minbase", f"--arch={arch}", "--include=systemd,systemd-sysv,dbus",
             release, str(tmp)],
            1200,
            log,
        )  # fmt: skip
        nspawn_run(tmp, ["apt-get", "update", "-qq"], 600, log)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *BASE_PACKAGES]
        nspawn_run(tmp, install, 1200, log)
        nspawn_run(tmp, ["apt-get", "clean"], 120, log)
        (tmp / "etc" / "machine-id").write_text("")  # each copy gets its own at first boot

    return cached_tree(f"{release}-{arch}", f"{CACHE_FORMAT} {' '.join(BASE_PACKAGES)}\n", build)


def nspawn_run(root: Path, argv: Sequence[str], timeout: float, log: Path) -> None:
    """A command in the root file system, not booted (for building the cache)."""
    env = [f"--setenv={k}={v}" for k, v in CONTAINER_ENV.items()]
    nspawn = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(root)]
    _run([*nspawn, *env, *argv], timeout, log)


def copy_rootfs(base: Path, dest: Path) -> Path:
    """A private copy of a cached root file system for one test run."""
    if dest.exists():
        shutil.rmtree(dest)
    _run(["cp", "-a", "--reflink=auto", str(base), str(dest)], 600)
    return dest


# Forking: swtpm daemonizes once its sockets listen, so tpm2-abrmd (ordered after it) finds it ready. No
# seccomp profile of its own: qemu-user (arm64) cannot load one for the guest, and swtpm then exits.
SWTPM_UNIT = """\
[Unit]
Description=software TPM for the gatewayd system test
Before=tpm2-abrmd.service

[Service]
Type=forking
PIDFile=/run/swtpm-systest.pid
ExecStart=/usr/bin/swtpm socket --tpm2 --tpmstate dir=/var/lib/swtpm-systest \
 --server type=tcp,port={port},bindaddr=127.0.0.1 --ctrl type=tcp,port={ctrl},bindaddr=127.0.0.1 \
 --flags not-need-init,startup-clear --seccomp action=none --daemon --pid file=/run/swtpm-systest.pid
StateDirectory=swtpm-systest

[Install]
WantedBy=multi-user.target
"""

# Debian's tpm2-abrmd.service (user tss, system bus) with the software TPM instead of /dev/tpm0; a whole
# unit in /etc, because a drop-in cannot remove Debian's Requires=dev-tpm0.device.
ABRMD_UNIT = """\
[Unit]
Description=TPM2 Access Broker and Resource Management Daemon (software TPM, gatewayd system test)
Requires=swtpm-systest.service
After=swtpm-systest.service

[Service]
Type=dbus
BusName=com.intel.tss2.Tabrmd
ExecStart=/usr/sbin/tpm2-abrmd --tcti=swtpm:host=127.0.0.1,port={port}
User=tss

[Install]
WantedBy=multi-user.target
"""


def prepare_services(root: Path, swtpm_port: int) -> None:
    """The test's TPM services (swtpm, tpm2-abrmd on it) and host name in a root file system."""
    unit = root / "etc/systemd/system/swtpm-systest.service"
    unit.write_text(SWTPM_UNIT.format(port=swtpm_port, ctrl=swtpm_port + 1))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    (root / "etc/systemd/system/tpm2-abrmd.service").write_text(ABRMD_UNIT.format(port=swtpm_port))
    (root / "etc/hostname").write_text("gatewayd-systest\n")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Machine:
    """What the system tests need of a booted Debian: run a command in it, and files in and out (through
    commands, so that it works the same for a container and a virtual machine)."""

    name = ""
    log: Path

    def _execute(
        self, argv: Sequence[str], timeout: float, env: dict[str, str], input: str | None
    ) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the machine with a clean environment; logged with its output."""
        result = self._execute(argv, timeout, {**CONTAINER_ENV, **(env or {})}, input)
        with self.log.open("a") as f:
            f.write(f"\n[systest] $ {' '.join(argv)}  -> {result.returncode}\n{result.stdout}{result.stderr}")
        if check and result.returncode != 0:
            raise ContainerError(
                f"in {self.name}: {' '.join(argv)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def wait_booted(self, deadline: float, timeout: float, pause: float) -> None:
        """Until systemd in the machine says running (or degraded: the failed units are logged)."""
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run(["systemctl", "is-system-running"], check=False, timeout=30).stdout.strip()
            except TimeoutError:
                state = "no answer yet"
            if state in ("running", "degraded"):
                break
            time.sleep(pause)
        else:
            raise ContainerError(f"{self.name} did not finish booting in {timeout} s (state {state!r})")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            with self.log.open("a") as f:
                f.write(f"\n[systest] booted degraded; failed units:\n{failed}\n")

    def write(self, path: str, data: bytes | str, mode: str = "") -> None:
        raw = data.encode() if isinstance(data, str) else data
        script = 'mkdir -p "$(dirname "$1")" && base64 -d > "$1"' + (f' && chmod {mode} "$1"' if mode else "")
        self.run(["sh", "-c", script, "sh", path], input=base64.b64encode(raw).decode(), timeout=300)

    def read(self, path: str) -> bytes:
        return base64.b64decode(self.run(["base64", "-w0", path]).stdout)

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0

    def is_dir(self, path: str) -> bool:
        return self.run(["test", "-d", path], check=False).returncode == 0

    def remove(self, path: str) -> None:
        self.run(["rm", "-f", path])


class Container(Machine):
    """A booted systemd-nspawn container on the host's network (it reaches services on the host's
    loopback), with the apt archive cache bound in."""

    def __init__(self, root: Path, name: str, archives: Path, log: Path) -> None:
        self.root = root
        self.name = name
        self.archives = archives
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 180) -> Container:
        self.archives.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--console=passive",
                 f"--machine={self.name}", "--resolv-conf=copy-host", "--timezone=off",
                 f"--bind={self.archives}:/var/cache/apt/archives", "-D", str(self.root), "-b"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ContainerError(f"systemd-nspawn exited {code} while booting; see {self.log}")
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: no init process after {timeout} s")
            self.leader = self._find_leader()
            time.sleep(0.2)
        self.wait_booted(deadline, timeout, pause=1)
        return self

    def _find_leader(self) -> int:
        """The container's PID 1 as the host sees it: the descendant of nspawn that is PID 1 in its own
        PID namespace."""
        assert self.proc is not None
        for pid in _descendants(self.proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) >= 2 and nspid[-1] == "1":
                return pid
        return 0

    def _execute(
        self, argv: Sequence[str], timeout: float, env: dict[str, str], input: str | None
    ) -> subprocess.CompletedProcess[str]:
        """In all the container's namespaces, through nsenter."""
        if not self.leader:
            raise ContainerError("not booted")
        environ = [f"{k}={v}" for k, v in env.items()]
        full = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
                "--root", "--wd=/", "env", "-i", *environ, *argv]  # fmt: skip
        out = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        return subprocess.CompletedProcess(list(argv), out.returncode, out.stdout, out.stderr)

    def poweroff(self, timeout: float = 90) -> None:
        """Power off from inside; kill what is left by PID if it does not stop in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.leader:
            try:
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=30)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with self.log.open("a") as f:
                    f.write(f"\n[systest] {self.name} did not power off in {timeout} s: killing it by PID\n")
        if self.proc.poll() is None:
            for pid in [self.leader, self.proc.pid]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        self.leader = 0
