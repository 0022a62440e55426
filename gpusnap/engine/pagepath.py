"""How a process snapshot's memory gets into the restored tree: the two page paths.

    criu  materialise every image (pages included) into the work dir; CRIU restore writes
          each page into the new tasks, from one thread
    uffd  materialise all but what CRIU's lazy restore skips (criu/lazy.py); CRIU restore
          --lazy-pages; gpusnap's workers place the pages straight from the store's chunks
          through userfaultfd while CRIU waits on the tasks it restores; then continue

strategies/process.py runs one of them between "plan" and "CUDA restore".
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

from .. import interrupts
from ..criu import lazy
from ..criu import runner as criu_runner
from ..errors import CriuFailed, UsageError
from ..imagefile import core
from ..model import FileEntry
from ..store import codec, parallel
from . import gpu

PATHS = ("auto", "uffd", "criu")
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}


def uffd_available() -> tuple[bool, str]:
    """Whether this host lets gpusnap serve CRIU's lazy restore (and why not)."""
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is None:
        return False, f"userfaultfd: unknown syscall number on {os.uname().machine}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False, f"userfaultfd: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return True, "userfaultfd works"


def choose(asked: str, kind: str) -> tuple[str, list[str]]:
    """The page path a restore takes, and notes. auto: uffd where it works."""
    if asked not in PATHS:
        raise UsageError(f"--pages must be one of {', '.join(PATHS)}")
    if kind != "process":
        if asked == "uffd":
            raise UsageError("--pages uffd is for process snapshots (containers restore "
                             "through their engine's CRIU)")
        return "criu", []
    if asked == "criu":
        return "criu", []
    ok, why = uffd_available()
    if ok:
        return "uffd", []
    if asked == "uffd":
        raise UsageError(f"--pages uffd: {why}")
    return "criu", [f"pages through CRIU ({why})"]


@dataclass
class Fill:
    """What the uffd path measured."""
    bytes: int = 0
    seconds: float = 0.0
    workers: int = 0
    mode: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        gbps = self.bytes / self.seconds / 1e9 if self.seconds else None
        return {"bytes": self.bytes, "seconds": round(self.seconds, 4), "workers": self.workers,
                "mode": self.mode, "gb_per_s": round(gbps, 2) if gbps else None}


@dataclass
class Prepared:
    """What the uffd path needs before CRIU starts: the images dir CRIU reads (every image
    but the lazy pages, pagemaps marked PE_LAZY), how many tasks hand over a userfaultfd,
    the fill's work (criu/lazy.fill_items: every lazy page of the dump) and the pids that
    were stopped at the dump. A warm cache keeps one (engine/imagecache.py)."""
    images: str
    tasks: int
    items: list[tuple]
    stopped: set[int]

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "stopped": sorted(self.stopped),
                "items": [[cid, n, [list(p) for p in pieces]] for cid, n, pieces in self.items]}

    @classmethod
    def from_json(cls, images: str, data: dict) -> "Prepared":
        """ValueError unless data has the shape to_json gives."""
        try:
            items = [(_cid(cid), _int(n), [tuple(_int(x) for x in p) for p in pieces])
                     for cid, n, pieces in data["items"]]
            if any(len(p) != 4 for _c, _n, pieces in items for p in pieces):
                raise ValueError("a piece is (pid, vaddr, offset, length)")
            return cls(images, _int(data["tasks"]), items, {_int(p) for p in data["stopped"]})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a prepared uffd restore: {exc}") from None


def _int(value) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _cid(value) -> str | None:
    if value is not None and not (isinstance(value, str) and value.isalnum()):
        raise ValueError(f"{value!r} is not a chunk id")
    return value


def prepare(repo, m, images: str, progress=None) -> Prepared:
    """Materialise what CRIU reads itself into images (verified), the pagemaps rewritten
    with PE_LAZY, and plan the fill."""
    entries = {f.path: f for f in m.files}
    pages, pagemaps = lazy.prepare(list(entries), lambda name: _read(repo, entries[name]))
    repo.materialise(m, images, progress, only=pages.eager)
    for name, data in pagemaps.items():
        with open(os.path.join(images, name), "wb") as f:
            f.write(data)
    items = lazy.fill_items(pages, {n: e.chunks for n, e in entries.items()}, codec.ZERO_ID)
    return Prepared(images, pages.tasks, items, _stopped_at_dump(images))


class UffdPages:
    """One restore's uffd page path (strategies/process.py runs it in place of CRIU's)."""

    def __init__(self):
        self.guard: lazy.Guard | None = None
        self.fill = Fill()

    def restore(self, plan, repo, work: str, prep: Prepared, stages, progress):
        """Up to a restored, filled, continued tree: (root pid, the cuInit thread or None).
        cuInit starts once the fill's workers are forked (no thread may run before)."""
        m = plan.manifest
        with interrupts.held():                 # kept before a signal is raised: abort() ends it
            self.guard = lazy.Guard.start(work, repo, prep.items)
        opts = dataclasses.replace(plan.criu_options, lazy_pages=True, leave_stopped=True)
        cuinit: list = []
        running = None
        try:
            with interrupts.held():             # a CRIU started is a CRIU stopped below
                running = criu_runner.start_restore(prep.images, opts, work_dir=work,
                                                    criu=plan.criu_path)
            with stages.stage("criu_restore"):      # until every task's userfaultfd is here
                fds = self.guard.receive(prep.tasks, alive=lambda: not running.exited())
            with stages.stage("uffd_fill"):         # CRIU waits on the tasks meanwhile
                self.fill = _fill(repo, fds, prep.items, progress,
                                  lambda: m.cuda and cuinit.append(gpu.init_in_background()))
        except BaseException as exc:
            if running is None:
                raise
            if isinstance(exc, CriuFailed):
                _raise_criu_failure(running)    # CRIU's own error, where it failed first
            running.proc.kill()                 # CRIU waits on tasks nobody serves now
            running.wait()
            raise
        with stages.stage("criu_finish"):
            root = criu_runner.finish_restore(running)
            self.guard.release()
        for pid in self.guard.pids:
            if pid not in prep.stopped:
                _continue(pid)
        return root, (cuinit[0] if cuinit else None)

    def done(self) -> None:
        """The restore succeeded and is reported: the guard lets the tree be."""
        if self.guard:
            self.guard.close(done=True)
            self.guard = None

    def abort(self) -> None:
        """The restore failed: the guard kills whatever CRIU restored, then goes."""
        if self.guard:
            self.guard.close(done=False)
            self.guard = None


CRIU_EXIT_WAIT = 2.0        # seconds a CRIU that stopped handing over userfaultfds has to exit


def _raise_criu_failure(running) -> None:
    """The page path failed while CRIU restored (too few userfaultfds came): when CRIU
    itself failed (it closes the lazy-pages socket on its way out), its error is raised,
    which says why; else nothing is."""
    if running.exit_code(within=CRIU_EXIT_WAIT) not in (None, 0):
        criu_runner.finish_restore(running)     # raises CRIU's failure, with its log's errors


def _fill(repo, fds: dict[int, int], items: list, progress, on_forked) -> Fill:
    batches = parallel.batches(items, lambda it: it[1])
    workers = parallel.workers()
    repo.prepare_reads()
    started = time.perf_counter()
    mode, results = parallel.run(lazy.fill_batch, (repo, fds, batches), len(batches), workers)
    placed, first = 0, True
    try:
        for n in results:
            placed += n
            if first:
                on_forked()
                first = False
            if progress:
                progress(n)
    finally:
        results.close()
    if first:
        on_forked()
    return Fill(bytes=placed, seconds=time.perf_counter() - started, workers=workers, mode=mode)


def _stopped_at_dump(images: str) -> set[int]:
    """Pids whose core image says they were stopped at the dump: they stay stopped."""
    out = set()
    for name in os.listdir(images):
        if name.startswith("core-") and name.endswith(".img"):
            with open(os.path.join(images, name), "rb") as f:
                if core.task_state(f) == core.TASK_STOPPED:
                    out.add(int(name[len("core-"):-len(".img")]))
    return out


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _read(repo, entry: FileEntry) -> bytes:
    """A small image file's bytes, straight from the store (verified)."""
    return b"".join(repo.read_chunk(cid, n) for cid, n in entry.chunks)
