"""The state directory: created 0700, and tightened (with a warning) if someone widened it."""

from __future__ import annotations

import logging
from pathlib import Path

from gatewayd.core.errors import GatewaydError

log = logging.getLogger("gatewayd.state")


def ensure_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.stat().st_mode
    except OSError as exc:
        raise GatewaydError(f"cannot use state directory {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        log.warning("state directory %s is accessible to others; tightening to 0700", path)
        path.chmod(0o700)
