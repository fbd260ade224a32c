"""Sizes given on the command line (`--dram-pool 8GiB`, `25%`), checked before the daemon
binds anything, so that a bad one is an error at `daemon start` and not at the first warm."""

from __future__ import annotations

import os

from sllmctl.errors import SllmError

_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10,
          "m": 1 << 20, "g": 1 << 30, "b": 1}
SIZE_HINT = "use bytes, 8GiB, 512MB or a share of RAM such as 25%"


def parse_size(text: str, total: int) -> int:
    """'8GiB', '512MB', '25%' (of `total`), or plain bytes; ValueError if it is none."""
    t = text.strip().lower().replace(" ", "")
    if t.endswith("%"):
        return int(total * float(t[:-1]) / 100)
    for suffix, scale in _UNITS.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return int(t)


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dram_pool(text: str) -> int:
    """The DRAM pool's bytes: a size no larger than this host's RAM."""
    ram = total_ram()
    try:
        size = parse_size(text, ram)
    except (ValueError, OverflowError):
        raise SllmError(f"--dram-pool {text!r} is not a size", hint=SIZE_HINT) from None
    if size < 0 or size != size:
        raise SllmError(f"--dram-pool {text!r} is negative", hint=SIZE_HINT)
    if size > ram:
        raise SllmError(f"--dram-pool {text} ({size / 1e9:.1f} GB) is larger than this "
                        f"host's RAM ({ram / 1e9:.1f} GB)",
                        hint="pick a smaller pool, such as 25%")
    return size
