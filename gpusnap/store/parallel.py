"""Run a store's per-chunk work (ingest, materialise) on worker processes.

Chunks are small (region-anchored cuts, ~200 KB on an LLM server: 15,000 of them for a
1B model) and each one costs some Python (open, read, hand-offs into zstd and SHA-256).
On threads that per-chunk work contends on the GIL: 16 threads ingested at 0.3 GB/s on
a 16-core H200 host. Worker processes share nothing but the files they write.

Plain fork and one pipe per worker, nothing more (multiprocessing.Pool's task queue,
its handler threads and its terminate() could hang: a worker that dies holding the
queue's lock, or mid-message, stops the pool for good). Worker k takes batches k,
k+W, k+2W... of the job it inherited at the fork, and writes one pickled message per
batch to its pipe, then a last "done". gpusnap reads the pipes as results come:

- a batch's result, or its GpusnapError/OSError as a value (raised again here with its
  class, message and hint; a pickled exception keeps only its arguments);
- end of file without "done": the worker died (the OOM killer, say): StoreError.

When the caller stops reading (an error, Ctrl-C, SIGTERM), the workers get SIGTERM,
which raises SystemExit in them (the chunk being written removes its temp file on the
way out), and are reaped before the error goes on. Workers ignore Ctrl-C: it is
gpusnap's to handle. They leave through os._exit: nothing of gpusnap's (buffered
output, atexit handlers) runs twice.

Where forking is not safe (another thread already runs in this process, e.g. the
caller's), or there is one batch or one worker, the same function runs on threads.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import selectors
import signal
import struct
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from .. import errors, hostcpu, sysrun
from ..errors import GpusnapError

BATCH_BYTES = 16 << 20      # what a worker takes at once, and the step progress moves in


def _threads_set() -> int | None:
    """GPUSNAP_THREADS where it is a positive count, else None."""
    explicit = os.environ.get("GPUSNAP_THREADS")
    return int(explicit) if explicit and explicit.isdigit() and int(explicit) > 0 else None


def workers() -> int:
    """Worker processes for ingest, materialise, verify and the page stream:
    GPUSNAP_THREADS, else the CPUs this process may use (hostcpu.py; at most 16)."""
    return _threads_set() or max(2, min(16, hostcpu.count()))


def stream_workers(compressing: bool) -> int:
    """Worker processes for a dump's page stream: workers(), or with a codec that spends
    CPU on each chunk (compressing: `--compress bf16` or a zstd level >= 1) twice the CPUs
    (at most 32), so that some compress while others wait on the disk. H200, 8 GiB of bf16,
    `--compress bf16`: CRIU's stage wrote at 0.73 of the disk's fsync floor with 16 workers,
    0.94 with 32 (benchmarks/results/dump_probe_h200_bf16*.md). GPUSNAP_THREADS decides
    where set."""
    if not compressing or _threads_set():
        return workers()
    return max(2, min(32, 2 * hostcpu.count()))


def batches(items: list, size, limit: int | None = None) -> list[list]:
    """items cut into consecutive batches of about limit bytes (default BATCH_BYTES;
    size(item) says how many bytes an item stands for)."""
    limit = limit or BATCH_BYTES
    out, current, total = [], [], 0
    for item in items:
        current.append(item)
        total += size(item)
        if total >= limit:
            out.append(current)
            current, total = [], 0
    if current:
        out.append(current)
    return out


def run(fn: Callable[[Any, int], Any], job: Any, batches: int, workers: int,
        ordered: bool = False) -> tuple[str, Iterator]:
    """Call fn(job, i) for i in range(batches) on workers. Returns (mode, results):
    results is a generator, ordered by i when ordered, else as they finish; consume it to
    the end, or close it (which stops and reaps the workers)."""
    use_processes = workers > 1 and batches > 1 and fork_is_safe()
    if use_processes:
        return "processes", _raise_errors(_forked(fn, job, batches, min(workers, batches), ordered))
    return "threads", _raise_errors(_threaded(fn, job, batches, workers))


def _threaded(fn, job, batches: int, workers: int):
    with ThreadPoolExecutor(max(1, min(workers, batches))) as pool:
        results = pool.map(lambda i: _call(fn, job, i), range(batches))
        try:
            yield from results
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _forked(fn, job, batches: int, workers: int, ordered: bool):
    children: dict[int, Any] = {}           # pid -> read end (a file)
    try:
        for k in range(workers):
            r, w = os.pipe()

            def body(r=r, w=w, mine=range(k, batches, workers)):
                os.close(r)
                _worker(fn, job, mine, w)
            pid = _spawn(body)
            os.close(w)
            children[pid] = os.fdopen(r, "rb")
        yield from _collect(children, ordered)
    finally:
        _stop(children)


def _worker(fn, job, mine, fd: int) -> None:
    with os.fdopen(fd, "wb") as out:
        for i in mine:
            pickle.dump((i, _call(fn, job, i)), out)
            out.flush()
        pickle.dump("done", out)


def _spawn(body: Callable[[], object]) -> int:
    """Fork a worker that runs body and exits; its pid. Ctrl-C and SIGTERM are blocked
    across the fork until the worker has its own handlers (sysrun.fork_held), so
    gpusnap's handler never runs in a worker (it would go on as a second gpusnap)."""
    pid, blocked = sysrun.fork_held()
    if pid == 0:
        _as_worker(body, blocked)           # never returns
    return pid


def _as_worker(body: Callable[[], object], mask) -> None:
    """In a forked worker: die with gpusnap, leave on SIGTERM, ignore Ctrl-C (gpusnap's to
    handle), then unblock them (mask) and run body; never return."""
    code = 0
    try:
        # a worker never outlives gpusnap: it would go on writing chunks, or hold a
        # restored tree's userfaultfd open
        sysrun.die_with_parent()
        _keep_heap()
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        body()
    except BaseException:                   # SystemExit from SIGTERM, a broken pipe...
        code = 1
    finally:
        os._exit(code)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_heap() -> None:
    """In a worker: freed memory stays in the heap for the next batch. A worker allocates
    and frees a batch's worth of chunk-sized buffers (compressed blobs, decoded chunks)
    over and over; by default each of them is a fresh mmap, or heap that glibc gives
    back, and its pages fault in again (dumps: a third of the hashing and compressing
    time on a VM). Where mallopt is missing (not glibc), nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def _collect(children: dict, ordered: bool):
    selector = selectors.DefaultSelector()
    for pid, f in children.items():
        selector.register(f, selectors.EVENT_READ, pid)
    waiting, next_i = {}, 0
    try:
        while selector.get_map():
            for key, _ in selector.select():
                try:
                    message = pickle.load(key.fileobj)
                except errors.Interrupted:
                    raise               # SIGTERM while a message came in: stop the workers
                except Exception:       # noqa: BLE001 - EOF, or a message cut short
                    message = None
                if message == "done":
                    selector.unregister(key.fileobj)
                    continue
                if message is None:
                    raise _died(key.data)
                i, result = message
                if not ordered:
                    yield result
                    continue
                waiting[i] = result
                while next_i in waiting:
                    yield waiting.pop(next_i)
                    next_i += 1
    finally:
        selector.close()


def _died(pid: int) -> errors.StoreError:
    """What to say of a worker that ended without finishing: its signal decides."""
    try:
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    except ChildProcessError:
        sig = None
    if sig == signal.SIGBUS:
        return errors.StoreFull("a worker process got SIGBUS writing through a mapping (the "
                                "filesystem it wrote to is full?): the operation stopped",
                                hint="free space in the work dir, or set GPUSNAP_WORKDIR")
    name = f" ({signal.Signals(sig).name})" if sig else ""
    return errors.StoreError(f"a worker process died{name} (killed for memory?): the "
                             f"operation stopped",
                             hint="look for the OOM killer in the kernel log (dmesg), "
                                  "or use fewer workers: GPUSNAP_THREADS")


def _stop(children: dict) -> None:
    """Reap every worker; those still running (the caller stopped early) get SIGTERM."""
    for pid, f in children.items():
        f.close()
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _call(fn, job, i: int):
    try:
        return ("ok", fn(job, i))
    except GpusnapError as exc:
        return ("error", type(exc).__name__, exc.message, exc.hint)
    except OSError as exc:
        return ("error", "OSError", f"{exc.filename or ''}: {exc.strerror or exc}", None)


class Stream:
    """fn(job, task) on W forked workers for tasks that arrive one at a time while the
    caller works (a page stream): submit() hands a task to the least busy worker
    (blocking while every worker holds `depth`), take() returns what has finished.
    Each result comes back as (tag, result); errors are raised as run()'s are.
    Where forking is not safe, threads do the same."""

    def __init__(self, fn: Callable[[Any, Any], Any], job: Any, workers: int, depth: int = 2,
                 nice: int = 0):
        """nice: added to the forked workers' niceness (os.nice), so that the caller's
        other work (a dump's CRIU and the receiver of its pages) runs first where they
        compete for a CPU; threads are not niced."""
        self.fn, self.job, self.depth, self.nice = fn, job, depth, nice
        self.done: list = []
        self.children: dict[int, Any] = {}      # pid -> result pipe (a file)
        self.tasks: dict[int, Any] = {}         # pid -> task pipe (a file)
        self.busy: dict[int, int] = {}
        self.pool = None
        self.futures: list = []
        self.selector = selectors.DefaultSelector()
        if workers > 1 and fork_is_safe():
            for _ in range(workers):
                self._fork()
        else:
            self.pool = ThreadPoolExecutor(max(1, workers))

    def _fork(self) -> None:
        r_task, w_task = os.pipe()
        r_res, w_res = os.pipe()
        others = [f.fileno() for f in [*self.tasks.values(), *self.children.values()]]

        def body():
            for fd in (w_task, r_res, *others):
                os.close(fd)
            if self.nice > 0:
                os.nice(self.nice)
            _stream_worker(self.fn, self.job, r_task, w_res)
        pid = _spawn(body)
        os.close(r_task)
        os.close(w_res)
        self.children[pid] = os.fdopen(r_res, "rb", buffering=0)  # read by _read_message
        self.tasks[pid] = os.fdopen(w_task, "wb")
        self.busy[pid] = 0
        self.selector.register(self.children[pid], selectors.EVENT_READ, pid)

    def submit(self, tag, task) -> None:
        if self.pool is not None:
            self.futures.append((tag, self.pool.submit(_call, self.fn, self.job, task)))
            return
        while min(self.busy.values()) >= self.depth:
            self._collect(block=True)
        pid = min(self.busy, key=self.busy.get)
        pickle.dump((tag, task), self.tasks[pid])
        self.tasks[pid].flush()
        self.busy[pid] += 1

    def has_room(self) -> bool:
        """Whether submit() would hand a task over without waiting."""
        return self.pool is not None or min(self.busy.values()) < self.depth

    def take(self, block: bool = False) -> list:
        """(tag, result) of the tasks finished since the last take(); block: wait for one."""
        if self.pool is not None:
            if block and self.futures:
                futures.wait([f for _t, f in self.futures], return_when=futures.FIRST_COMPLETED)
            finished = {id(f) for _t, f in self.futures if f.done()}
            self.done += [(t, f.result()) for t, f in self.futures if id(f) in finished]
            self.futures = [(t, f) for t, f in self.futures if id(f) not in finished]
        elif any(self.busy.values()):
            self._collect(block)
        out, self.done = self.done, []
        return [(tag, _unwrap(result)) for tag, result in out]

    def pending(self) -> int:
        return len(self.futures) if self.pool is not None else sum(self.busy.values())

    def _collect(self, block: bool) -> None:
        for key, _ in self.selector.select(None if block else 0):
            message = _read_message(key.fileobj.fileno())
            if message is None:
                raise _died(key.data)
            self.busy[key.data] -= 1
            self.done.append(message)

    def finish(self) -> list:
        """Every result still due; then the workers stop."""
        out = []
        while self.pending():
            out += self.take(block=True)
        self.close()
        return out

    def close(self) -> None:
        """Stop and reap the workers (those still working get SIGTERM)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        for f in self.tasks.values():
            try:
                f.close()
            except OSError:
                pass
        self.selector.close()
        _stop(self.children)
        self.children, self.tasks, self.busy = {}, {}, {}


class Background:
    """fn(job, 0) on one forked process while the caller goes on (a dump's --seed): result()
    waits for it and returns its value or raises its error, as run()'s; stop() ends it
    (SIGTERM: it removes the temp file it is writing) and reaps it. Where forking is not
    safe it runs here and now."""

    def __init__(self, fn: Callable[[Any, int], Any], job: Any):
        self.pid: int | None = None
        self.pipe = None                        # the result pipe's read end (a file)
        self.value = None
        if not fork_is_safe():
            self.value = _call(fn, job, 0)
            return
        r, w = os.pipe()

        def body():
            os.close(r)
            _send(w, _call(fn, job, 0))
        self.pid = _spawn(body)
        os.close(w)
        self.pipe = os.fdopen(r, "rb", buffering=0)     # read by _read_message

    def result(self):
        if self.pid is not None:
            message = _read_message(self.pipe.fileno())
            pid, self.pid = self.pid, None
            self.pipe.close()
            if message is None:
                raise _died(pid)
            os.waitpid(pid, 0)
            self.value = message
        return _unwrap(self.value)

    def stop(self) -> None:
        if self.pid is not None:
            pid, self.pid = self.pid, None
            _stop({pid: self.pipe})


def _send(fd: int, value) -> None:
    """One length-prefixed pickle into a result pipe (_read_message reads it)."""
    data = pickle.dumps(value)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _stream_worker(fn, job, r_task: int, w_res: int) -> None:
    with os.fdopen(r_task, "rb") as tasks:
        while True:
            try:
                tag, task = pickle.load(tasks)
            except EOFError:
                return
            _send(w_res, (tag, _call(fn, job, task)))


_LENGTH = struct.Struct("=Q")


def _read_message(fd: int):
    """One length-prefixed pickle from a worker's result pipe; None at end of file or
    for a message cut short. Unbuffered, so that select() on the pipe never misses a
    message already read into a buffer."""
    head = _read_n(fd, _LENGTH.size)
    if head is None:
        return None
    body = _read_n(fd, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _read_n(fd: int, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        part = os.read(fd, n - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _unwrap(result):
    """_call's ("ok", value) -> value; ("error", ...) raised again with its class."""
    if result[0] == "error":
        _, name, message, hint = result
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, GpusnapError):
            raise cls(message, hint=hint)
        raise errors.StoreError(message, hint=hint)
    return result[1]


def _raise_errors(results):
    try:
        for result in results:
            yield _unwrap(result)
    finally:
        results.close()                 # the workers stop now, not when collected


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def fork_is_safe() -> bool:
    """Whether this process may fork workers: no other thread runs (a child would
    inherit the locks it holds)."""
    return hasattr(os, "fork") and threading.active_count() == 1
