"""Packs fetched ahead of a restore's reads, several at once, by a helper process.

A restore reads its chunks in an order known before it starts (the small images, then
the pages, in the order the fill and CRIU take them), but its reads come in steps:
planning reads the small images one by one, materialise and the fill read batches,
each batch's chunks from few packs, each pack fetched whole by whoever needs it first
while the others wait on its lock. The helper fetches the packs in that order,
`workers` at a time, into the node's cache from the start; a read finds its chunk
there, or waits on the pack's lock while the helper fetches it, or fetches the pack
itself when it comes first (the helper then skips it).

The helper is a forked process (a thread would stop the store's worker processes from
forking: parallel.py) in its own session, ended by the restore with SIGTERM: it finishes
the packs in flight (a chunk enters the cache whole or not at all) and starts no other.
It gets SIGTERM too when the process that started it dies. Its failures are its own: a
read that needs a pack the helper could not fetch fetches it and reports what fails.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ... import sysrun
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


class Prefetch:
    """A running helper (start()); stop() ends it and reaps it."""

    def __init__(self, pid: int, packs: int, nbytes: int):
        self.pid = pid
        self.packs = packs
        self.bytes = nbytes

    def stop(self, finish: bool = False) -> None:
        """SIGTERM: it finishes its packs in flight, within STOP_WAIT, else SIGKILL.
        finish: first wait for it to fetch them all (interrupted: stopped as above)."""
        if finish:
            try:
                os.waitpid(self.pid, 0)
                return
            except ChildProcessError:
                return
            except BaseException:
                sysrun.end_helper(self.pid, STOP_WAIT)
                raise
        sysrun.end_helper(self.pid, STOP_WAIT)


def start(fetch: Callable[[object], None], packs: list, workers: int) -> Prefetch | None:
    """fetch(pack) of each of packs, workers at a time, in a helper process; None when
    there is nothing to fetch, or where forking is not safe (another thread runs)."""
    if not packs or not parallel.fork_is_safe():
        return None
    return Prefetch(sysrun.fork_helper(_main, fetch, packs, max(1, workers), os.getpid()),
                    len(packs), sum(p.size for p in packs))


def _main(fetch: Callable[[object], None], packs: list, workers: int, parent: int) -> None:
    stop = sysrun.stop_on_sigterm(parent)

    def one(pack) -> None:
        if not stop.is_set():
            with contextlib.suppress(Exception):    # the read that needs it says what fails
                fetch(pack)

    with ThreadPoolExecutor(min(workers, len(packs)), thread_name_prefix="gpusnap-prefetch") as pool:
        for _ in pool.map(one, packs):
            pass
