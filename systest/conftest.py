"""System tests: the .deb installed with apt in booted Debian containers (systemd-nspawn), run as a user
runs it. `make test-system` (part of `make test`) and `make test-arm64` run them; they need root.

GATEWAYD_SYSTEST_TARGETS: space-separated RELEASE/ARCH (default "bookworm/amd64 trixie/amd64").
GATEWAYD_SYSTEST_CACHE: where root file systems and downloaded packages are cached between runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatewayd_dev.nspawn import Container, cache_dir, copy_rootfs, ensure_rootfs
from gatewayd_dev.procs import free_port
from gatewayd_dev.standin import StandIn

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "systest"


def targets() -> list[str]:
    return os.environ.get("GATEWAYD_SYSTEST_TARGETS", "bookworm/amd64 trixie/amd64").split()


@dataclass(frozen=True)
class Debs:
    current: Path  # what `make deb` built
    current_version: str
    previous: Path  # the same build, re-versioned lower: what the upgrade test upgrades from
    previous_version: str


def _version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    """The package from dist/ (`make test-system` builds it first) and a 'previous build' of it.

    No earlier release of the package exists to upgrade from, so the previous build is this build with a
    lower version (VERSION~systest.prev): the upgrade path (maintainer scripts, conffile handling, the
    restart) is the real one; the code on both sides is the same.
    """
    version = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(REPO / "debian/changelog"), "-S", "Version"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    current = REPO / "dist" / f"gatewayd_{version}_all.deb"
    if not current.exists():
        pytest.fail(f"{current} is missing: run `make deb` (make test-system does)")
    tree = tmp_path_factory.mktemp("prev") / "tree"
    subprocess.run(["dpkg-deb", "-R", str(current), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    previous_version = f"{version}~systest.prev"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {previous_version}", control.read_text()))
    previous = tree.parent / f"gatewayd_{previous_version}_all.deb"
    build = ["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(tree), str(previous)]
    subprocess.run(build, check=True, capture_output=True)
    assert _version(previous) == previous_version
    return Debs(current, version, previous, previous_version)


@dataclass
class Target:
    release: str
    arch: str
    container: Container
    standin: StandIn
    listener_port: int
    log: Path

    @property
    def name(self) -> str:
        return f"{self.release}/{self.arch}"


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


def _prepare_root(root: Path, swtpm_port: int) -> None:
    unit = root / "etc/systemd/system/swtpm-systest.service"
    unit.write_text(SWTPM_UNIT.format(port=swtpm_port, ctrl=swtpm_port + 1))
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    (root / "etc/systemd/system/tpm2-abrmd.service").write_text(ABRMD_UNIT.format(port=swtpm_port))
    (root / "etc/hostname").write_text("gatewayd-systest\n")


@pytest.fixture(scope="module", params=targets())
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A booted clean Debian RELEASE/ARCH with a software TPM service, and the stand-in on the host."""
    release, arch = request.param.split("/")
    work = WORK / f"{release}-{arch}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "container.log"
    base = ensure_rootfs(release, arch, work / "rootfs-build.log")
    root = copy_rootfs(base, work / "root")
    swtpm_port = free_port(pair=True)
    _prepare_root(root, swtpm_port)
    standin = StandIn(work / "standin").start()
    container = Container(root, f"gwsys-{release}-{arch}", cache_dir() / f"archives-{release}-{arch}", log)
    failed_before = request.session.testsfailed
    try:
        container.boot(timeout=300 if arch != "amd64" else 120)
        yield Target(release, arch, container, standin, free_port(), log)
    finally:
        container.poweroff()
        standin.stop()
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)  # a failed run's root file system is kept for a look
