"""Durations as the config writes them ("45s", "90m", "12h", "30d", "1d12h", "0.5s"), parsed once, when the
config is loaded (core/config.py): every consumer reads `Duration.seconds`."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """ "45s", "90m", "12h", "30d" (or "1d12h") -> seconds; ValueError for anything else."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text or total <= 0:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m or 45s")
    return total


class Duration(str):
    """A config duration: still the text it was written as (so the reference config, reload diffs and logs
    show what the user wrote), with its value in `seconds`. "" means "off" (0 seconds) where a key allows
    it; anything else that is not a duration raises ValueError."""

    seconds: float

    def __new__(cls, text: str) -> Duration:
        self = super().__new__(cls, text)
        self.seconds = parse_duration(text) if text else 0.0
        return self
