"""Packs fetched ahead of a restore's reads, several at once, by a helper process.

A restore reads its chunks in an order known before it starts (the small images, then
the pages, in the order the fill and CRIU take them), but its reads come in steps:
planning reads the small images one by one, materialise and the fill read batches,
each batch's chunks from few packs, each pack fetched whole by whoever needs it first
while the others wait on its lock. The helper fetches the packs in that order,
`workers` at a time, into the node's cache from the start; a read finds its chunk
there, or waits on the pack's lock while the helper fetches it, or fetches the pack
itself when it comes first (the helper then skips it).

The helpers are forked processes (a thread would stop the store's worker processes from
forking: parallel.py), each in its own session, ended by the restore with SIGTERM: each
finishes the packs in flight (a chunk enters the cache whole or not at all) and starts no
other. They get SIGTERM too when the process that started them dies. Their failures are
their own: a read that needs a pack a helper could not fetch fetches it and reports what
fails.

Several processes, the packs dealt out in turn (helper i takes packs i, i+n, ...: each
still comes in about the order the restore reads it), the `workers` requests in flight
shared among them: one process's GIL holds a pull to what one core does between the
requests (the client's parsing, the pack's hash, the cache's writes), well below what
a server on the same network gives (GPUSNAP_S3_PREFETCH_PROCS; procs() says the default).
"""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ... import hostcpu, sysrun
from .. import parallel

STOP_WAIT = 5.0     # seconds the helper has to finish its packs in flight once told to stop


def order(names: Iterable[str], pack_of: Callable[[str], object | None],
          wanted: Callable[[object, str], bool], budget: int) -> list:
    """The packs to fetch for names: each once, in the order of the first name it holds,
    up to budget bytes. pack_of(name) gives a name's pack (with .id and .size) or None;
    wanted(pack, name), asked once a pack (name: its first one here), whether to fetch it
    ahead (not when it is cached already, or read by range)."""
    out, seen, total = [], set(), 0
    for name in names:
        pack = pack_of(name)
        if pack is None or pack.id in seen:
            continue
        seen.add(pack.id)
        if not wanted(pack, name):
            continue
        total += pack.size
        if total > budget:
            break
        out.append(pack)
    return out


def procs(packs: int, workers: int) -> int:
    """How many helper processes: GPUSNAP_S3_PREFETCH_PROCS where set, else one for
    every 4 CPUs this process may use (hostcpu.py), at most 8; never more than the packs,
    nor than the requests in flight."""
    value = os.environ.get("GPUSNAP_S3_PREFETCH_PROCS", "")
    n = int(value) if value.isdigit() and int(value) > 0 else \
        min(8, max(1, hostcpu.count() // 4))
    return max(1, min(n, packs, workers))


class Prefetch:
    """Running helpers (start()); stop() ends them and reaps them."""

    def __init__(self, pids: list[int], packs: int, nbytes: int):
        self.pids = pids
        self.packs = packs
        self.bytes = nbytes

    def stop(self, finish: bool = False) -> None:
        """SIGTERM: each finishes its packs in flight, within STOP_WAIT, else SIGKILL.
        finish: first wait for them to fetch them all (interrupted: stopped as above)."""
        left = list(self.pids)
        try:
            while finish and left:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(left[0], 0)
                left.pop(0)
        finally:
            for pid in left:                # all told first: they finish at once
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for pid in left:
                sysrun.end_helper(pid, STOP_WAIT)


def start(fetch: Callable[[object], None], packs: list, workers: int) -> Prefetch | None:
    """fetch(pack) of each of packs, workers at a time, in helper processes (procs());
    None when there is nothing to fetch, or where forking is not safe (another thread
    runs)."""
    if not packs or not parallel.fork_is_safe():
        return None
    workers = max(1, workers)
    n = procs(len(packs), workers)
    pids: list[int] = []
    try:
        for i in range(n):
            share = workers // n + (i < workers % n)
            pids.append(sysrun.fork_helper(_main, fetch, packs[i::n], share, os.getpid()))
    except BaseException:
        Prefetch(pids, 0, 0).stop()
        raise
    return Prefetch(pids, len(packs), sum(p.size for p in packs))


def _main(fetch: Callable[[object], None], packs: list, workers: int, parent: int) -> None:
    stop = sysrun.stop_on_sigterm(parent)

    def one(pack) -> None:
        if not stop.is_set():
            with contextlib.suppress(Exception):    # the read that needs it says what fails
                fetch(pack)

    with ThreadPoolExecutor(min(workers, len(packs)), thread_name_prefix="gpusnap-prefetch") as pool:
        for _ in pool.map(one, packs):
            pass
