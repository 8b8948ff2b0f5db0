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

from gatewayd_dev.nspawn import (
    Container,
    Machine,
    cache_dir,
    copy_rootfs,
    ensure_rootfs,
    host_arch,
    prepare_services,
)
from gatewayd_dev.procs import free_port
from gatewayd_dev.standin import StandIn
from gatewayd_dev.vm import HOST_ADDRESS, VirtualMachine, ensure_vm_root

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
    name: str  # RELEASE/ARCH[/vm]
    container: Machine  # a container or a virtual machine
    standin: StandIn
    listener_port: int
    host_address: str  # where the machine reaches the host's loopback (the stand-in)


@pytest.fixture(scope="module", params=targets())
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A booted clean Debian RELEASE/ARCH with a software TPM service, and the stand-in on the host.
    RELEASE/ARCH/vm boots a whole virtual machine instead of a container (gatewayd_dev.vm says why)."""
    release, arch, *kind = request.param.split("/")
    work = WORK / request.param.replace("/", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "container.log"
    standin = StandIn(work / "standin").start()
    machine: Machine
    if kind == ["vm"]:
        root = ensure_vm_root(release, arch, work / "rootfs-build.log")
        machine, host_address, boot_timeout = (
            VirtualMachine(root, arch, request.param, work, log),
            HOST_ADDRESS,
            900,
        )
    else:
        root = copy_rootfs(ensure_rootfs(release, arch, work / "rootfs-build.log"), work / "root")
        prepare_services(root, free_port(pair=True))
        archives = cache_dir() / f"archives-{release}-{arch}"
        machine, host_address = Container(root, f"gwsys-{release}-{arch}", archives, log), "127.0.0.1"
        boot_timeout = 300 if arch != host_arch() else 120
    failed_before = request.session.testsfailed
    try:
        machine.boot(timeout=boot_timeout)
        yield Target(request.param, machine, standin, free_port(), host_address)
    finally:
        machine.poweroff()
        standin.stop()
    if request.session.testsfailed == failed_before and kind != ["vm"]:
        shutil.rmtree(work / "root", ignore_errors=True)  # a failed run's root file system is kept for a look
