"""The shared output helper: data on stdout, progress and errors on stderr.

Commands build a result (plain data) and hand it to `Out.result` with a function that
renders it for people; `--json` prints the data as one JSON document instead. Errors take
one path, `fail`, which prints `error:` and `hint:` lines and picks the exit code.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from sllmctl.errors import EXIT_ERROR, EXIT_INTERRUPTED, SllmError

ProgressFn = Callable[[int], None]

# OSErrors that users cause or can fix, with what to do next
_OS_HINTS = {
    errno.ENOSPC: "free disk space, or point SLLMCTL_HOME at a larger file system",
    errno.EDQUOT: "free disk space, or point SLLMCTL_HOME at a larger file system",
    errno.EFBIG: "a file-size limit (ulimit -f, or the file system's) is too small",
    errno.EACCES: "check the permissions of the path, or set SLLMCTL_HOME",
    errno.EROFS: "set SLLMCTL_HOME to a writable file system",
    errno.ENOENT: "check the path",
}


_json_printed = False  # a command printed its JSON document: an error then adds no second


class Out:
    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json = json_mode
        self.quiet = quiet

    @property
    def interactive(self) -> bool:
        return not (self.json or self.quiet) and sys.stderr.isatty()

    def result(self, data: Any, human: Callable[[], None] | None = None) -> None:
        global _json_printed
        if self.json or human is None:
            _json_printed = True
            sys.stdout.write(json.dumps(data, indent=None if not sys.stdout.isatty() else 1))
            sys.stdout.write("\n")
        elif not self.quiet:
            human()
        sys.stdout.flush()

    def info(self, message: str) -> None:
        if not (self.json or self.quiet):
            print(message, file=sys.stderr)

    @contextmanager
    def progress(self, description: str, total: int = 0) -> Iterator[Bar]:
        """A byte-counting progress bar on stderr; silent where nobody watches."""
        if not self.interactive:
            yield Bar()
            return
        with byte_progress() as bar:
            task = bar.add_task(description, total=total or None)
            yield Bar(lambda n: bar.update(task, total=n), lambda n: bar.advance(task, n))


class Bar:
    """Callbacks that library code reports progress through (no-ops when silent)."""

    def __init__(self, set_total: ProgressFn | None = None,
                 advance: ProgressFn | None = None) -> None:
        self.set_total: ProgressFn = set_total or _ignore
        self.advance: ProgressFn = advance or _ignore


def _ignore(_: int) -> None:
    return None


NO_WRAP_WIDTH = 4096  # piped output: one row per line, whatever the terminal's width


def byte_progress() -> Any:
    """A rich Progress on stderr counting bytes (size, rate, time left), gone when done."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    return Progress("[progress.description]{task.description}", *columns,
                    console=stderr_console(), transient=True)


def stdout_console() -> Any:
    """Rich console for data on stdout; when stdout is not a terminal it never wraps, so
    `sllmctl ps | awk '{print $1}'` sees one row per line."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else NO_WRAP_WIDTH
    return Console(highlight=False, soft_wrap=True, width=width)


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe_error(exc: BaseException) -> tuple[str, str, str | None, int]:
    """`exc` as (code, message, hint, exit code): the one table of what users see."""
    if isinstance(exc, SllmError):
        return exc.code, exc.message, exc.hint, exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted", None, EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return "os_error", f"{exc.strerror or exc}{where}", _OS_HINTS.get(exc.errno or 0), \
            EXIT_ERROR
    return ("internal", f"internal error: {type(exc).__name__}: {exc}",
            "run again with SLLMCTL_DEBUG=1 for a traceback, and report it", EXIT_ERROR)


def print_json_error(code: str, message: str, hint: str | None) -> None:
    """The error as one JSON object on stdout, for scripts that asked for --json."""
    error: dict[str, Any] = {"code": code, "message": message, "hint": hint}
    sys.stdout.write(json.dumps({"error": error}) + "\n")
    sys.stdout.flush()


def fail(exc: BaseException, json_mode: bool = False) -> NoReturn:
    """Print one error line (and a hint) for `exc` on stderr, and under --json the same as
    one JSON object on stdout; exit with its code."""
    if os.environ.get("SLLMCTL_DEBUG"):
        traceback.print_exception(exc)
    code, message, hint, exit_code = describe_error(exc)
    if json_mode and not _json_printed:  # e.g. verify's failed report is the document
        print_json_error(code, message, hint)
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(exit_code)
