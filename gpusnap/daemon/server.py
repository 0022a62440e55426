"""gpusnapd: the HTTP/JSON API on a unix socket (aiohttp), access control, start-up
clean-up, graceful shutdown. Operations run in forked children (daemon/ops.py).

    GET  /v1/status                 version, store, operations in flight       (read)
    GET  /v1/snapshots              the snapshots (as `gpusnap ls --json`)     (read)
    GET  /v1/snapshots/{ref}        one manifest (as `gpusnap inspect --json`) (read)
    POST /v1/dump      DumpRequest fields        -> the dump's summary ("seed": absolute paths)
    POST /v1/restore   RestoreRequest fields     -> the restore's result
    POST /v1/warm      {"snapshots": [...]}      -> prefetched image caches
    POST /v1/run       {"argv", "cwd", "env"}    -> NDJSON stream: {"op"}, {"stdout"},
                                                    {"stderr"}, then {"exit_code"}
    POST /v1/ops/{op}/cancel                     -> the operation is interrupted (undone)

Access: the socket is root's (0600) unless --group names a group (0660, that group),
and every connection's peer is checked with SO_PEERCRED: uid 0 may do everything, a
member of the group only what is marked (read) above, and `ls`/`inspect` through /v1/run
on the daemon's own store. A client that disconnects interrupts its operation.
"""

from __future__ import annotations

import asyncio
import gc
import grp
import json
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass

from aiohttp import web

from .. import VERSION
from ..errors import GpusnapError, UsageError
from . import api, ops
from .gpufacts import GpuFacts
from .logs import setup_logging
from .metrics import Metrics
from .workdirs import DaemonWorkdir

log = logging.getLogger("gpusnapd")


@dataclass
class Config:
    socket: str
    store: api.Store
    group: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    shutdown_timeout: float = 300.0


def _readonly(handler):
    handler.readonly = True
    return handler


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.group_gid = grp.getgrnam(cfg.group).gr_gid if cfg.group else None
        self.metrics = Metrics()
        self.children: dict[str, ops.Child] = {}
        self.stopping = False
        self.started = time.monotonic()
        self.workdir = None                     # a DaemonWorkdir, once serving
        self.gpus = GpuFacts()                  # NVML kept open in a helper (gpufacts.py)

    # -- access ------------------------------------------------------------------
    def _role(self, request) -> tuple[str | None, int, int]:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None:
            return None, -1, -1
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid == 0:
            return "admin", pid, uid
        if self.group_gid is not None and self.group_gid in _groups(pid, gid):
            return "read", pid, uid
        return None, pid, uid

    @web.middleware
    async def access(self, request, handler):
        role, pid, uid = self._role(request)
        request["role"] = role
        readonly = getattr(getattr(handler, "__func__", handler), "readonly", False)
        if role is None or (role == "read" and not readonly and request.path != "/v1/run"):
            log.info("refused", extra={"fields": {"peer_pid": pid, "peer_uid": uid, "path": request.path}})
            return _error(403, "Forbidden", f"uid {uid} may not {request.method} {request.path}",
                          hint="root only; --group gives a group read-only queries")
        return await handler(request)

    # -- read-only queries (in the daemon) ---------------------------------------
    @_readonly
    async def status(self, request):
        return web.json_response({
            "version": VERSION, "pid": os.getpid(), "socket": self.cfg.socket,
            "store": self.cfg.store.path, "uptime_s": round(time.monotonic() - self.started, 1),
            "rss_bytes": _rss(), "fds": len(os.listdir("/proc/self/fd")),
            "workdir": self.workdir.path if self.workdir else None,
            "workdir_entries": self.workdir.leftovers() if self.workdir else [],
            "operations": [c.describe() for c in self.children.values()],
            "gpu_facts": self.gpus.describe(), "via": "daemon"})

    @_readonly
    async def snapshots(self, request):
        return _guard(lambda: web.json_response(api.snapshots(self.cfg.store)))

    @_readonly
    async def inspect(self, request):
        return _guard(lambda: web.json_response(api.inspect(self.cfg.store, request.match_info["ref"])))

    # -- operations (forked children) ----------------------------------------------
    async def _spawn(self, kind, fn, *args, env=None) -> ops.Child:
        if self.stopping:
            raise web.HTTPServiceUnavailable(text="gpusnapd is shutting down")
        setup = None
        if kind in ("restore", "resume", "switch"):       # plan with the helper's GPU facts
            gpus = await self.gpus.ask()
            setup = (lambda: api.use_host_gpus(gpus)) if gpus else None
        child = ops.spawn(kind, fn, *args, env=env, setup=setup)
        self.children[child.op_id] = child
        self.metrics.in_flight.set(len(self.children))
        log.info("started", extra={"fields": {"op": child.op_id, "pid": child.pid}})
        return child

    async def _finish(self, child: ops.Child) -> None:
        """Wait for the child; a client that goes away interrupts it (its undo runs)."""
        try:
            await asyncio.shield(child.task)
        except asyncio.CancelledError:
            log.info("client gone: interrupting", extra={"fields": {"op": child.op_id}})
            child.interrupt()
            raise
        finally:
            if child.task.done():
                self._done(child)
            else:
                child.task.add_done_callback(lambda _t: self._done(child))

    def _done(self, child: ops.Child) -> None:
        if self.children.pop(child.op_id, None) is None:
            return
        self.metrics.in_flight.set(len(self.children))
        secs = time.monotonic() - child.started
        result = child.result or {}
        ok = result.get("ok")
        emitted = ok.get("emitted", [ok]) if isinstance(ok, dict) else []
        self.metrics.observe(child.kind, secs, child.exit_code, emitted)
        answered = round(child.answered - child.started, 4) if child.answered else None
        log.info("finished", extra={"fields": {"op": child.op_id, "exit_code": child.exit_code,
                                               "seconds": round(secs, 4), "answered_s": answered,
                                               "error": (result.get("error") or {}).get("error")}})

    async def engine_op(self, request):
        kind = request.match_info["op"]
        fn = {"dump": api.run_dump, "restore": api.run_restore, "warm": api.run_warm}.get(kind)
        if fn is None:
            raise web.HTTPNotFound()
        body = await _json_body(request)
        child = await self._spawn(kind, fn, body, self.cfg.store)
        await self._finish(child)
        if "ok" in child.result:
            return web.json_response(child.result["ok"])
        err = child.result["error"]
        return web.json_response({**err, "via": "daemon"}, status=_http_status(err["exit_code"]))

    async def run(self, request):
        """A CLI command line, its output streamed as NDJSON events."""
        body = await _json_body(request)
        argv = [str(a) for a in body.get("argv", [])]
        command, store = api.command_of(argv)
        if command not in api.FORWARDED:
            return _error(400, "UsageError", f"the daemon does not run `{command}`")
        env = {k: str(v) for k, v in (body.get("env") or {}).items()
               if k.startswith("GPUSNAP_") and k not in ("GPUSNAP_SOCKET", "GPUSNAP_WORKDIR")}
        if request["role"] != "admin":
            argv = self._read_only_argv(command, argv, store or env.get("GPUSNAP_STORE"))
            if argv is None:
                return _error(403, "Forbidden", f"only root may run `{command}` through the daemon",
                              hint="group members may run ls and inspect on the daemon's store")
            env = {}
        child = await self._spawn(command, api.run_cli, argv, str(body.get("cwd") or "/"), env=env)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(_line({"op": child.op_id, "pid": child.pid}))
        streaming = asyncio.ensure_future(self._stream(child, resp))
        try:
            await self._finish(child)
        except asyncio.CancelledError:
            streaming.cancel()
            raise
        await streaming
        return resp

    def _read_only_argv(self, command: str, argv: list[str], store: str | None) -> list[str] | None:
        """A group member's ls/inspect, on the daemon's store with the daemon's key only."""
        if command not in api.READ_ONLY or "--key-file" in argv or any(a.startswith("--key-file=") for a in argv):
            return None
        if store and os.path.abspath(store) != os.path.abspath(self.cfg.store.path):
            return None
        key = ["--key-file", self.cfg.store.key_file] if self.cfg.store.key_file else []
        return ["--store", self.cfg.store.path, *key, *argv]

    async def _stream(self, child: ops.Child, resp) -> None:
        while True:
            kind, value = await child.events.get()
            if kind == "exit":
                await resp.write(_line({"exit_code": value}))
                return
            await resp.write(_line({kind: value.decode(errors="replace")}))

    async def cancel(self, request):
        child = self.children.get(request.match_info["op"])
        if child is None:
            raise web.HTTPNotFound(text="no such operation running")
        child.interrupt()
        return web.json_response({"cancelled": child.op_id})

    async def metrics_page(self, request):
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.access])
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/snapshots", self.snapshots)
        app.router.add_get("/v1/snapshots/{ref}", self.inspect)
        app.router.add_post("/v1/run", self.run)
        app.router.add_post("/v1/ops/{op}/cancel", self.cancel)
        app.router.add_post("/v1/{op}", self.engine_op)
        return app

    async def shutdown(self) -> None:
        """SIGTERM: no new operations; those in flight are interrupted (their undo runs)
        and waited for, so each client still gets its answer."""
        self.stopping = True
        running = list(self.children.values())
        log.info("stopping", extra={"fields": {"in_flight": [c.op_id for c in running]}})
        for child in running:
            child.interrupt()
        if running:
            await asyncio.wait([c.task for c in running], timeout=self.cfg.shutdown_timeout)
        await asyncio.sleep(0.2)                # the handlers write the last lines
        self.gpus.stop()


def _groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _error(status: int, name: str, message: str, hint: str | None = None):
    return web.json_response({"error": name, "message": message, "hint": hint,
                              "exit_code": 2 if status == 400 else 1, "via": "daemon"}, status=status)


def _http_status(exit_code: int) -> int:
    return {2: 400, 3: 404, 4: 409, 130: 499}.get(exit_code, 500 if exit_code == 1 else 409)


def _guard(make):
    try:
        return make()
    except GpusnapError as exc:
        return web.json_response({**exc.to_dict(), "via": "daemon"}, status=_http_status(exc.exit_code))


async def _json_body(request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


def _listen_unix(path: str, group_gid: int | None) -> socket.socket:
    """A listening socket at path, 0600 root (0660 root:group with a group), no window in
    which it is more open than that."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        os.unlink(path)                         # a stale one: we hold the daemon lock
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group_gid is not None:
        os.chown(path, 0 if os.geteuid() == 0 else -1, group_gid)
        os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def _listen_tcp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


async def _serve(cfg: Config, ready=None) -> None:
    daemon = Daemon(cfg)
    with DaemonWorkdir(cfg.socket, cfg.store.path) as work:
        daemon.workdir = work
        daemon.gpus.start()                     # first: no thread, no NVML, no CUDA yet
        api.warm_imports(cfg.store.path)
        gc.freeze()                             # children's GC leaves the daemon's objects (and pages) alone
        runner = web.AppRunner(daemon.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.SockSite(runner, _listen_unix(cfg.socket, daemon.group_gid)).start()
        mrunner = None
        if cfg.metrics_port is not None:
            mapp = web.Application()
            mapp.router.add_get("/metrics", daemon.metrics_page)
            mrunner = web.AppRunner(mapp, access_log=None)
            await mrunner.setup()
            await web.SockSite(mrunner, _listen_tcp(cfg.metrics_host, cfg.metrics_port)).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("listening", extra={"fields": {"socket": cfg.socket, "store": cfg.store.path,
                                                "workdir": work.path, "removed_leftovers": work.removed,
                                                "metrics_port": cfg.metrics_port, "rss_bytes": _rss()}})
        _notify_systemd()
        await stop.wait()
        await daemon.shutdown()
        await runner.cleanup()
        if mrunner:
            await mrunner.cleanup()
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
    log.info("stopped")


def _notify_systemd() -> None:
    """sd_notify READY=1 for a Type=notify unit (no library needed: one datagram)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


def serve(cfg: Config) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    setup_logging()
    if cfg.group:
        try:
            grp.getgrnam(cfg.group)
        except KeyError:
            raise UsageError(f"no group {cfg.group!r}") from None
    try:
        asyncio.run(_serve(cfg))
    except OSError as exc:
        raise GpusnapError(f"gpusnapd could not start: {exc}") from exc
