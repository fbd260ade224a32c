"""The daemon process: one ROUTER socket, fast requests answered in the socket loop, long
jobs on worker threads that stream progress events back through an inproc socket.

State (the tiers, the jobs in flight) lives here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from sllmctl import __version__, paths
from sllmctl.daemon import protocol as proto
from sllmctl.daemon.bandwidth import load_cached, measure, save
from sllmctl.daemon.client import connection_file
from sllmctl.daemon.serving import ServingMixin, _name
from sllmctl.daemon.tiers import BadArguments
from sllmctl.errors import CorruptCheckpoint, NotFound, SllmError

log = logging.getLogger("sllmctl.daemon")
REPLIES = "inproc://replies"
HEARTBEAT_S = 0.5
WORKERS = 8


def default_endpoint() -> str:
    return f"ipc://{paths.runtime_dir() / 'daemon.sock'}"


def ensure_runtime_dir() -> Path:
    d = paths.runtime_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.stat()
    if st.st_uid != os.getuid():
        raise SllmError(f"runtime folder {d} belongs to another user",
                        hint="set SLLMCTL_RUNTIME_DIR to a folder of your own")
    os.chmod(d, 0o700)
    return d


def write_connection_file(endpoint: str) -> Path:
    path = connection_file()
    tmp = path.with_name(f".daemon.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"endpoint": endpoint, "pid": os.getpid(),
                   "protocol_version": proto.PROTOCOL_VERSION, "version": __version__,
                   "started_at": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _code(e: SllmError) -> str:
    from sllmctl.daemon.tiers import BadArguments, DoesNotFit, NoGpu

    table: list[tuple[type[SllmError], str]] = [
        (NotFound, proto.NOT_FOUND), (CorruptCheckpoint, proto.CORRUPT),
        (DoesNotFit, proto.DOES_NOT_FIT), (NoGpu, proto.NO_GPU),
        (BadArguments, proto.BAD_REQUEST)]
    return next((code for cls, code in table if isinstance(e, cls)), proto.FAILED)


class Daemon(ServingMixin):
    def __init__(self, endpoint: str, dram_pool: str, measure_bytes: int) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            self.router.bind(endpoint)
        except zmq.ZMQError as e:
            self.ctx.destroy(linger=500)  # let the reply to `shutdown` go out
            hint = ("another program uses that address; pick another --listen port"
                    if e.errno == zmq.EADDRINUSE else "check --listen")
            raise SllmError(f"cannot listen on {endpoint}: {zmq.strerror(e.errno or 0)}",
                            hint=hint) from None
        self.replies = self.ctx.socket(zmq.PULL)
        self.replies.bind(REPLIES)
        self.local = threading.local()
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="sllmctl-job")
        self.jobs: dict[str, dict[str, Any]] = {}
        self.jobs_lock = threading.Lock()
        self.stop = threading.Event()
        self.started = time.time()
        self.dram_pool = dram_pool
        self.measure_bytes = measure_bytes
        self.ready = threading.Event()
        self.init_error: str | None = None
        self.dram: Any = None
        self.gpu: Any = None
        self.bandwidth: dict[str, Any] | None = load_cached(self.bandwidth_file)
        self.host: Any = None  # ModelHost, made with the HTTP listener
        self.http: Any = None
        self.http_address: str | None = None
        self.http_lock = threading.Lock()

    @property
    def bandwidth_file(self) -> Path:
        return paths.home() / "bandwidth.json"

    # ------------------------------------------------------------ start-up, in background
    def _init_tiers(self) -> None:
        try:
            import torch

            from sllmctl.daemon.gpu_tier import GpuTier
            from sllmctl.daemon.tiers import DramTier, parse_size, total_ram
            from sllmctl.store.gpu_checksums import warm_up

            self.gpu = GpuTier()
            self.gpu.refresh()  # each CUDA context now, not in `status`
            for d in range(self.gpu.count):  # the loader's kernels, not in the first load
                warm_up(d)
            pinned = torch.cuda.is_available()
            self.dram = DramTier(parse_size(self.dram_pool, total_ram()), pinned)
            log.info("tiers ready: DRAM pool %.2f GB (pinned: %s), %d GPU(s)",
                     self.dram.capacity / 1e9, pinned, self.gpu.count)
            from sllmctl.engine import warmup  # kernels compiled before the first request
            log.info("warm-up: %s", warmup.at_daemon_start(paths.home(), self.gpu.count))
        except Exception as e:
            self.init_error = f"{type(e).__name__}: {e}"
            log.exception("tier initialisation failed")
        finally:
            self.ready.set()
        if self.bandwidth is None and self.init_error is None:
            self._measure()
        self._use_bandwidth()

    def _measure(self) -> dict[str, Any]:
        data = measure(paths.models_dir(), self.gpu.count if self.gpu else 0,
                       self.measure_bytes)
        self.bandwidth = data
        save(self.bandwidth_file, data)
        self._use_bandwidth()
        return data

    def _use_bandwidth(self) -> None:
        """The DRAM tier weighs reload cost by the disk's measured read rate."""
        rate = ((self.bandwidth or {}).get("disk") or {}).get("GBps")
        if self.dram is not None and isinstance(rate, int | float) and rate > 0:
            self.dram.reload_rate = rate * 1e9

    def _tiers(self) -> None:
        self.ready.wait()
        if self.init_error:
            raise SllmError(f"the daemon's tiers failed to start: {self.init_error}",
                            hint="see the daemon log in the runtime folder")

    # ------------------------------------------------------------ the socket loop
    def serve(self) -> None:
        threading.Thread(target=self._init_tiers, name="sllmctl-init", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="sllmctl-heartbeat", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        log.info("listening on %s (pid %d)", self.endpoint, os.getpid())
        while not self.stop.is_set():
            events = dict(poller.poll(200))
            if self.replies in events:
                while True:
                    try:
                        self.router.send_multipart(self.replies.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.router in events:
                while True:
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch(frames[0], frames[1:])
        self._shutdown()

    def _dispatch(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            req = proto.Request.decode(frames)
        except proto.ProtocolError as e:
            rid = proto.request_id(frames)
            self.router.send_multipart([identity, *proto.reply_error(rid, e.code, e.message,
                                                                     e.hint)])
            return
        if req.op in proto.FAST_OPS:
            self.router.send_multipart([identity, *self._run(req, lambda *a: None)])
            return
        with self.jobs_lock:
            self.jobs[req.id] = {"id": req.id, "op": req.op, "args": req.args,
                                 "identity": identity, "stage": "queued", "done": 0,
                                 "total": 0, "started": time.time()}
        self._send(identity, proto.progress(req.id, "queued", 0, 0))
        self.workers.submit(self._job, identity, req)

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        sock = getattr(self.local, "push", None)
        if sock is None:
            sock = self.local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(REPLIES)
        sock.send_multipart([identity, *frames])

    def _job(self, identity: bytes, req: proto.Request) -> None:
        last: list[Any] = [0.0, None]  # time and stage of the last event sent

        def progress(stage: str, done: int, total: int) -> None:
            with self.jobs_lock:
                self.jobs[req.id].update(stage=stage, done=done, total=total)
            now = time.monotonic()
            if now - last[0] >= 0.1 or stage != last[1] or (total and done == total):
                last[0], last[1] = now, stage
                self._send(identity, proto.progress(req.id, stage, done, total))

        try:
            self._send(identity, self._run(req, progress))
        finally:
            with self.jobs_lock:
                self.jobs.pop(req.id, None)

    def _heartbeat(self) -> None:
        """Every half second, tell each waiting client that its job is alive."""
        ticks = 0
        while not self.stop.wait(HEARTBEAT_S):
            ticks += 1
            if self.host is not None and ticks % 10 == 0:
                for name in self.host.reap():
                    log.info("unloaded %s after its keep-alive", name)
            with self.jobs_lock:
                jobs = [(j["identity"], j["id"], j["stage"], j["done"], j["total"])
                        for j in self.jobs.values()]
            for identity, rid, stage, done, total in jobs:
                self._send(identity, proto.progress(rid, stage, done, total))

    def _run(self, req: proto.Request, progress: Any) -> list[bytes]:
        try:
            result = getattr(self, f"op_{req.op}")(req.args, progress)
            return proto.reply_ok(req.id, result)
        except SllmError as e:
            return proto.reply_error(req.id, _code(e), e.message, e.hint)
        except Exception as e:
            log.exception("request %s failed", req.op)
            return proto.reply_error(req.id, proto.INTERNAL, f"{type(e).__name__}: {e}",
                                     "see the daemon log in the runtime folder")

    def _shutdown(self) -> None:
        log.info("shutting down")
        self.workers.shutdown(wait=False, cancel_futures=True)
        try:
            info = json.loads(connection_file().read_text())
            if info.get("pid") == os.getpid():
                connection_file().unlink()
        except (OSError, ValueError):
            pass
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        self.ctx.destroy(linger=0)

    # ------------------------------------------------------------ operations
    def op_ping(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        delay = float(args.get("delay", 0))
        deadline = time.monotonic() + min(delay, 3600)
        while time.monotonic() < deadline and not self.stop.is_set():
            progress("waiting", 0, 0)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return {"pong": True, "pid": os.getpid()}

    def op_shutdown(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        self.stop.set()
        return {"stopping": True, "pid": os.getpid()}

    def op_status(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        with self.jobs_lock:
            jobs = [{k: v for k, v in j.items() if k != "identity"} for j in self.jobs.values()]
        ready = self.ready.is_set() and self.init_error is None
        return {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "protocol_version": proto.PROTOCOL_VERSION, "endpoint": self.endpoint,
                       "started_at": self.started, "uptime_s": round(time.time() - self.started, 3),
                       "state": "ready" if ready else (self.init_error or "starting"),
                       "store": str(paths.models_dir())},
            "dram": self.dram.status() if ready else None,
            "gpu": self.gpu.status() if ready else None,
            "jobs": jobs,
            "bandwidth": self.bandwidth,
            "http": self.http_address,
            "serving": self.host.status() if self.host is not None else [],
        }

    def op_measure(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        self._tiers()
        progress("measuring", 0, 1)
        return self._measure()

    def op_warm(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        from sllmctl.store.store import Store

        name, tier, gpu = _name(args), _tier(args, "dram"), args.get("gpu")
        if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, int)):
            raise BadArguments(f"gpu must be an integer, not {gpu!r}")
        self._tiers()
        model = Store().get(name)
        start = time.perf_counter()
        if tier == "dram":
            _, fresh = self.dram.warm(model, progress)
            return {"name": model.name, "tier": "dram", "seconds": time.perf_counter() - start,
                    "bytes": model.manifest.total_bytes,
                    "loaded_from": "disk" if fresh else "resident"}
        progress("loading", 0, model.manifest.total_bytes)
        e = self.gpu.warm(model, gpu, self.dram)
        return {"name": model.name, "tier": "gpu", "gpu": e.device,
                "seconds": time.perf_counter() - start, "load_seconds": e.load_seconds,
                "loaded_from": e.loaded_from, "bytes": e.nbytes,
                "timings": e.loading.timings if e.loading else {}}

    def op_unload(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        name, tier = _name(args), _tier(args, None)
        self._tiers()
        removed = []
        if tier in (None, "gpu") and self.gpu.unload(name):
            removed.append("gpu")
        if tier in (None, "dram") and self.dram.unload(name):
            removed.append("dram")
        if not removed:
            raise NotFound(f"model {name} is not resident"
                           + (f" in the {tier} tier" if tier else ""),
                           hint="sllmctl ps lists resident models")
        return {"name": name, "unloaded": removed}


def _tier(args: dict[str, Any], default: str | None) -> str | None:
    tier = args.get("tier", default)
    if tier is None and default is None:
        return None
    if tier not in ("dram", "gpu"):
        raise BadArguments(f"unknown tier {tier!r}", hint="use dram or gpu")
    return str(tier)


def _answers(endpoint: str) -> bool:
    """Whether a daemon already answers at `endpoint` (so its socket must not be taken)."""
    from sllmctl.daemon.client import Client

    try:
        Client(endpoint).call("status", first_answer=0.5)
    except SllmError:
        return False
    return True


def run(endpoint: str | None, dram_pool: str, measure_bytes: int) -> None:
    """Run the daemon in this process until SIGTERM, SIGINT or a shutdown request."""
    ensure_runtime_dir()
    endpoint = endpoint or default_endpoint()
    if endpoint.startswith("ipc://") and Path(endpoint[len("ipc://"):]).exists():
        if _answers(endpoint):
            raise SllmError(f"a daemon already answers on {endpoint}",
                            hint="sllmctl daemon stop")
        Path(endpoint[len("ipc://"):]).unlink()  # left by a crashed daemon
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    daemon = Daemon(endpoint, dram_pool, measure_bytes)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    write_connection_file(endpoint)
    daemon.serve()
    logging.shutdown()
    os._exit(0)  # jobs still running on worker threads end with the process
