"""The daemon process: one ROUTER socket and the dispatch table below.

Fast operations are answered in the socket loop; long jobs run on a bounded pool of worker
threads that stream progress back through an inproc socket. Whatever a message holds, the
loop answers it with a reply (an error code for anything malformed, `internal` for an
exception nobody expected) and keeps serving. The state every handler acts on is one
`State` (state.py). Who may ask what is the Guard's (guard.py): with keys, every request's
sender role is checked against its operation's before its arguments are even read.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from sllmctl import paths
from sllmctl.daemon import guard, ops_daemon, ops_migrate, ops_pull, ops_serving, ops_tiers
from sllmctl.daemon.bandwidth import sweep
from sllmctl.daemon.sizes import dram_pool
from sllmctl.daemon.state import Job, Settings, State
from sllmctl.errors import SllmError
from sllmctl.wire import envelope, messages
from sllmctl.wire.codes import INTERNAL, BadRequest, Busy, Internal, code_of
from sllmctl.wire.envelope import MAX_MESSAGE, Envelope, Refused
from sllmctl.wire.messages import Message
from sllmctl.wire.runtime import (
    default_endpoint,
    ensure_runtime_dir,
    remove_connection_file,
    write_connection_file,
)

log = logging.getLogger("sllmctl.daemon")
REPLIES = "inproc://replies"
HEARTBEAT_S = 0.5
HOUSEKEEPING_S = 5.0
WORKERS = 8  # long jobs running at once
QUEUE = 32  # long jobs waiting for a worker; past that a request gets `busy`
BATCH = 64  # requests read from the socket before the loop forwards replies again

Handler = Callable[[State, Any, Callable[[str, int, int], None]], Any]

# every operation, the module that handles it, read top to bottom
HANDLERS: dict[str, Handler] = {
    "ping": ops_daemon.ping,
    "status": ops_daemon.status,  # fast
    "shutdown": ops_daemon.shutdown,  # fast
    "reload": ops_daemon.reload,  # fast: the allow-list, as SIGHUP
    "warm": ops_tiers.warm,
    "unload": ops_tiers.unload,
    "measure": ops_tiers.measure,
    "serve": ops_serving.serve,
    "unserve": ops_serving.unserve,
    "pull": ops_pull.pull,
    # live migration, token mode
    "migrate": ops_migrate.migrate,  # admin: move a model's running requests to a peer
    "migrate_in": ops_migrate.migrate_in,  # peer: rebuild one and stream its tokens back
    "migrate_end": ops_migrate.migrate_end,  # peer, fast: let a migrated request go
}
assert set(HANDLERS) == set(messages.OPS)


class Daemon:
    def __init__(self, state: State, mode: guard.Mode = "local") -> None:
        self.state = state
        endpoint = state.settings.endpoint
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)  # larger: the peer is dropped
        try:
            self.guard = state.guard = guard.secure(self.ctx, self.router, mode, endpoint)
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        self.hup = threading.Event()  # SIGHUP: reload the allow-list in the loop
        try:
            self.router.bind(endpoint)
        except zmq.ZMQError as e:
            self.guard.stop()
            self.ctx.destroy(linger=500)  # let the reply to `shutdown` go out
            hint = ("another program uses that address; pick another --listen port"
                    if e.errno == zmq.EADDRINUSE else "check --listen")
            raise SllmError(f"cannot listen on {endpoint}: {zmq.strerror(e.errno or 0)}",
                            hint=hint) from None
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(REPLIES)
        self.local = threading.local()
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="sllmctl-job")

    # ------------------------------------------------------------ the socket loop
    def serve(self) -> None:
        for target, name in ((self.state.start_tiers, "init"), (self._heartbeat, "heartbeat"),
                             (self._housekeeping, "housekeeping")):
            threading.Thread(target=target, name=f"sllmctl-{name}", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        log.info("listening on %s (pid %d)", self.state.settings.endpoint, os.getpid())
        while not self.state.stop.is_set():
            events = dict(poller.poll(200))
            if self.hup.is_set():
                self._reload()
            if self.replies in events:
                self._forward_replies()
            if self.router in events:
                for _ in range(BATCH):
                    try:
                        # copy=False: the frames carry the sender's User-Id (its key)
                        identity, *frames = self.router.recv_multipart(zmq.NOBLOCK,
                                                                       copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._answer(identity, frames)
                    except Exception:  # even the error reply failed: drop this request
                        log.exception("a request could not be answered")
        self._shutdown()

    def _forward_replies(self) -> None:
        while True:
            try:
                self.router.send_multipart(self.replies.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _reload(self) -> None:
        self.hup.clear()
        try:
            log.info("SIGHUP: %s", self.guard.reload())
        except SllmError as e:  # a bad list: the one in force stays; a new host key: a restart
            log.error("SIGHUP: %s", e.message)

    def _answer(self, id_frame: zmq.Frame, received: list[zmq.Frame]) -> None:
        """Answer one request; nothing it holds may stop the loop."""
        rid: str | None = None
        identity = id_frame.bytes
        try:
            frames = [f.bytes for f in received]
            env = Envelope.decode(frames, messages.OPS)
            rid = env.id
            self.guard.check(env.op, messages.MESSAGES[env.op].roles, received[-1])
            msg = messages.decode(env.op, env.args)
            self._dispatch(identity, rid, msg)
        except Refused as e:
            self.router.send_multipart([identity, *envelope.reply_error(
                e.rid, code_of(e.error), e.error)])
        except SllmError as e:
            self.router.send_multipart([identity, *envelope.reply_error(rid, code_of(e), e)])
        except Exception as e:
            log.exception("request %s could not be answered", rid)
            self.router.send_multipart([identity, *_internal(rid, e)])

    def _dispatch(self, identity: bytes, rid: str, msg: Message) -> None:
        with self.state.jobs_lock:
            if rid in self.state.jobs:
                raise BadRequest(f"request id {rid!r} is already in flight", field="id")
            if not msg.fast:
                if len(self.state.jobs) >= WORKERS + QUEUE:
                    raise Busy(f"the daemon has {len(self.state.jobs)} long jobs in flight, "
                               f"its limit", hint="try again once some have finished "
                               "(sllmctl ps lists them)")
                self.state.jobs[rid] = Job(rid, msg.op, msg.public_args(), identity)
        if msg.fast:
            self.router.send_multipart([identity, *self._run(rid, msg, lambda *a: None)])
            return
        self._send(identity, envelope.progress(rid, "queued", 0, 0))
        self.workers.submit(self._job, identity, rid, msg)

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        """Send from any thread: through this thread's PUSH socket to the loop."""
        sock = getattr(self.local, "push", None)
        if sock is None:
            sock = self.local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(REPLIES)
        sock.send_multipart([identity, *frames])

    def _job(self, identity: bytes, rid: str, msg: Message) -> None:
        last: list[Any] = [0.0, None]  # time and stage of the last event sent

        def progress(stage: str, done: int, total: int, data: Any = None) -> None:
            if data is not None:  # streamed results (migrate_in's tokens): sent at once
                self._send(identity, envelope.progress(rid, stage, done, total, data))
                return
            self.state.progress(rid, stage, done, total)
            now = time.monotonic()
            if now - last[0] >= 0.1 or stage != last[1] or (total and done == total):
                last[0], last[1] = now, stage
                self._send(identity, envelope.progress(rid, stage, done, total))

        try:
            self._send(identity, self._run(rid, msg, progress))
        finally:
            with self.state.jobs_lock:
                self.state.jobs.pop(rid, None)

    def _run(self, rid: str, msg: Message, progress: Any) -> list[bytes]:
        try:
            return envelope.reply_ok(rid, HANDLERS[msg.op](self.state, msg, progress))
        except SllmError as e:
            return envelope.reply_error(rid, code_of(e), e)
        except Exception as e:
            log.exception("request %s (%s) failed", rid, msg.op)
            return _internal(rid, e)

    def _heartbeat(self) -> None:
        """Every half second, tell each waiting client that its job is alive."""
        while not self.state.stop.wait(HEARTBEAT_S):
            with self.state.jobs_lock:
                jobs = [(j.identity, j.id, j.stage, j.done, j.total)
                        for j in self.state.jobs.values()]
            for identity, rid, stage, done, total in jobs:
                self._send(identity, envelope.progress(rid, stage, done, total))

    def _housekeeping(self) -> None:
        while not self.state.stop.wait(HOUSEKEEPING_S):
            try:
                ops_serving.housekeeping(self.state)
            except Exception:
                log.exception("housekeeping failed")

    def _shutdown(self) -> None:
        log.info("shutting down")
        self.workers.shutdown(wait=False, cancel_futures=True)
        sweep(paths.models_dir(), mine=True)  # a measurement cut short
        remove_connection_file()
        self.router.close(linger=0)
        self.guard.stop()
        endpoint = self.state.settings.endpoint
        if endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
        self.ctx.destroy(linger=0)


def _internal(rid: str | None, e: Exception) -> list[bytes]:
    return envelope.reply_error(rid, INTERNAL, Internal(
        f"{type(e).__name__}: {str(e)[:200]}", hint="see the daemon log"))


def _answers(endpoint: str) -> bool:
    """Whether a daemon already answers at `endpoint` (so its socket must not be taken)."""
    from sllmctl.wire.client import Client

    try:
        Client(endpoint).call("status", first_answer=0.5)
    except SllmError:
        return False
    return True


def run(endpoint: str | None, pool: str, measure_bytes: int, want_keys: bool = False,
        insecure: bool = False) -> None:
    """Run the daemon in this process until SIGTERM, SIGINT or a shutdown request. Bad
    settings (and a TCP address beyond loopback without keys) are refused before anything
    is bound; SIGHUP reloads the allow-list."""
    settings = Settings(endpoint or default_endpoint(), pool, dram_pool(pool), measure_bytes)
    mode = guard.plan(settings.endpoint, want_keys, insecure)
    ensure_runtime_dir()
    endpoint = settings.endpoint
    if endpoint.startswith("ipc://") and Path(endpoint[len("ipc://"):]).exists():
        if _answers(endpoint):
            raise SllmError(f"a daemon already answers on {endpoint}",
                            hint="sllmctl daemon stop")
        Path(endpoint[len("ipc://"):]).unlink()  # left by a crashed daemon
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    daemon = Daemon(State(settings), mode)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.state.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: daemon.hup.set())
    write_connection_file(endpoint, daemon.guard.pair.public if daemon.guard.pair else None)
    daemon.serve()
    logging.shutdown()
    os._exit(0)  # jobs still running on worker threads end with the process
