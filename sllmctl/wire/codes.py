"""The protocol's error codes, and the SllmError each stands for, one table both ways: the
daemon turns an exception into its code, the client turns the code back into the exception."""

from __future__ import annotations

from sllmctl.errors import EXIT_REFUSED, CorruptCheckpoint, NotFound, SllmError

BAD_REQUEST = "bad_request"
VERSION_MISMATCH = "version_mismatch"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
DOES_NOT_FIT = "does_not_fit"
NO_GPU = "no_gpu"
CORRUPT = "corrupt_checkpoint"
BUSY = "busy"
FORBIDDEN = "forbidden"
FAILED = "failed"
INTERNAL = "internal"


class BadRequest(SllmError):
    """A message or argument that breaks the protocol; `field` names the culprit."""

    def __init__(self, message: str, hint: str | None = None, field: str | None = None) -> None:
        super().__init__(message, hint)
        self.field = field


class VersionMismatch(SllmError):
    """A request in another protocol version than the daemon's."""


class UnknownOp(SllmError):
    """An operation the daemon does not know."""


class DoesNotFit(SllmError):
    """A model larger than the room a tier has."""


class NoGpu(SllmError):
    """A GPU was asked for on a host without one."""


class Busy(SllmError):
    """The daemon's queue of long jobs is full; try again later."""


class Forbidden(SllmError):
    """An operation the caller's key may not ask for (its role is not among the op's)."""

    exit_code = EXIT_REFUSED  # refused by the daemon, like a refused key
    code = FORBIDDEN


class Internal(SllmError):
    """An exception the daemon did not expect (a bug: see its log)."""


# most specific first: code_of takes the first class the exception is an instance of
_TABLE: list[tuple[str, type[SllmError]]] = [
    (BAD_REQUEST, BadRequest), (VERSION_MISMATCH, VersionMismatch), (UNKNOWN_OP, UnknownOp),
    (NOT_FOUND, NotFound), (DOES_NOT_FIT, DoesNotFit), (NO_GPU, NoGpu),
    (CORRUPT, CorruptCheckpoint), (BUSY, Busy), (FORBIDDEN, Forbidden), (INTERNAL, Internal),
]
CODES = (*(code for code, _ in _TABLE), FAILED)


def code_of(e: SllmError) -> str:
    """The code of a known failure; `failed` for any other SllmError."""
    return next((code for code, cls in _TABLE if isinstance(e, cls)), FAILED)


def error_for(code: str, message: str, hint: str | None = None,
              field: str | None = None) -> SllmError:
    """The exception an error reply stands for (a plain SllmError for `failed` or a code this
    client does not know)."""
    cls = next((c for k, c in _TABLE if k == code), SllmError)
    if cls is BadRequest:
        return BadRequest(message, hint, field)
    return cls(message, hint)
