"""The one error hierarchy. Every failure a user can cause or fix is an `SllmError`.

The CLI maps these, in one place (`sllmctl.output.fail`), to `error: <message>` and
`hint: <hint>` on stderr and to the exit codes below.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # a known error: bad input, missing model, corrupt data
EXIT_USAGE = 2  # bad command line (typer/click's own code)
EXIT_DAEMON = 3  # the daemon is down or did not answer in time
EXIT_REFUSED = 4  # a daemon refused this client's key, or the key's role may not do that
EXIT_INTERRUPTED = 130  # Ctrl-C


class SllmError(Exception):
    exit_code = EXIT_ERROR
    code = "error"  # the `code` of the JSON error object printed under --json

    def __init__(self, message: str, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:  # e.g. the daemon's own error code, passed on by a client
            self.code = code

    def __str__(self) -> str:
        return self.message


class NotFound(SllmError):
    """A model name the store does not hold."""

    code = "not_found"


class AlreadyExists(SllmError):
    """A model name already taken (convert without --force)."""

    code = "already_exists"


class CorruptCheckpoint(SllmError):
    """Stored bytes that do not match their checksums, or a manifest that cannot be read."""

    code = "corrupt"


class UsageError(SllmError):
    exit_code = EXIT_USAGE
    code = "usage"


class DaemonUnreachable(SllmError):
    exit_code = EXIT_DAEMON
    code = "daemon_unreachable"
