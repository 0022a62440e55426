"""How many workers a dump's page stream forks: more than the CPUs only where each
chunk costs CPU to encode (store/parallel.py's stream_workers)."""

from gpusnap import hostcpu
from gpusnap.store import codec, parallel


def test_only_bf16_and_real_zstd_levels_count_as_compressing():
    assert codec.compresses(codec.BF16)
    assert codec.compresses(1) and codec.compresses(19)
    assert not codec.compresses(codec.FAST)
    assert not codec.compresses(codec.NO_COMPRESSION)


def test_a_compressing_stream_gets_twice_the_cpus_at_most_32(monkeypatch):
    monkeypatch.delenv("GPUSNAP_THREADS", raising=False)
    for cpus, want in ((1, 2), (2, 4), (8, 16), (16, 32), (64, 32)):
        monkeypatch.setattr(hostcpu, "count", lambda c=cpus: c)
        assert parallel.stream_workers(True) == want
        assert parallel.stream_workers(False) == parallel.workers()


def test_gpusnap_threads_decides_where_set(monkeypatch):
    monkeypatch.setattr(hostcpu, "count", lambda: 16)
    monkeypatch.setenv("GPUSNAP_THREADS", "5")
    assert parallel.stream_workers(True) == 5
    assert parallel.stream_workers(False) == 5
    monkeypatch.setenv("GPUSNAP_THREADS", "zero")           # not a count: the default
    assert parallel.stream_workers(True) == 32


def _slow(job, i):
    import time
    time.sleep(job)
    return i


def test_sigterm_while_a_result_comes_in_stops_the_workers(monkeypatch):
    """The CI hang of stop 29: SIGTERM (Interrupted, under the CLI) raised while the
    parent read a worker's result was taken for a message cut short; the parent then
    waited for that worker, which went on with its batches and blocked on its full pipe."""
    import time

    import pytest

    from gpusnap.errors import Interrupted
    calls = []

    def load(f):
        calls.append(f)
        raise Interrupted("interrupted")
    monkeypatch.setattr(parallel.pickle, "load", load)
    mode, results = parallel.run(_slow, 0.05, 40, 2)
    assert mode == "processes"
    started = time.monotonic()
    with pytest.raises(Interrupted):
        list(results)
    assert calls and time.monotonic() - started < 1.5     # stopped, not 20 batches waited for


def _niceness(job, task):
    import os
    return os.nice(0)


def test_stream_workers_take_the_niceness_asked_and_the_caller_keeps_its_own():
    import os
    own = os.nice(0)
    stream = parallel.Stream(_niceness, None, 2, nice=7)
    try:
        for i in range(4):
            stream.submit(i, i)
        got = [value for _tag, value in stream.finish()]
    finally:
        stream.close()
    assert got == [min(19, own + 7)] * 4
    assert os.nice(0) == own


def test_the_page_streams_niceness_comes_from_gpusnap_stream_nice(monkeypatch):
    from gpusnap.store import pagestream
    monkeypatch.delenv("GPUSNAP_STREAM_NICE", raising=False)
    assert pagestream.worker_nice() == pagestream.NICE
    for raw, want in (("10", 10), ("0", 0), ("40", 19), ("-5", pagestream.NICE), ("x", pagestream.NICE)):
        monkeypatch.setenv("GPUSNAP_STREAM_NICE", raw)
        assert pagestream.worker_nice() == want
