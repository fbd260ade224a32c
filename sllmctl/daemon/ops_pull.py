"""The pull operation: a model from the Hugging Face Hub into the store (sllmctl.store.pull).

One pull per model name runs at a time: a second request for the same repo, revision and
name joins it (its client sees the same progress and the same result); a request for that
name from another repo is refused while the first runs. A request with `cancel` stops the
pull of its name once no other client waits for it; what was downloaded stays in the HF
cache for the next pull to resume.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sllmctl.daemon.state import Progress, State
from sllmctl.errors import NotFound, SllmError
from sllmctl.store.pull import PullRequest
from sllmctl.store.pull import pull as pull_model
from sllmctl.store.sources.hub import HubOptions
from sllmctl.wire.codes import Busy
from sllmctl.wire.messages import Pull


@dataclass
class Shared:
    """One pull in flight, and everyone waiting for it."""

    key: tuple[str, str]  # repo, revision
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    stage: str = "resolving"
    done: int = 0
    total: int = 0
    waiters: int = 0
    result: dict[str, Any] | None = None
    error: BaseException | None = None


def pull(state: State, msg: Pull, progress: Progress) -> dict[str, Any]:
    if msg.cancel:
        return _cancel(state, msg.name)
    with state.jobs_lock:
        task = state.pulls.get(msg.name)
        if task is not None and task.key != (msg.repo, msg.revision):
            raise Busy(f"model {msg.name} is being pulled from {task.key[0]}@{task.key[1]}",
                       hint="wait for it, or pull with another --name")
        owner = task is None
        if task is None:
            task = state.pulls[msg.name] = Shared((msg.repo, msg.revision))
        task.waiters += 1
    try:
        if owner:
            return _run(state, msg, task, progress)
        while not task.finished.wait(0.2):
            progress(task.stage, task.done, task.total)
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return {**task.result, "shared": True}
    finally:
        with state.jobs_lock:
            task.waiters -= 1


def _run(state: State, msg: Pull, task: Shared, progress: Progress) -> dict[str, Any]:
    def report(stage: str, done: int, total: int) -> None:
        task.stage, task.done, task.total = stage, done, total
        progress(stage, done, total)

    req = PullRequest(msg.repo, msg.name, msg.revision, msg.dtype, msg.compress, msg.file,
                      msg.quant, msg.force)
    opts = HubOptions(msg.endpoint, msg.token, msg.cache_dir, msg.offline)
    try:
        task.result = pull_model(req, opts, report, task.cancel)
        return {**task.result, "shared": False}
    except BaseException as e:
        task.error = e if isinstance(e, SllmError) else SllmError(
            f"the pull of {msg.name} failed: {type(e).__name__}: {e}")
        raise task.error from None
    finally:
        with state.jobs_lock:
            state.pulls.pop(msg.name, None)
        task.finished.set()


def _cancel(state: State, name: str) -> dict[str, Any]:
    with state.jobs_lock:
        task = state.pulls.get(name)
        if task is None:
            raise NotFound(f"no pull of {name} is in flight")
        others = task.waiters - 1  # the client that cancels waits for it too
        if others <= 0:
            task.cancel.set()
    if others > 0:
        return {"name": name, "cancelled": False, "waiting": others}
    task.finished.wait(2.0)  # a read that stalls notices at its timeout
    return {"name": name, "cancelled": True, "stopped": task.finished.is_set(),
            "at": time.time()}
