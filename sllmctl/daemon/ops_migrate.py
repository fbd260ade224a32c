"""Live migration of running requests between daemons, token mode (docs/migration.md).

The source (`migrate`, admin) takes a consistent snapshot of a request between two engine
steps (`Request.to_dict`) and sends it to the destination (`migrate_in`, peer), which loads
the model from its fastest tier, rebuilds the request by prefill and carries on, streaming
each token back as an event of that call. The source keeps generating meanwhile; while the
destination's first token shows it more than GAP tokens behind, another round sends a fresh
snapshot (the destination drops the old copy). Then the source lets its copy go between two
steps (`Scheduler.detach`: the client's stream stays open) and relays the destination's tokens
from where its own stopped into the request's queue, which the client's stream reads: the
text is the text it would have been. Whatever goes wrong before the destination's reply (it
dies, refuses, or its tokens differ from those the source already sent) the source takes the
request back into its own engine, rebuilt by prefill from the tokens the client has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sllmctl.daemon import ops_serving
from sllmctl.daemon.state import State
from sllmctl.engine.request import Request
from sllmctl.errors import NotFound, SllmError
from sllmctl.wire import hosts
from sllmctl.wire.client import Client, Remote
from sllmctl.wire.codes import BadRequest
from sllmctl.wire.messages import Migrate, MigrateEnd, MigrateIn

log = logging.getLogger("sllmctl.daemon")
GAP = 2  # tokens: a destination at most this far behind is handed the request
ROUNDS = 4  # snapshots sent at most before handing over whatever the gap
PEER_FIRST_S = 5.0  # seconds for the destination's first answer (later: its heartbeats)
HANDOVER_S = 120.0  # seconds to wait for the destination's first token after a round
STEP_S = 30.0  # seconds to wait for the engine thread to run a call between steps

_incoming: dict[str, Request] = {}  # migration id -> this daemon's copy (its latest round)
_incoming_lock = threading.Lock()


# ------------------------------------------------------------ the destination
def migrate_in(state: State, msg: MigrateIn, progress: Callable[..., None]) -> dict[str, Any]:
    req = _rebuild(msg.state)  # a malformed state is refused before anything loads
    host = _host(state)
    served = host.get(msg.name, request=False)
    try:
        chat = served.model
        host.wait_loaded(served)
        _fits(req, chat.model.config.vocab, chat.model.embed_tokens.weight.device)
        with _incoming_lock:
            old = _incoming.get(msg.migration)
            _incoming[msg.migration] = req
        if old is not None:
            old.cancel()  # an earlier round's copy
        try:
            for at, token in enumerate(chat.engine.add(req), len(req.tokens)):
                progress("tokens", at + 1, req.params.max_tokens, {"at": at, "tokens": [token]})
        finally:
            with _incoming_lock:
                if _incoming.get(msg.migration) is req:
                    del _incoming[msg.migration]
    finally:
        host.release(served)
    return {"migration": msg.migration, "round": msg.round, "finish": req.finish,
            "tokens": len(req.tokens)}


def migrate_end(state: State, msg: MigrateEnd, progress: Callable[..., None]) -> dict[str, Any]:
    with _incoming_lock:
        req = _incoming.get(msg.migration)
    if req is not None:
        req.cancel()
    return {"migration": msg.migration, "ended": req is not None}


def _host(state: State) -> Any:
    """The daemon's served models (made here when nothing is served over HTTP yet)."""
    side = state.http
    with side.lock:
        if side.host is None:
            side.host = ops_serving.model_host(state)
        return side.host


def _rebuild(text: str) -> Request:
    """A request from the source's state; anything malformed is a bad request."""
    try:
        req = Request.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, SllmError) as e:
        why = e.message if isinstance(e, SllmError) else str(e)
        raise BadRequest(f"migrate_in: state is not a request's state ({why[:80]})",
                         field="state") from None
    p = req.params
    if not (_int(p.max_tokens) and p.max_tokens > 0 and _int(p.top_k) and _number(p.temperature)
            and _number(p.top_p) and (p.seed is None or _int(p.seed))
            and isinstance(p.stop, list) and all(isinstance(x, str) for x in p.stop)
            and all(_int(t) for t in req.eos)):
        raise BadRequest("migrate_in: state's sampling parameters are malformed",
                         field="state")
    if req.finish is not None:
        raise BadRequest("migrate_in: the request has already ended", field="state")
    return req


def _int(x: Any) -> bool:
    return type(x) is int


def _number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _fits(req: Request, vocab: int, device: Any) -> None:
    """The request's tokens are ids of this model, its generator of this device's type."""
    ids = req.prompt + req.tokens
    if not req.prompt or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise BadRequest(f"migrate_in: state's tokens must be ids below {vocab}",
                         field="state")
    g = req.generator
    if g is not None and g.device.type != device.type:
        raise BadRequest(f"migrate_in: a {g.device.type} random generator cannot continue "
                         f"on {device.type}", field="state")


# ------------------------------------------------------------ the source
def migrate(state: State, msg: Migrate, progress: Callable[..., None]) -> dict[str, Any]:
    host = state.http.host
    served = host.models.get(msg.name) if host is not None else None
    if served is None or served.model.engine is None:
        raise NotFound(f"model {msg.name} is not being served here",
                       hint="sllmctl ps lists what runs")
    engine = served.model.engine
    running = [r for _, r in engine.at_step(engine.scheduler.running).result(STEP_S)]
    if msg.request is not None:
        running = [r for r in running if r.id == msg.request]
        if not running:
            raise NotFound(f"no running request {msg.request} of {msg.name}")
    head = {"name": msg.name, "to": msg.to, "mode": "tokens"}
    if msg.dry_run:
        return head | {"dry_run": True, "requests": [
            {"id": r.id, "context": len(r.context()), "tokens": len(r.tokens)}
            for r in running]}
    peer = _peer(state, msg.to)
    moves = [Move(engine, r, peer, msg.name) for r in running]
    threads = [threading.Thread(target=m.run, name="sllmctl-migrate", daemon=True)
               for m in moves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return head | {"dry_run": False, "requests": [m.report for m in moves]}


def _peer(state: State, name: str) -> Client:
    """A client for the hosts file's `name`, speaking with this daemon's own key pair (the
    destination's allow-list gives it the peer role)."""
    pair = state.guard.pair if state.guard is not None else None
    if pair is None:
        raise SllmError("migration needs this daemon to run with keys",
                        hint="sllmctl daemon stop; sllmctl daemon start --keys")
    host = hosts.resolve(name)
    assert host is not None
    return Client(host.endpoint, Remote(host, pair))


class PeerCall:
    """One round's `migrate_in`, on a thread of its own: the destination's tokens, then its
    reply or the error that ended the call, in order, through `items()`."""

    def __init__(self, peer: Client, args: dict[str, Any]) -> None:
        self.peer, self.args = peer, args
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.started = threading.Event()  # the first token, or the end
        threading.Thread(target=self._run, name="sllmctl-migrate-peer", daemon=True).start()

    def _run(self) -> None:
        try:
            self.q.put(("reply", self.peer.call("migrate_in", self.args, on_event=self._event,
                                                first_answer=PEER_FIRST_S)))
        except BaseException as e:
            self.q.put(("error", e))
        self.started.set()

    def _event(self, msg: dict[str, Any]) -> None:
        data = msg.get("data")
        if not isinstance(data, dict) or type(data.get("at")) is not int:
            return  # a heartbeat, or the `queued` event
        tokens = data.get("tokens")
        for k, token in enumerate(tokens if isinstance(tokens, list) else []):
            self.q.put(("token", (data["at"] + k, token)))
        self.started.set()

    def items(self) -> Iterator[tuple[str, Any]]:
        while True:
            kind, value = self.q.get()
            yield kind, value
            if kind != "token":
                return


class Move:
    """One request's migration; `report` says what became of it."""

    def __init__(self, engine: Any, req: Request, peer: Client, name: str) -> None:
        self.engine, self.req, self.peer, self.name = engine, req, peer, name
        self.id = secrets.token_hex(8)
        self.first = threading.Event()  # the first token relayed, or the request back here
        self.t_first = 0.0
        self.report: dict[str, Any] = {"id": req.id, "mode": "tokens", "status": "stayed",
                                       "rounds": 0, "tokens_recomputed": 0}

    def run(self) -> None:
        start = time.perf_counter()
        try:
            call = self._rounds()
        except Exception as e:  # refused or unreachable before the hand-over: stays here
            self.report["error"] = e.message if isinstance(e, SllmError) else repr(e)[:200]
            self._end_peer()
            return
        if call is None:
            self.report["status"] = "completed"  # it ended during the migration
            self._end_peer()
            return
        stopped = time.perf_counter()
        self.report["handed_over_at"] = len(self.req.tokens)
        threading.Thread(target=self._relay, args=(call,), name="sllmctl-relay",
                         daemon=True).start()
        self.first.wait(HANDOVER_S)
        if self.t_first:
            self.report.update(status="moved", pause_s=round(self.t_first - stopped, 4),
                               total_s=round(self.t_first - start, 4))

    def _snapshot(self) -> dict[str, Any] | None:
        """The request's state between two steps; None once it has ended."""
        d: dict[str, Any] = self.engine.at_step(self.req.to_dict).result(STEP_S)
        return None if d["finish"] is not None or self.req.cancelled.is_set() else d

    def _rounds(self) -> PeerCall | None:
        """Send snapshots until the destination is at most GAP tokens behind, then let the
        source's copy go; the last round's call, or None if the request ended first."""
        while True:
            d = self._snapshot()
            if d is None:
                return None
            self.report["rounds"] += 1
            call = PeerCall(self.peer, {"migration": self.id, "name": self.name,
                                        "state": json.dumps(d),
                                        "round": self.report["rounds"]})
            if not call.started.wait(HANDOVER_S):
                raise SllmError("the destination sent no token in time")
            if not call.q.empty() and call.q.queue[0][0] == "error":
                error = call.q.get()[1]
                raise error if isinstance(error, SllmError) else SllmError(str(error))
            self.report["tokens_recomputed"] += len(d["prompt"]) + len(d["tokens"])
            gap = len(self.req.tokens) - len(d["tokens"])
            if gap <= GAP or self.report["rounds"] >= ROUNDS:
                break
        detached = self.engine.at_step(lambda: self.engine.scheduler.detach(self.req))
        return call if detached.result(STEP_S) else None

    def _relay(self, call: PeerCall) -> None:
        """The destination's tokens into the client's stream, from where the source stopped;
        the request comes back here if the destination fails before its end."""
        req, mine = self.req, list(self.req.tokens)
        for kind, value in call.items():
            if req.cancelled.is_set():  # the client left, or its text met a stop string
                self._end_peer()
                req.end("abort")
                return self.first.set()
            if kind == "token":
                at, token = value
                if at < len(mine) and token == mine[at]:
                    continue
                if at != len(req.tokens) or type(token) is not int:
                    break  # another continuation than the source's: take it back
                req.tokens.append(token)
                req.out.put(token)
                if not self.t_first:
                    self.t_first = time.perf_counter()
                    self.first.set()
            elif kind == "reply" and value.get("finish") in ("stop", "length"):
                req.end(value["finish"])
                return self.first.set()
            else:
                log.warning("migration %s: %s; the request goes on here", self.id,
                            getattr(value, "message", value))
                break
        self._take_back()

    def _take_back(self) -> None:
        self._end_peer()
        self.report["status"] = "stayed"
        try:
            self.engine.scheduler.add(self.req)  # rebuilt by prefill from its tokens so far
        except SllmError as e:
            self.req.end("error", e)
        self.first.set()

    def _end_peer(self) -> None:
        with contextlib.suppress(SllmError):  # gone: nothing of it to free
            self.peer.call("migrate_end", {"migration": self.id}, first_answer=2.0)
