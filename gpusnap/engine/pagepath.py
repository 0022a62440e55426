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
from ..cuda import hugepages, staging
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
    late_bytes: int = 0             # placed while the tree ran (GPUSNAP_UFFD_OVERLAP)
    early_seconds: float | None = None
    direct_bytes: int = 0           # written outside the uffd, in huge pages (GPUSNAP_STAGING_THP)
    huge_pages: bool = False        # the host's THP mode was 'always' meanwhile

    def to_dict(self) -> dict:
        gbps = self.bytes / self.seconds / 1e9 if self.seconds else None
        out = {"bytes": self.bytes, "seconds": round(self.seconds, 4), "workers": self.workers,
               "mode": self.mode, "gb_per_s": round(gbps, 2) if gbps else None}
        if self.late_bytes:
            out.update(late_bytes=self.late_bytes, early_seconds=round(self.early_seconds or 0, 4))
        if self.direct_bytes:
            out.update(direct_bytes=self.direct_bytes, huge_pages=self.huge_pages)
        return out


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


OVERLAP_ENV = "GPUSNAP_UFFD_OVERLAP"
STAGING_THP_ENV = "GPUSNAP_STAGING_THP"
TEST_LATE_ENV = "GPUSNAP_TEST_LATE"     # "largest": each pid's largest run is late (CPU tests)


def staging_thp_wanted(setting: str | None, huge_pages: bool, thp_mode: str | None) -> bool:
    """Whether the fill writes the staging memory in huge pages. setting: GPUSNAP_STAGING_THP
    ("1": yes; "auto": where huge pages are on (GPUSNAP_HUGE_PAGES) and the host's THP mode
    gives them: 'madvise', which the window switches, or 'always'; unset, "0", "off": no).
    Off by default: on the H200 (benchmarks/results/cold_start_h200_8b_stagingthp.md,
    cold_start_h200_1b_stagingthp.md) the 8B server's median restore to first token went
    5.82 -> 5.09 s over 3 runs, but a node's first restore with it was the slowest of its
    variant (8B 5.58 s against 4.93 s without; 1.3B 2.88 s against 2.2 s: the fill into
    fresh huge pages took 1.09 s instead of 0.3 s), and a fleet node's first restore is the
    one that counts."""
    value = (setting or "off").strip().lower()
    if value in hugepages.OFF:
        return False
    if value == "auto":
        return huge_pages and thp_mode in ("madvise", "always")
    return True


def huge_ranges(m, items: list[tuple]) -> dict[int, list[tuple[int, int]]]:
    """What the fill writes in huge pages (staging_thp_wanted(), not with the overlap):
    the driver's staging memory of each CUDA pid, which its CUDA restore reads faster from
    2 MiB pages (H200, 8 GiB: 2.16 -> 1.27 s, benchmarks/results/dump_probe_h200_thp.md);
    the fill's UFFDIO_COPY places 4 KiB pages. {} otherwise."""
    if os.environ.get(OVERLAP_ENV) == "1":
        return {}
    if not staging_thp_wanted(os.environ.get(STAGING_THP_ENV), hugepages.enabled(),
                              hugepages.read_mode()):
        return {}
    return _staging(m, items)


def late_ranges(m, items: list[tuple]) -> dict[int, list[tuple[int, int]]]:
    """What the fill places after the tree is continued (GPUSNAP_UFFD_OVERLAP=1): the
    driver's staging memory of each CUDA pid (cuda/staging.py), which its CUDA restore
    reads while the rest is filled; {} otherwise, and for a snapshot that did not record it."""
    if os.environ.get(OVERLAP_ENV) != "1":
        return {}
    return _staging(m, items)


def _staging(m, items: list[tuple]) -> dict[int, list[tuple[int, int]]]:
    """The staging ranges the manifest records for its CUDA pids (in CPU tests, each
    pid's largest run of pages: GPUSNAP_TEST_LATE=largest)."""
    if os.environ.get(TEST_LATE_ENV) == "largest":
        return _largest_runs(items)
    if not m.cuda:
        return {}
    ranges = m.cuda.staging_ranges()
    return {pid: spans for pid, spans in ranges.items() if pid in m.cuda.pids}


def _largest_runs(items: list[tuple]) -> dict[int, list[tuple[int, int]]]:
    """Each pid's largest run of contiguous lazy pages (the stand-in for staging memory
    in tests without a GPU)."""
    by_pid: dict[int, list[tuple[int, int]]] = {}
    for _cid, _n, pieces in items:
        for pid, vaddr, _off, length in pieces:
            by_pid.setdefault(pid, []).append((vaddr, vaddr + length))
    out = {}
    for pid, spans in by_pid.items():
        runs: list[list[int]] = []
        for start, end in sorted(spans):
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], end)
            else:
                runs.append([start, end])
        start, end = max(runs, key=lambda r: r[1] - r[0])
        out[pid] = [(start, end)]
    return out


class UffdPages:
    """One restore's uffd page path (strategies/process.py runs it in place of CRIU's).

    With late ranges (late_ranges()), the fill runs in two parts on the same workers:
    everything else first, the tasks stopped; then the tree is continued (its CUDA
    restore needs it running) while the workers place the late ranges, which only the
    driver reads, and the guard serves any page a task faults on (finish_late())."""

    def __init__(self):
        self.guard: lazy.Guard | None = None
        self.fill = Fill()
        self.filling: _Filling | None = None

    def restore(self, plan, repo, work: str, prep: Prepared, stages, progress):
        """Up to a restored, filled (all but the late ranges), continued tree: (root pid,
        the cuInit thread or None). cuInit starts once the fill's workers are forked (no
        thread may run before)."""
        m = plan.manifest
        late = late_ranges(m, prep.items)
        early, later = staging.split_items(prep.items, late)
        with interrupts.held():                 # kept before a signal is raised: abort() ends it
            self.guard = lazy.Guard.start(work, repo, prep.items, late if later else None)
        opts = dataclasses.replace(plan.criu_options, lazy_pages=True, leave_stopped=True)
        cuinit: list = []
        running = None
        try:
            with interrupts.held():             # a CRIU started is a CRIU stopped below
                running = criu_runner.start_restore(prep.images, opts, work_dir=work,
                                                    criu=plan.criu_path)
            with stages.stage("criu_restore"):      # until every task's userfaultfd is here
                fds = self.guard.receive(prep.tasks, alive=lambda: not running.exited())
            direct: list = []
            huge = huge_ranges(m, prep.items)
            if huge:                                # out of the uffd: written, in huge pages
                early, direct = staging.split_items(early, lazy.unregister_spans(fds, huge))
            with stages.stage("uffd_fill"), hugepages.window(on=None if direct else False) as switched:
                self.filling = _Filling(repo, fds, early, later, progress,
                                        lambda: m.cuda and cuinit.append(gpu.init_in_background()),
                                        direct)
                self.filling.wait_early()
        except BaseException as exc:
            self.stop_filling()
            if running is None:
                raise
            if isinstance(exc, CriuFailed):
                _raise_criu_failure(running)    # CRIU's own error, where it failed first
            running.proc.kill()                 # CRIU waits on tasks nobody serves now
            running.wait()
            raise
        with stages.stage("criu_finish"):
            root = criu_runner.finish_restore(running)
            if self.filling.pending:
                self.guard.late()
            else:
                self.fill = self.filling.result()
                self.fill.huge_pages = switched
                self.filling = None
                self.guard.release()
        for pid in self.guard.pids:
            if pid not in prep.stopped:
                _continue(pid)
        return root, (cuinit[0] if cuinit else None)

    @property
    def pending(self) -> bool:
        """Late ranges are still being placed (finish_late() has not run)."""
        return self.filling is not None

    def finish_late(self, stages) -> None:
        """Wait for the late ranges to be in, then release the descriptors (the guard
        refuses when the tree forked or remapped them meanwhile: lazy.late_change)."""
        if self.filling is None:
            return
        with stages.stage("uffd_fill_late"):
            try:
                self.fill = self.filling.finish()
            finally:
                self.filling = None
            self.guard.release()

    def stop_filling(self) -> None:
        """The fill's workers stop (a failure); nothing once the fill is done."""
        if self.filling is not None:
            self.filling.stop()
            self.filling = None

    def done(self) -> None:
        """The restore succeeded and is reported: the guard lets the tree be."""
        if self.guard:
            self.guard.close(done=True)
            self.guard = None

    def abort(self) -> None:
        """The restore failed: the workers stop, the guard kills whatever CRIU
        restored, then goes."""
        self.stop_filling()
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


class _Filling:
    """One parallel run of the fill over the early batches, then the late ones: worker
    k takes batches k, k+W, ... (store/parallel.py), so every worker places its early
    share first. wait_early() returns once every early batch is in; finish() once all
    are. The workers go on by themselves meanwhile (their results are a few bytes each)."""

    def __init__(self, repo, fds: dict[int, int], early: list, late: list, progress, on_forked,
                 direct: list = ()):
        size = lambda it: it[1]     # noqa: E731
        first, rest = parallel.batches(early, size), parallel.batches(late, size)
        if rest and not first:      # the workers fork at the first wait: before cuInit's thread
            first, rest = rest[:1], rest[1:]
        direct_batches = parallel.batches(list(direct), size) if direct else []
        span = (len(first), len(first) + len(direct_batches))
        first = first + direct_batches  # placed before the tree runs, like the early ones
        self.direct_bytes = sum(p[3] for it in direct for p in it[2] if it[0] is not None)
        self.first_late = len(first)
        self.early_left = len(first)
        self.late_left = len(rest)
        self.progress, self.on_forked = progress, on_forked
        self.workers = parallel.workers()
        self.placed = 0
        self.late_bytes = sum(p[3] for it in late for p in it[2])
        repo.prepare_reads(it[0] for it in (*early, *late, *direct) if it[0] is not None)
        self.started = time.perf_counter()
        self.early_s = 0.0
        self.mode, self.results = parallel.run(
            lazy.fill_batch, (repo, fds, first + rest, len(first), span), len(first) + len(rest),
            self.workers)
        self.forked = False

    @property
    def pending(self) -> bool:
        return self.late_left > 0

    def wait_early(self) -> None:
        try:
            while self.early_left:
                self._one(next(self.results))
        except BaseException:
            self.stop()
            raise
        self._forked()                  # no batch at all: cuInit's thread starts here
        self.early_s = time.perf_counter() - self.started
        if not self.late_left:
            self._drain()

    def finish(self) -> Fill:
        try:
            while self.late_left:
                self._one(next(self.results))
            self._drain()
        except BaseException:
            self.stop()
            raise
        return self.result()

    def result(self) -> Fill:
        return Fill(bytes=self.placed, seconds=time.perf_counter() - self.started,
                    workers=self.workers, mode=self.mode, late_bytes=self.late_bytes,
                    early_seconds=self.early_s if self.late_bytes else None,
                    direct_bytes=self.direct_bytes)

    def stop(self) -> None:
        """The workers go (SIGTERM) and are reaped."""
        self.results.close()

    def _one(self, got) -> None:
        index, n = got
        self._forked()
        self.placed += n
        if index < self.first_late:
            self.early_left -= 1
        else:
            self.late_left -= 1
        if self.progress:
            self.progress(n)

    def _drain(self) -> None:
        for _ in self.results:          # the generator's end: the workers' "done"s
            pass

    def _forked(self) -> None:
        if not self.forked:
            self.forked = True
            self.on_forked()


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
