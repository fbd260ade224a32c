"""Continuous batching: one thread owns the model and interleaves every request in flight.

The scheduler (scheduler.py) decides which requests hold the batch's slots; the runner
(runner.py) prefills and decodes them. A step lets cancelled requests go, prefills each newly
admitted request alone (between decode steps), then advances every running request by one
token. Each request (request.py) carries its own state, so a request can be rebuilt from
`Request.to_dict()` and handed to another engine, which carries on from its tokens so far.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from sllmctl.engine.model import Transformer
from sllmctl.engine.request import Request, SamplingParams
from sllmctl.engine.runner import MIN_KV, ModelRunner
from sllmctl.engine.scheduler import Scheduler

__all__ = ["MIN_KV", "BatchEngine"]


class BatchEngine:
    def __init__(self, model: Transformer, slots: int = 8, max_len: int = 2048,
                 graphs: bool | None = None) -> None:
        self.model = model
        self.runner = ModelRunner(model, slots, max_len, graphs)
        self.max_len = self.runner.max_len
        self.scheduler = Scheduler(slots, self.max_len)
        self._stop = threading.Event()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="sllmctl-batch", daemon=True)
        self.thread.start()

    @property
    def steps(self) -> int:
        return self.runner.steps

    def add(self, req: Request) -> Iterator[int]:
        """Queue a request (refused at once if it cannot fit: ContextTooLong); iterate its
        sampled token ids as they come (eos included)."""
        self.scheduler.add(req)
        return req.stream()

    def submit(self, ids: list[int], max_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, eos: set[int] | None = None,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """`add` for a bare prompt; eos ids default to the model config's."""
        params = SamplingParams(max_tokens, temperature, top_p, top_k)
        eos_ids = self.model.config.eos_ids if eos is None else eos
        return self.add(Request(ids, params, eos=eos_ids, generator=generator))

    def at_step(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the engine thread at the start of its next step (between two tokens
        of every request: a consistent view, e.g. for `Request.to_dict` or
        `Scheduler.detach`); its result or error in the future."""
        done: Future[Any] = Future()
        self._calls.put((fn, done))
        self.scheduler.wake()
        return done

    def close(self) -> None:
        self._stop.set()
        self.scheduler.wake()
        self.thread.join(timeout=10)
        self.scheduler.close()
        while not self._calls.empty():
            self._calls.get()[1].set_exception(RuntimeError("the engine has closed"))
        self.runner.close()

    # ------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self.step()
                except BaseException as e:  # fail the requests in flight, keep serving
                    self.scheduler.fail_all(e)

    def step(self) -> None:
        while not self._calls.empty():
            fn, done = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)
        self.scheduler.drop_cancelled()
        while not self._stop.is_set() and (admitted := self.scheduler.admit()) is not None:
            slot, req = admitted
            try:
                self._emit([slot], [req], self.runner.prefill(slot, req.context()))
            except BaseException as e:  # this request fails; the others go on
                self.scheduler.fail(slot, req, e)
        running = self.scheduler.running()
        if running:
            rows = [(slot, r.tokens[-1], len(r.context()) - 1) for slot, r in running]
            self._emit([s for s, _ in running], [r for _, r in running],
                       self.runner.decode(rows))

    def _emit(self, slots: Sequence[int], reqs: Sequence[Request],
              logits: torch.Tensor) -> None:
        tokens = self.runner.sample(logits, slots, reqs)
        for slot, req, token in zip(slots, reqs, tokens, strict=True):
            self.scheduler.record(slot, req, token)
