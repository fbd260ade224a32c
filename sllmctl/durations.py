"""Durations as ollama writes them: `5m`, `1h30m`, `30s`, `250ms`, a bare number of seconds
(`300`, `2.5`), or a negative number (`-1`) for "for ever".

Standard library only, so that the CLI, the daemon and the HTTP API all parse with this one
function.
"""

from __future__ import annotations

import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0,
          "d": 86400.0}  # Go's units, as ollama takes them, and days
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")

EXAMPLES = "e.g. 300, 30s, 5m, 1h30m, or -1 for ever"


def parse_duration(value: str | float | int) -> float:
    """Seconds in `value`; any negative value comes back as -1.0 (keep for ever).

    Raises ValueError, with the accepted forms named, for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r} ({EXAMPLES})")
    text = value if isinstance(value, str) else None
    seconds = float(value) if text is None else _parse_text(text.strip().lower())
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"not a duration: {value!r} ({EXAMPLES})")
    return -1.0 if seconds < 0 else seconds


def _parse_text(text: str) -> float:
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, pos = 0.0, 0
    for m in _PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"not a duration: {text!r} ({EXAMPLES})")
    return sign * total


def format_duration(seconds: float) -> str:
    """`90` -> `1m30s`, `3600` -> `1h`, negative -> `for ever`: the inverse of the parser
    for whole seconds, for people to read."""
    if seconds < 0:
        return "for ever"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)
