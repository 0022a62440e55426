"""Run a store's per-chunk work (ingest, materialise) on worker processes.

Chunks are small (region-anchored cuts, ~200 KB on an LLM server: 15,000 of them for a
1B model) and each one costs some Python (open, read, hand-offs into zstd and SHA-256).
On threads that per-chunk work contends on the GIL: 16 threads ingested at 0.3 GB/s on
a 16-core H200 host. Worker processes share nothing but the files they write.

Workers are forked once per call and inherit the job (set here just before the fork),
so nothing is pickled but batch numbers and small results. Where forking is not safe
(another thread already runs in this process: a progress bar's monitor, say, or the
caller's), or there is one batch or one worker, the same function runs on threads.

A worker's GpusnapError or OSError comes back as a value and is raised again here with
its class, message and hint (a pickled exception keeps only its arguments).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from ..errors import GpusnapError

_job: Any = None        # what the forked workers inherit
_fn: Callable | None = None


def batches(items: list, size, limit: int = 16 << 20) -> list[list]:
    """items cut into consecutive batches of about limit bytes (size(item) says how many
    an item holds): what a worker takes at once, and the step progress moves in."""
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
    results is a generator, ordered by i when ordered, else as they finish; it must be
    consumed to the end (or closed), which also ends the workers."""
    use_processes = workers > 1 and batches > 1 and _fork_is_safe()
    mode = "processes" if use_processes else "threads"
    return mode, _results(fn, job, batches, workers, ordered, use_processes)


def _results(fn, job, batches, workers, ordered, use_processes):
    global _job, _fn
    if use_processes:
        _job, _fn = job, fn
        try:
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(min(workers, batches), initializer=_worker_signals)
        finally:
            _job = _fn = None       # the children have their copies
        with pool:
            it = (pool.imap if ordered else pool.imap_unordered)(_in_process, range(batches))
            yield from _raise_errors(it)
    else:
        with ThreadPoolExecutor(max(1, min(workers, batches))) as pool:
            futures = (pool.map(lambda i: _call(fn, job, i), range(batches)))
            try:
                yield from _raise_errors(futures)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _in_process(i: int):
    return _call(_fn, _job, i)


def _call(fn, job, i: int):
    try:
        return ("ok", fn(job, i))
    except GpusnapError as exc:
        return ("error", type(exc).__name__, exc.message, exc.hint)
    except OSError as exc:
        return ("error", "OSError", f"{exc.filename or ''}: {exc.strerror or exc}", None)


def _raise_errors(results):
    from .. import errors
    for result in results:
        if result[0] == "error":
            _, name, message, hint = result
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, GpusnapError):
                raise cls(message, hint=hint)
            raise errors.StoreError(message, hint=hint)
        yield result[1]


def _worker_signals() -> None:
    """Workers inherit the CLI's SIGTERM handler, which raises a GpusnapError: the pool
    would hand it back as a result and keep the worker alive, and the pool's terminate()
    would wait on it forever. In a worker SIGTERM raises SystemExit instead, which the
    pool does not catch: the chunk being written removes its temp file on the way out
    (store_blob), then the worker ends. Ctrl-C is the parent's to handle (it terminates
    the pool)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _fork_is_safe() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1
