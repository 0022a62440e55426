"""A dump's --seed: the model's weights files stored as a seed (store/seed.py) while the
dump runs, so that their bytes go to the disk while the CUDA driver copies the GPU's
memory to the host, a time the disk otherwise waits through. The page stream's workers
then find the chunks of every tensor the seed holds already stored (a local store looks
each chunk up as it goes) and write only the rest; what the seed has not reached yet
they write themselves, and the seed then finds it there. The dump waits for the seed
before its commit, so that both are done when it returns.

A seed of the same files as they are now (store/seed.py, already_seeded) is used as it is:
the files are not read again.

The seed runs on a process of its own (parallel.Background), forked before the CUDA lock;
the dump's undo stops it (SIGTERM; the chunks it stored stay, unreferenced until gc when
no snapshot uses them, like those of a failed dump). It runs niced (NICE), on a quarter of
the CPUs (SHARE): on an H200 with all 16 CPUs hashing at normal priority, the 8B server's
checkpoint by the driver took 11.0 s instead of ~5.5 (one run,
benchmarks/results/seed_dump_h200_8b_s23_inline.md), the disk needing far fewer.
"""

from __future__ import annotations

import os
import time

from .. import hostcpu
from ..errors import GpusnapError, Interrupted, UsageError
from ..store import Repository, parallel
from ..store import seed as seeds
from ..targets import weights


def discover(pids: list[int]) -> tuple[weights.Found, list[str]]:
    """The weights files the processes of pids name (targets/weights.py: `dump --seed
    auto`, `seed add --pid`), held open; those whose header is no safetensors header left
    out (said, not refused: the target named them, not the user). (Found, the sources
    left out)."""
    found = weights.discover(pids)
    keep, skipped = [], []
    for i, path in enumerate(found.paths):
        try:
            seeds.tensor_ranges(path)
            keep.append(i)
        except UsageError:
            skipped.append(found.sources[i])
    found.keep(keep)
    return found, skipped


class InlineSeed:
    """One dump's seed: started (or found) at construction, then wait() or stop()."""

    def __init__(self, repo: Repository, files: list[str], sources: list[str]):
        """files: the paths to read; sources: the names the seed's record keeps."""
        self.started = time.perf_counter()
        self.report: dict | None = None
        self.running: parallel.Background | None = None
        self.sources = list(sources)
        found = seeds.already_seeded(repo.seeds()[0], files, self.sources)
        if found is not None:
            self.report = {"id": found.id, "reused": True, "bytes_seeded": found.bytes_seeded,
                           "bytes_new": 0, "seconds": 0.0, "sources": self.sources}
        else:
            self.running = parallel.Background(_add, (repo, files, self.sources))

    def wait(self) -> dict:
        """The seed's report once it is recorded; a seed that failed is reported with its
        "error" (the snapshot does not depend on it: what it lacked the dump stored)."""
        if self.running is not None:
            try:
                record_id, seeded, new = self.running.result()
                report = {"id": record_id, "reused": False, "bytes_seeded": seeded, "bytes_new": new}
            except Interrupted:
                raise                   # still running: stop() ends it
            except GpusnapError as exc:
                report = {"id": None, "reused": False, "error": exc.message}
            self.running = None
            self.report = {**report, "seconds": round(time.perf_counter() - self.started, 3),
                           "sources": self.sources}
        return self.report

    def stop(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.stop()


NICE = 10                       # the driver's checkpoint, CRIU and the page stream first
SHARE = 4                       # of the CPUs gpusnap may use (hostcpu.py), at least 2


WORKERS_ENV = "GPUSNAP_SEED_WORKERS"     # a count: the seed's workers (benchmarks)


def seed_workers(cpus: int) -> int:
    raw = os.environ.get(WORKERS_ENV, "")
    if raw.isdigit() and int(raw) > 0:
        return min(int(raw), max(cpus, 1) * 2)
    return max(2, cpus // SHARE)


def _add(job, _index: int) -> tuple[str, int, int]:
    """In the seed's process: the seed stored and recorded; (id, bytes seeded, bytes new)."""
    repo, files, sources = job
    os.nice(NICE)                   # its workers, forked from here, inherit it
    record, tally = repo.add_seed(files, name="dump --seed",
                                  workers=seed_workers(hostcpu.count()), sources=sources)
    return record.id, record.bytes_seeded, tally.new
