"""Network changes (issue 9) need interfaces and addresses to change: tests/netns/ does that in a network
namespace made for it (`unshare --net`, through sudo when not root), never in the host's. This test runs
that suite there with the same interpreter and reports its result."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REPO


def test_link_and_address_changes_in_a_network_namespace_of_their_own() -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env=PYTHONPATH,GATEWAYD_NETNS"]
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -p no:cacheprovider -q -s tests/netns"
    result = subprocess.run(
        [*sudo, "unshare", "--net", "sh", "-c", inner],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAYD_NETNS": "1"},
        timeout=600,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, (
        f"the network namespace suite failed:\n{result.stdout[-8000:]}{result.stderr}"
    )
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) == 3 and "skipped" not in result.stdout, result.stdout[-2000:]
