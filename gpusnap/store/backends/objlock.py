"""Store locks on object storage, where there is no flock: lock objects with expiry
(restic's design).

A holder writes `locks/<random>` ({exclusive, host, pid}), then lists `locks/`. It holds
the lock when no other live lock conflicts (any exclusive one; or any at all when it wants
exclusive); otherwise it deletes its object and tries again after a random pause, until
the timeout (StoreLocked). Two lockers that both write, then both list, see each other and
both back off: with list-after-write consistency (S3 since 2020, MinIO, Ceph RGW, R2) two
conflicting holders can never both proceed, since whichever listed second saw the other.

Expiry instead of a kernel that drops the lock of a dead holder: a lock object whose
server-side Last-Modified is older than the TTL (GPUSNAP_S3_LOCK_TTL, default 300 s) is
stale and ignored (gc deletes it). The age is measured against the server's own clock
(the Last-Modified of our own lock object, written just before), so client clocks do not
matter. A holder rewrites its object every TTL/4, from a forked helper process (from a
daemon thread where the holder already runs threads); the helper is gone before the
object is deleted. A holder that cannot reach the store for a whole
TTL may lose its lock; commit then still refuses to write a manifest whose chunks vanished.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import secrets
import socket
import threading
import time
from typing import Callable, Iterator

from ... import interrupts, sysrun
from ...errors import StoreLocked
from .. import parallel
from .base import Missing

PREFIX = "locks/"
REFRESH_STOP_WAIT = 30.0    # seconds a rewrite in flight has to end at release


def ttl() -> float:
    value = os.environ.get("GPUSNAP_S3_LOCK_TTL", "300")
    try:
        return max(1.0, float(value))
    except ValueError:
        return 300.0


@contextlib.contextmanager
def object_lock(backend, *, exclusive: bool, timeout: float) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    body = json.dumps({"exclusive": exclusive, "host": socket.gethostname(),
                       "pid": os.getpid()}).encode()
    name = stop_refresher = None
    try:
        while True:
            # named before the put: one cut short may have written the object all the same
            name = PREFIX + secrets.token_hex(16)
            backend.put(name, body)
            conflict = _conflict(backend, name, exclusive)
            if not conflict:
                break
            backend.delete_many([name])
            name = None
            if time.monotonic() >= deadline:
                kind = "exclusive" if exclusive else "shared"
                raise StoreLocked(f"could not take the {kind} store lock within {timeout:.0f}s "
                                  f"(held by {conflict})",
                                  hint="another gpusnap rm/gc or dump is running on some node; a "
                                       f"lock of a node that died expires after {ttl():.0f}s")
            time.sleep(random.uniform(0.1, 0.6))
        with interrupts.held():             # the helper is kept before a signal is raised
            stop_refresher = _start_refresher(backend, name, body)
        yield
    finally:
        # a second Ctrl-C must not leave the object to hold the lock for its TTL
        with interrupts.shielded():
            if stop_refresher:
                stop_refresher()            # no rewrite lands after the delete
            if name:
                backend.delete_many([name])


def _start_refresher(backend, name: str, body: bytes) -> Callable[[], None]:
    """Rewrite the lock object every TTL/4 until the returned function is called: in a
    forked helper process where no other thread runs (a thread here would stop the
    holder's own workers from forking: parallel.py), else on a daemon thread."""
    if parallel.fork_is_safe():
        pid = sysrun.fork_helper(_refresh_main, backend, name, body, os.getpid())
        return lambda: sysrun.end_helper(pid, REFRESH_STOP_WAIT)
    stop = threading.Event()
    refresher = threading.Thread(target=_refresh, args=(backend, name, body, stop),
                                 name="gpusnap-lock", daemon=True)
    refresher.start()

    def end() -> None:
        stop.set()
        refresher.join()
    return end


def _refresh_main(backend, name: str, body: bytes, holder: int) -> None:
    """The helper: rewrites until SIGTERM (or the holder's death: a lock must not outlive
    its holder by more than the TTL)."""
    _refresh(backend, name, body, sysrun.stop_on_sigterm(holder))


def _conflict(backend, mine: str, exclusive: bool) -> str | None:
    """A description of a live lock that conflicts with ours, or None."""
    entries = list(backend.list_meta(PREFIX))
    now = next((m for n, _s, m in entries if n == mine), None)
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    limit = ttl()
    for name, _size, modified in entries:
        if name == mine or (now - modified).total_seconds() > limit:
            continue
        try:
            other = json.loads(backend.get(name))
        except (Missing, ValueError):
            continue                        # released meanwhile, or not a lock of ours
        if exclusive or other.get("exclusive"):
            kind = "exclusive" if other.get("exclusive") else "shared"
            return f"a {kind} lock of pid {other.get('pid')} on {other.get('host')}"
    return None


def stale(backend) -> list[str]:
    """Lock objects older than the TTL by the server's clock (for gc to remove)."""
    entries = list(backend.list_meta(PREFIX))
    if not entries:
        return []
    now = max(m for _n, _s, m in entries)     # gc's own lock: the server's time, about
    return [n for n, _s, m in entries if (now - m).total_seconds() > ttl()]


def _refresh(backend, name: str, body: bytes, stop: threading.Event) -> None:
    while not stop.wait(ttl() / 4):
        with contextlib.suppress(Exception):    # a missed refresh is retried next period
            backend.put(name, body)
