"""One conformance suite for every store backend: the local directory and S3 (a real
S3 server process on 127.0.0.1, tests/s3server.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil

import pytest
from s3server import FaultProxy, s3_env, s3_server  # noqa: F401

from gpusnap.errors import StoreError, StoreLocked, StoreUnavailable
from gpusnap.store.backends import Missing, for_location


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        backend = for_location(str(tmp_path / "store"))
        backend.init()
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/some/prefix"


@pytest.fixture
def backend(location):
    return for_location(location)


def test_put_get_size_and_missing(backend):
    assert backend.put("snapshots/a.json", b"{}")
    assert backend.get("snapshots/a.json") == b"{}"
    assert backend.size("snapshots/a.json") == 2 and backend.exists("snapshots/a.json")
    assert backend.size("snapshots/b.json") is None
    with pytest.raises(Missing):
        backend.get("snapshots/b.json")


def test_missing_names_what_is_not_there_in_any_directory(backend):
    a, b = "chunks/ab/" + "ab" * 32, "chunks/cd/" + "cd" * 32
    assert backend.put(a, b"x", durable=False)
    backend.refresh("chunks/")
    gone = ["chunks/ab/" + "ef" * 32, b, "chunks/ff/" + "ff" * 32]
    assert sorted(backend.missing([a, *gone])) == sorted(gone)
    assert backend.missing([]) == []


def test_chunks_are_write_once_and_if_absent_keeps_the_first(backend):
    name = "chunks/ab/" + "ab" * 32
    assert backend.put(name, b"one", durable=False)
    assert backend.put(name, b"two", if_absent=True) is False
    assert backend.get(name) == b"one"
    backend.put_many([(name, b"one"), ("chunks/cd/" + "cd" * 32, b"x" * 5000)])
    backend.sync()
    assert backend.get("chunks/cd/" + "cd" * 32) == b"x" * 5000


def test_a_manifest_replaces_atomically(backend):
    backend.put("snapshots/s.json", b"first")
    backend.put("snapshots/s.json", b"second version")
    assert backend.get("snapshots/s.json") == b"second version"


def test_listing_sees_every_object_once_under_its_prefix(backend):
    names = [f"chunks/{i:02x}/{i:02x}" + "0" * 62 for i in range(30)]
    backend.put_many([(n, b"z" * i) for i, n in enumerate(names)])
    backend.put("snapshots/x.json", b"{}")
    listed = dict(backend.list("chunks/"))
    assert listed == {n: i for i, n in enumerate(names)}
    assert [n for n, _ in backend.list("snapshots/")] == ["snapshots/x.json"]
    assert list(backend.get_many(names[:5])) == [b"z" * i for i in range(5)]


def test_refresh_then_sizes_follow_puts_and_deletes(backend):
    backend.put("chunks/00/" + "0" * 64, b"abc", durable=False)
    backend.refresh("chunks/")
    assert backend.size("chunks/00/" + "0" * 64) == 3
    backend.put("chunks/11/" + "1" * 64, b"abcd", durable=False)
    assert backend.size("chunks/11/" + "1" * 64) == 4
    backend.delete("chunks/00/" + "0" * 64)
    assert backend.size("chunks/00/" + "0" * 64) is None


def test_delete_and_delete_many(backend):
    backend.put("snapshots/a.json", b"1")
    backend.put("snapshots/b.json", b"2")
    backend.delete("snapshots/a.json")
    with pytest.raises(Missing):
        backend.delete("snapshots/a.json")
    backend.delete_many(["snapshots/a.json", "snapshots/b.json"])     # a missing one is fine
    assert list(backend.list("snapshots/")) == []


def _holds(location, exclusive, started, release):
    with for_location(location).lock(exclusive=exclusive, timeout=10):
        started.set()
        release.wait(10)


@pytest.mark.parametrize("first,second", [(True, False), (False, True), (True, True)])
def test_locks_exclude_across_holders(location, first, second):
    """Another holder (another backend object: another node) is kept out while the
    first holds a conflicting lock, and gets in once it is released."""
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_holds, args=(location, first, started, release))
    holder.start()
    try:
        assert started.wait(10)
        with pytest.raises(StoreLocked):
            with for_location(location).lock(exclusive=second, timeout=0.5):
                pass
    finally:
        release.set()
        holder.join()
    with for_location(location).lock(exclusive=second, timeout=5):
        pass


def test_shared_locks_share(location):
    with for_location(location).lock(exclusive=False, timeout=5):
        with for_location(location).lock(exclusive=False, timeout=5):
            pass


def test_a_failed_put_leaves_no_object(location, tmp_path, request):
    """Partial failure: a write cut short never shows under its name."""
    backend = for_location(location)
    name = "chunks/ee/" + "e" * 64
    if location.startswith("s3://"):
        server = request.getfixturevalue("s3_server")
        proxy = FaultProxy(server.port)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        proxy.cut_after(1 << 20)                    # the server vanishes mid-body
        backend = for_location(location)
        with pytest.raises(StoreUnavailable):
            backend.put(name, os.urandom(4 << 20), durable=False)
        proxy.restore()
        assert backend.size(name) is None
        backend.put(name, b"retried", durable=False)     # a retry completes
        assert backend.get(name) == b"retried"
        proxy.close()
        return
    import threading
    from gpusnap.store import fsutil
    temp = os.path.join(location, "chunks", "ee", f"{fsutil.TEMP_PREFIX}{'e' * 64}."
                                                  f"{os.getpid()}.{threading.get_ident()}")
    os.makedirs(temp)               # the temp file (beside its name) cannot be made
    with pytest.raises(StoreError):
        backend.put(name, b"data", durable=False)
    assert backend.size(name) is None


def test_a_dead_holders_lock_expires(s3_env, monkeypatch):
    """A lock object left by a node that died stops counting after the TTL (server time)."""
    monkeypatch.setenv("GPUSNAP_S3_LOCK_TTL", "2")
    backend = for_location(f"s3://{s3_env}/p")
    backend.put("locks/deadbeef", json.dumps({"exclusive": True, "host": "gone", "pid": 1}).encode())
    with pytest.raises(StoreLocked):
        with backend.lock(exclusive=False, timeout=0.3):
            pass
    time.sleep(3)
    with backend.lock(exclusive=True, timeout=5):
        assert backend.stale_temps() == ["locks/deadbeef"]


def _lock_objects(backend) -> dict:
    return {n: m for n, _s, m in backend.list_meta("locks/")}


def test_an_interrupt_as_the_lock_object_is_written_leaves_none(s3_env, monkeypatch):
    """A Ctrl-C landing once the server stored the lock object (the request done, its
    answer being read): else the object holds the lock for its TTL, and every other node's
    exclusive lock (gc, rm; or, left by gc, every dump) is refused meanwhile."""
    backend = for_location(f"s3://{s3_env}/cut")
    real = backend.put

    def put(name, data, **kwargs):
        real(name, data, **kwargs)
        if name.startswith("locks/"):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(backend, "put", put)
    with pytest.raises(KeyboardInterrupt):
        with backend.lock(exclusive=True, timeout=5):
            pass
    assert _lock_objects(backend) == {}


def test_a_second_signal_does_not_cut_the_locks_release(s3_env, monkeypatch):
    """The first interrupt unwinds the holder; a second one while the helper is ended
    must not leave the lock object to its TTL."""
    from gpusnap.store.backends import objlock
    backend = for_location(f"s3://{s3_env}/release")
    real = objlock._start_refresher

    def start_refresher(*args):
        stop = real(*args)

        def stop_after_a_second_signal():
            os.kill(os.getpid(), signal.SIGINT)
            stop()
        return stop_after_a_second_signal
    monkeypatch.setattr(objlock, "_start_refresher", start_refresher)
    with pytest.raises(KeyboardInterrupt):
        with backend.lock(exclusive=False, timeout=5):
            raise KeyboardInterrupt     # the first
    assert _lock_objects(backend) == {}


def test_a_held_lock_is_rewritten_by_a_helper_that_is_gone_before_its_object(s3_env, monkeypatch):
    """The holder stays single-threaded (its workers can fork): a helper process rewrites
    the lock object every TTL/4; at release it goes, then the object."""
    monkeypatch.setenv("GPUSNAP_S3_LOCK_TTL", "2")
    backend = for_location(f"s3://{s3_env}/rewrite")
    before = {c.pid for c in psutil.Process().children()}
    with backend.lock(exclusive=False, timeout=5):
        assert threading.active_count() == 1
        helpers = {c.pid for c in psutil.Process().children()} - before
        assert len(helpers) == 1
        (name, first), = _lock_objects(backend).items()
        time.sleep(1.6)
        assert _lock_objects(backend)[name] > first, "the lock object was not rewritten"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in helpers)
    assert _lock_objects(backend) == {}


def test_a_lock_let_go_at_once_ends_its_refresher_at_once(s3_env):
    """The refresher's SIGTERM can come as soon as it is forked, under interrupts.held()
    (whose handler only notes a signal): the helper must still go, not run on until
    end_helper's SIGKILL, REFRESH_STOP_WAIT (30 s) later."""
    from gpusnap.store.backends import objlock
    backend = for_location(f"s3://{s3_env}/quick")
    for _ in range(3):
        started = time.monotonic()
        with backend.lock(exclusive=False, timeout=5):
            pass
        assert time.monotonic() - started < objlock.REFRESH_STOP_WAIT / 3
    assert _lock_objects(backend) == {}
