"""Read the TOML configuration: the main file plus `PATH.d/*.toml` drop-ins, merged in name order.

Merging: tables merge key by key, recursively; any other value (arrays included) set by a later file
replaces the earlier one whole. Every leaf remembers which file set it, so problems name that file.
Files in PATH.d not ending in `.toml` are ignored (editor backups, dpkg's .dpkg-old and the like).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gatewayd.core.config import Config, validate
from gatewayd.core.errors import ConfigError, ConfigProblem


def dropin_dir(path: Path) -> Path:
    return path.with_name(path.name + ".d")


def config_files(path: Path) -> list[Path]:
    """The main file, then its drop-ins in name order."""
    dropins = dropin_dir(path)
    extra = sorted(p for p in dropins.glob("*.toml") if p.is_file()) if dropins.is_dir() else []
    return [path, *extra]


def _merge(
    into: dict[str, Any],
    doc: dict[str, Any],
    file: str,
    origins: dict[tuple[str, ...], str],
    path: tuple[str, ...],
) -> None:
    for key, value in doc.items():
        kpath = (*path, key)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, file, origins, kpath)
            continue
        into[key] = value
        # A replaced subtree forgets the origins of what it replaced.
        for stale in [k for k in origins if k[: len(kpath)] == kpath]:
            del origins[stale]
        _record(value, file, origins, kpath)


def _record(value: Any, file: str, origins: dict[tuple[str, ...], str], path: tuple[str, ...]) -> None:
    origins[path] = file
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, file, origins, (*path, key))


def load(path: Path) -> Config:
    """Load and validate; raises ConfigError with every problem found, across all files."""
    merged: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    problems: list[ConfigProblem] = []
    for file in config_files(path):
        try:
            doc = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(ConfigProblem(str(file), "", f"cannot read: {exc.strerror or exc}"))
            continue
        except UnicodeDecodeError as exc:
            problems.append(ConfigProblem(str(file), "", f"not UTF-8 text: {exc.reason}"))
            continue
        except tomllib.TOMLDecodeError as exc:
            problems.append(ConfigProblem(str(file), "", f"invalid TOML: {exc}"))
            continue
        _merge(merged, doc, str(file), origins, ())
    if problems:
        # Validating a partial merge would report keys "missing" that the broken file may well set.
        raise ConfigError(problems)
    return validate(merged, origins, str(path))
