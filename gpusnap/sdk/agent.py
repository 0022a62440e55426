"""The agent: a daemon thread that drops a server's weights from GPU memory before a
checkpoint and reads them back from their files after a restore.

States:   RESIDENT --prepare--> PREPARED --resume--> RESIDENT
Both commands are idempotent (a second prepare or resume answers as the first did).

prepare   takes the serving gate (the server holds it around each forward pass:
          `with agent.serving(): ...`), synchronises the devices, fingerprints every
          registered tensor, records each weight file's identity, then swaps every
          registered tensor's storage for an empty one (the same Parameter objects stay
          in the model), drops the scratch tensors the same way, and empties PyTorch's
          CUDA cache so the memory goes back to the driver. The gate stays taken: a
          request that arrives meanwhile waits for resume.
resume    checks the files (size, mtime, header) against what prepare recorded,
          allocates every tensor again on its device, reads it from its file range
          (loader.py), re-creates the scratch tensors zeroed, compares the fingerprints,
          runs the on_resume callbacks, and releases the gate.

A watchdog resumes by itself when nobody sent resume within `watchdog_s` seconds of the
agent *running* (it counts one-second ticks of its own loop, so the time a checkpointed
process spends frozen or on disk does not count): a gpusnap killed between the two
commands does not leave the server without its weights.

CUDA graphs and torch.compile(mode="reduce-overhead") capture the addresses of the
tensors they read. prepare/resume move every registered tensor to a new address, so a
graph captured over them would read freed memory. Drop such graphs in an on_prepare
callback and capture them again in on_resume (or do not enable the SDK for them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import stat
import sys
import threading
import time

from . import loader, registry
from .protocol import VERSION, peer_credentials, recv_message, socket_path
from .safetensors import file_identity, identity_changes

RESIDENT, PREPARED = "resident", "prepared"
MAX_CONNECTIONS = 8         # served at once; more are answered "too many connections"
IDLE_TIMEOUT_S = 5.0        # to send a request after connecting


class Agent:
    def __init__(self, reg: registry.Registry, *, socket_dir: str | None = None,
                 watchdog_s: float | None = 600.0, verify: bool = True,
                 reader: str | None = None, threads: int | None = None, chunk: int | None = None,
                 gate_timeout_s: float = 20.0, weight_files=()):
        self.registry = reg
        self.socket_dir = socket_dir
        self.path = os.path.abspath(socket_path(os.getpid(), socket_dir))
        self.weight_files = [os.path.realpath(f) for f in weight_files]   # besides the slots' files
        self.watchdog_s = watchdog_s
        self.verify = verify
        self.reader, self.threads, self.chunk = reader, threads, chunk
        self.gate_timeout_s = gate_timeout_s
        self.state = RESIDENT
        self.last: dict = {}                # the last prepare's and resume's replies
        self.files: list[dict] = []
        self.on_prepare: list = []
        self.on_resume: list = []
        self.collectives = False            # on_prepare tears communicators down (collective.py)
        self._wanted = threading.Event()    # a prepare waits for the serving gate
        self._settled = threading.Condition()
        self._outcomes = (0, 0)            # prepares done, failed
        self._gate = threading.Lock()
        self._work = threading.RLock()      # one command at a time
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._turned_away: list[tuple[float, socket.socket]] = []   # accept thread only
        self._ticks = 0

    # ---- in-process API ----------------------------------------------------------

    @contextlib.contextmanager
    def serving(self):
        """Hold around every use of the model: prepare waits for it, and a request that
        comes while the weights are out waits for resume."""
        with self._gate:
            yield

    def checkpoint_wanted(self) -> bool:
        """A prepare is waiting for the serving gate. Ranks that run collectives in
        lockstep share this at each step and stop at the same one (collective.py)."""
        return self._wanted.is_set()

    def wait_prepared(self, timeout: float) -> bool:
        """Wait (outside the serving gate) until a prepare is done: True once the agent is
        PREPARED (or was since the call: a resume may have come already), False when
        none came within timeout or one failed meanwhile."""
        deadline = time.monotonic() + timeout
        with self._settled:
            done, failed = self._outcomes
            while self.state != PREPARED and self._outcomes[0] == done:
                left = deadline - time.monotonic()
                if left <= 0 or self._outcomes[1] != failed:
                    return False
                self._settled.wait(left)
        return True

    def _settle(self, failed: bool = False) -> None:
        with self._settled:
            done, fails = self._outcomes
            self._outcomes = (done, fails + 1) if failed else (done + 1, fails)
            self._settled.notify_all()

    def status(self) -> dict:
        return {"ok": True, "state": self.state, "pid": os.getpid(), "uid": os.getuid(),
                "collectives": self.collectives,
                "version": VERSION, "tensors": len(self.registry.slots),
                "bytes": self.registry.bytes, "scratch_tensors": len(self.registry.scratch),
                "scratch_bytes": self.registry.scratch_bytes,
                "kept": len(self.registry.kept), "files": sorted(self.registry.headers),
                "socket": self.path, "backend": loader.gds_backend(), "last": self.last}

    def prepare(self) -> dict:
        with self._work:
            if self.state == PREPARED:
                return {**self.last.get("prepare", {}), "ok": True, "state": self.state, "again": True}
            import torch
            t0 = time.perf_counter()
            self._wanted.set()
            try:
                return self._prepare(torch, t0)
            except BaseException:
                self._settle(failed=True)
                raise
            finally:
                self._wanted.clear()

    def _prepare(self, torch, t0: float) -> dict:
        if not self._gate.acquire(timeout=self.gate_timeout_s):
            raise RuntimeError(f"the model stayed in use for {self.gate_timeout_s:g} s")
        try:
            devices = [d for d in self.registry.devices() if d.type == "cuda"]
            for d in devices:
                torch.cuda.synchronize(d)
            slots = self.registry.slots
            if self.verify:
                for s, fp in zip(slots, registry.fingerprints([s.tensor for s in slots])):
                    s.fingerprint = fp
            files = [file_identity(p) for p in sorted({s.file for s in slots} | set(self.weight_files))]
            before = _memory(devices)
            hooked = 0
            for cb in self.on_prepare:
                hooked += int((cb() or {}).get("bytes_dropped", 0))
            for s in [*slots, *self.registry.scratch]:
                s.tensor.data = torch.empty(0, dtype=s.dtype, device=s.device)
            for d in devices:
                torch.cuda.synchronize(d)
            if devices:
                torch.cuda.empty_cache()
            _malloc_trim()
            after = _memory(devices)
        except BaseException:
            self._put_back_after_failed_prepare()
            for cb in self.on_resume:
                with contextlib.suppress(Exception):
                    cb()
            self._gate.release()
            raise
        self.files = files
        self.state = PREPARED
        self._ticks = 0
        self._settle()
        reply = {"ok": True, "state": self.state, "pid": os.getpid(), "uid": os.getuid(),
                 "socket": self.path, "tensors": len(slots), "bytes": self.registry.bytes,
                 "scratch_bytes": self.registry.scratch_bytes,
                 "bytes_dropped": self.registry.bytes + self.registry.scratch_bytes + hooked,
                 "bytes_freed": before[0] - after[0], "bytes_released": before[1] - after[1],
                 "files": files, "seconds": round(time.perf_counter() - t0, 4),
                 "backend": loader.gds_backend(), "collectives": self.collectives}
        self.last["prepare"] = reply
        return reply

    def resume(self) -> dict:
        with self._work:
            if self.state == RESIDENT:
                return {**self.last.get("resume", {}), "ok": True, "state": self.state, "again": True}
            import torch
            t0 = time.perf_counter()
            changed = [c for f in self.files for c in identity_changes(f, quick=True)]
            if changed:
                raise RuntimeError("the weight files changed since prepare: " + "; ".join(changed))
            slots = self.registry.slots
            try:
                for s in slots:
                    s.tensor.data = torch.empty(s.shape, dtype=s.dtype, device=s.device)
                t_alloc = time.perf_counter()
                stats = loader.load([loader.Job(s.file, s.offset, s.length, s.tensor) for s in slots],
                                    self.reader, self.threads, self.chunk)
                for s in self.registry.scratch:
                    s.tensor.data = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
                t_load = time.perf_counter()
                bad = []
                if self.verify and slots:
                    got = registry.fingerprints([s.tensor for s in slots])
                    bad = [s.name for s, fp in zip(slots, got) if s.fingerprint and fp != s.fingerprint]
                if bad:
                    raise RuntimeError(f"{len(bad)} tensors read back differ from what was dropped "
                                       f"(first: {', '.join(bad[:5])}): the model changed them after "
                                       f"loading, or the files changed")
                t_hooks = time.perf_counter()
                for cb in self.on_resume:          # a server's own reload (enable_hooks) counts as read
                    stats["bytes"] += int((cb() or {}).get("bytes", 0))
                stats["seconds"] += time.perf_counter() - t_hooks
            except BaseException:
                for s in [*slots, *self.registry.scratch]:
                    s.tensor.data = torch.empty(0, dtype=s.dtype, device=s.device)
                raise
            self.state = RESIDENT
            self._gate.release()
            seconds = time.perf_counter() - t0
            reply = {"ok": True, "state": self.state, "pid": os.getpid(), "tensors": len(slots),
                     "bytes": stats["bytes"], "reader": stats["reader"],
                     "threads": stats["threads"], "chunk": stats["chunk"],
                     "alloc_seconds": round(t_alloc - t0, 4), "read_seconds": round(stats["seconds"], 4),
                     "verify_seconds": round(time.perf_counter() - t_load, 4),
                     "seconds": round(seconds, 4),
                     "gbps": round(stats["bytes"] / stats["seconds"] / 1e9, 3) if stats["seconds"] > 0 else None,
                     "verified": bool(self.verify)}
            self.last["resume"] = reply
            return reply

    def _put_back_after_failed_prepare(self) -> None:
        """prepare failed part way: whatever it dropped is read back (the files have not
        been touched, and fingerprints are not needed for that)."""
        import torch
        slots = [s for s in self.registry.slots if s.tensor.numel() == 0 and s.length]
        for s in slots:
            s.tensor.data = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        loader.load([loader.Job(s.file, s.offset, s.length, s.tensor) for s in slots],
                    self.reader, self.threads, self.chunk)
        for s in self.registry.scratch:
            if s.tensor.numel() == 0 and s.length:
                s.tensor.data = torch.zeros(s.shape, dtype=s.dtype, device=s.device)

    # ---- the socket ----------------------------------------------------------------

    def start(self) -> Agent:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
            raise PermissionError(f"{directory} belongs to uid {st.st_uid} or is writable by "
                                  f"others: the agent will not listen there")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)        # left by an earlier process of this pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(1.0)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="gpusnap-agent", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self._close_turned_away(float("inf"))
        if self._sock:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._sock = None

    def _serve(self) -> None:
        """Accept connections; each is served on a thread of its own (at most
        MAX_CONNECTIONS at once), so an idle client cannot stall another. A peer of
        another uid is answered at once, before anything it sent is read."""
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, TimeoutError):
                self._tick()
                self._close_turned_away(time.monotonic() - 1.0)
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            _pid, uid = peer_credentials(conn)
            if uid not in (0, os.getuid()):
                self._turn_away(conn, uid)
            elif not self._connections.acquire(blocking=False):
                self._reply_and_close(conn, {"ok": False, "error": "too many connections"})
            else:
                threading.Thread(target=self._handle, args=(conn,), name="gpusnap-agent-conn",
                                 daemon=True).start()

    def _tick(self) -> None:
        if self.state != PREPARED or self.watchdog_s is None:
            return
        self._ticks += 1
        if self._ticks >= self.watchdog_s:
            print(f"gpusnap agent: no resume {self.watchdog_s:g} s after prepare: "
                  f"reading the weights back", file=sys.stderr, flush=True)
            try:
                self.resume()
            except Exception as e:  # noqa: BLE001 - the watchdog reports, it cannot raise
                print(f"gpusnap agent: resume failed: {e}", file=sys.stderr, flush=True)
                self._ticks = 0

    def _handle(self, conn: socket.socket) -> None:
        """Serve one connection of a trusted peer: one request, read within IDLE_TIMEOUT_S."""
        try:
            raw = recv_message(conn, time.monotonic() + IDLE_TIMEOUT_S)
            reply = self._dispatch(json.loads(raw.decode() or "{}"))
        except Exception as e:  # noqa: BLE001 - every failure is an answer
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            self._connections.release()
        self._reply_and_close(conn, reply)

    def _turn_away(self, conn: socket.socket, uid: int) -> None:
        """Answer a peer of another uid without reading what it sent. Its connection is
        closed a second later (at once, its own send could fail before it reads the
        answer), the oldest first when many wait."""
        with contextlib.suppress(OSError):
            conn.settimeout(0)
            conn.send(json.dumps({"ok": False, "state": self.state,
                                  "error": f"uid {uid} may not talk to this agent"}).encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
        self._turned_away.append((time.monotonic(), conn))
        if len(self._turned_away) > MAX_CONNECTIONS * 8:
            self._close_turned_away(self._turned_away[0][0])

    def _close_turned_away(self, before: float) -> None:
        while self._turned_away and self._turned_away[0][0] <= before:
            self._turned_away.pop(0)[1].close()

    def _reply_and_close(self, conn: socket.socket, reply: dict) -> None:
        reply.setdefault("state", self.state)
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _dispatch(self, req: dict) -> dict:
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if cmd == "status":
            return self.status()
        if cmd == "prepare":
            return self.prepare()
        if cmd == "resume":
            return self.resume()
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def _memory(devices) -> tuple[int, int]:
    """(allocated, reserved) bytes of PyTorch's CUDA allocator over these devices."""
    if not devices:
        return 0, 0
    import torch
    return (sum(torch.cuda.memory_allocated(d) for d in devices),
            sum(torch.cuda.memory_reserved(d) for d in devices))


def _malloc_trim() -> None:
    """Give freed heap memory back to the kernel (glibc's malloc_trim), so that what
    the process freed is not in its checkpoint: CPU tensors dropped by prepare, and
    whatever loading the model left in malloc's arenas."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                # not glibc
