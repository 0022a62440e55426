"""parallel.Background: one job on a forked process while the caller goes on (a dump's
--seed), its value or error back, stopped and reaped on demand; and the local store's
batched put, which writes a chunk once though two writers store it at the same time."""

from __future__ import annotations

import os
import threading
import time

import pytest

from gpusnap.errors import StoreFull
from gpusnap.store import parallel
from gpusnap.store.backends.local import LocalBackend


def _pid(job, index):
    return os.getpid(), job, index


def _full(job, index):
    raise StoreFull("no space left while writing x")


def _sleep(path, index):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def test_the_job_runs_in_another_process_and_its_value_comes_back():
    job = parallel.Background(_pid, "job")
    pid, got, index = job.result()
    assert pid != os.getpid() and (got, index) == ("job", 0)
    with pytest.raises(ChildProcessError):      # reaped
        os.waitpid(pid, os.WNOHANG)


def test_its_error_is_raised_with_its_class():
    job = parallel.Background(_full, None)
    with pytest.raises(StoreFull, match="no space left"):
        job.result()


def test_stop_ends_a_job_still_running_and_reaps_it(tmp_path):
    marker = tmp_path / "pid"
    job = parallel.Background(_sleep, str(marker))
    deadline = time.monotonic() + 10
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = int(marker.read_text())
    job.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    job.stop()                                  # twice: nothing more to do


def test_where_forking_is_not_safe_it_runs_at_once_here():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        job = parallel.Background(_pid, "job")
        assert job.result()[0] == os.getpid()
    finally:
        stop.set()
        other.join()


def test_a_chunk_another_writer_stored_meanwhile_is_left_as_it_is(tmp_path):
    store = LocalBackend(str(tmp_path / "store"))
    name = "chunks/ab/" + "ab" * 32
    assert store.put_many([(name, b"first")]) == set()
    assert store.put_many([(name, b"second"), ("chunks/cd/" + "cd" * 32, b"x")]) == {name}
    assert store.get(name) == b"first"
    assert store.get("chunks/cd/" + "cd" * 32) == b"x"


def test_a_dumps_seed_takes_a_quarter_of_the_cpus_at_least_two():
    from gpusnap.engine.seeding import seed_workers
    assert [seed_workers(n) for n in (1, 2, 8, 16, 64)] == [2, 2, 2, 4, 16]
