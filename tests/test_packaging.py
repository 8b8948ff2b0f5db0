"""The Debian packaging agrees with the project: generated files are current, every file the package installs
exists, the runtime dependencies are Debian's packages of what pyproject.toml needs, and the completion works.

The package itself is built, checked by lintian and installed in booted Debian 12 and 13 by `make
test-system` (systest/).
"""

from __future__ import annotations

import re
import subprocess
import tomllib

from gatewayd_dev.docgen import bash_completion, config_man, gatewayctl_man

from .conftest import REPO

DEBIAN = REPO / "debian"


def test_generated_man_page_and_completion_are_current() -> None:
    assert (REPO / "man" / "gatewayd.toml.5").read_text() == config_man(), "run python -m gatewayd_dev.docgen"
    assert (REPO / "man" / "gatewayctl.8").read_text() == gatewayctl_man(), "run gatewayd_dev.docgen"
    assert (REPO / "completion" / "gatewayctl.bash").read_text() == bash_completion(), (
        "run python -m gatewayd_dev.docgen"
    )


def test_config_man_page_documents_every_key_of_the_reference() -> None:
    page = (REPO / "man" / "gatewayd.toml.5").read_text()
    keys = re.findall(r"(?m)^#?([a-z_]+) = ", (REPO / "config" / "gatewayd.toml").read_text())
    assert len(keys) > 50
    for key in keys:
        assert f"\\fB{key}\\fR = " in page, key


def test_every_file_the_package_installs_exists() -> None:
    assert (DEBIAN / "gatewayd.service").resolve() == (REPO / "systemd" / "gatewayd.service").resolve()
    for line in (DEBIAN / "gatewayd.install").read_text().splitlines():
        assert (REPO / line.split()[0]).is_file(), line
    for name in ("gatewayd.manpages", "gatewayd.docs"):
        for line in (DEBIAN / name).read_text().splitlines():
            assert (REPO / line).is_file(), line
    assert set((DEBIAN / "gatewayd.manpages").read_text().split()) == {
        "man/gatewayd.8",
        "man/gatewayctl.8",
        "man/gatewayd.toml.5",
    }


def test_runtime_dependencies_are_debians_packages_of_the_python_requirements() -> None:
    control = (DEBIAN / "control").read_text()
    depends = re.search(r"(?ms)^Depends: (.*?)^\S", control.split("Package: gatewayd", 1)[1])
    assert depends
    packages = {d.strip().split()[0] for d in depends.group(1).replace("\n", " ").split(",") if d.strip()}
    debian_name = {
        "paho-mqtt": "python3-paho-mqtt",
        "cryptography": "python3-cryptography",
        "tpm2-pytss": "python3-tpm2-pytss",
        "pyudev": "python3-pyudev",
        "systemd-python": "python3-systemd",
    }
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in required:
        name = re.split(r"[<>=!~ ]", requirement)[0]
        assert debian_name[name] in packages, requirement
    assert {"tpm2-openssl", "ca-certificates", "python3", "tpm-udev", "procps"} <= packages
    assert "Architecture: all" in control


def test_bash_completion_completes_commands_actions_and_options() -> None:
    def complete(*words: str) -> list[str]:
        script = (
            f"source {REPO / 'completion' / 'gatewayctl.bash'}\n"
            f"COMP_WORDS=(gatewayctl {' '.join(words)}); COMP_CWORD={len(words)}\n"
            '_gatewayctl; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.split()

    assert complete("ident") == ["identity"]
    assert complete("identity", "cr") == ["create-key", "create-csr"]
    assert complete("identity", "create-csr", "--o") == ["--out"]
    assert complete("--config", "/etc/gatewayd/gatewayd.toml", "list-cert") == [
        "list-certificates",
        "list-certificates-by-ca",
    ]
    assert "debug-stall-loop" not in complete("")
    assert complete("identity", "install-certificate", "pyproj") == ["pyproject.toml"]  # a file argument
