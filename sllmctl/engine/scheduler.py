"""Which requests run (policy): admission from the waiting queue into free slots, and when a
request leaves its slot. The runner (runner.py) does the computing.

A request waits in arrival order and takes the lowest free slot, so that a step runs few rows.
It leaves its slot when it samples an eos id, reaches its token limit or fills the context,
and at the start of the next step after it was cancelled (its client went away, or its text
met a stop string), so a cancelled request costs at most one more decode step.
"""

from __future__ import annotations

import queue

from sllmctl.engine.request import ContextTooLong, Request


class Scheduler:
    def __init__(self, slots: int, max_len: int) -> None:
        self.max_len = max_len
        self.waiting: queue.Queue[Request | None] = queue.Queue()  # None wakes the engine
        self.active: list[Request | None] = [None] * slots

    def add(self, req: Request) -> None:
        """Queue a request (from any thread); one that cannot fit is refused at once."""
        if len(req.context()) + 1 > self.max_len:
            raise ContextTooLong(len(req.context()), self.max_len)
        self.waiting.put(req)

    def wake(self) -> None:
        self.waiting.put(None)

    def admit(self) -> tuple[int, Request] | None:
        """The next waiting request and the slot it takes; waits (up to half a second) only
        while nothing runs. None when no slot is free or nothing waits."""
        while None in self.active:
            idle = not any(self.active)
            try:
                req = self.waiting.get(block=idle, timeout=0.5 if idle else None)
            except queue.Empty:
                return None
            if req is None:
                return None
            if req.cancelled.is_set():
                req.end("abort")
                continue
            slot = self.active.index(None)
            self.active[slot] = req
            return slot, req
        return None

    def running(self) -> list[tuple[int, Request]]:
        return [(i, r) for i, r in enumerate(self.active) if r is not None]

    def detach(self, req: Request) -> bool:
        """Let a running request leave its slot without ending it (it carries on elsewhere:
        its stream stays open); False when it is not running (finished, or still waiting).
        Only from the engine thread (BatchEngine.at_step)."""
        for slot, running in self.running():
            if running is req and not req.cancelled.is_set():
                self.active[slot] = None
                return True
        return False

    def drop_cancelled(self) -> None:
        for slot, req in self.running():
            if req.cancelled.is_set():
                self.active[slot] = None
                req.end("abort")

    def record(self, slot: int, req: Request, token: int) -> None:
        """A token sampled for the request in `slot`: it leaves the slot if it is done."""
        if req.record(token, self.max_len):
            self.active[slot] = None

    def fail(self, slot: int, req: Request, error: BaseException) -> None:
        self.active[slot] = None
        req.end("error", error)

    def fail_all(self, error: BaseException) -> None:
        for slot, req in self.running():
            self.fail(slot, req, error)

    def close(self) -> None:
        """End every request, running or waiting (the engine is going away)."""
        for slot, req in self.running():
            self.active[slot] = None
            req.end("abort")
        while True:
            try:
                waiting = self.waiting.get_nowait()
            except queue.Empty:
                return
            if waiting is not None:
                waiting.end("abort")
