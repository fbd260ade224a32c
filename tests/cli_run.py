"""Helpers for the tests that run the real command line (imported, never collected)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def sllmctl(*args: str, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`sllmctl ARGS` in a child process, with this test's environment (its own home)."""
    return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                          text=True, input=input, env=os.environ.copy(), timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
