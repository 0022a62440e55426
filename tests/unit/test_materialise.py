"""store.materialise: the files come out byte for byte, from worker processes and from
threads, and a corrupt chunk fails the whole materialise (no hang, whatever handlers the
CLI installed)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import pytest

from gpusnap.errors import IntegrityError
from gpusnap.model import Manifest, Target
from gpusnap.store import Repository, parallel


@pytest.fixture
def stored(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "BATCH_BYTES", 1 << 20)        # several batches
    src = tmp_path / "img"
    src.mkdir()
    data = {"pages-1.img": os.urandom(3 << 20) + bytes(2 << 20) + os.urandom(1 << 20),
            "sub/core-1.img": b"core" * 1000, "empty.img": b""}
    for name, blob in data.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(blob)
    repo = Repository.open(str(tmp_path / "store"))
    files, _ = repo.ingest_dir(str(src))
    return repo, Manifest(target=Target("process", 1, [1]), pids=[1],
                          files=files), data


def _read_all(dest, data):
    return {name: open(os.path.join(dest, name), "rb").read() for name in data}


@pytest.mark.parametrize("threaded", [False, True])
def test_files_come_out_as_they_went_in(stored, tmp_path, threaded):
    repo, manifest, data = stored
    blocker = threading.Event()
    extra = threading.Thread(target=blocker.wait) if threaded else None   # forking unsafe
    if extra:
        extra.start()
    try:
        repo.materialise(manifest, str(tmp_path / "out"))
    finally:
        blocker.set()
    assert repo.last_materialise["mode"] == ("threads" if threaded else "processes")
    assert _read_all(tmp_path / "out", data) == data


def test_a_corrupt_chunk_fails_it_even_with_a_raising_sigterm_handler(stored, tmp_path):
    repo, manifest, _ = stored
    pages = next(f for f in manifest.files if f.path == "pages-1.img")
    cid = pages.chunks[-1][0]
    path = repo.chunk_path(cid)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0x40
    open(path, "wb").write(blob)

    def raising(*_):
        raise RuntimeError("SIGTERM")       # what the CLI's handler does, in spirit
    old = signal.signal(signal.SIGTERM, raising)
    try:
        with pytest.raises(IntegrityError):
            repo.materialise(manifest, str(tmp_path / "out"))
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_path_escaping_the_destination_is_refused(stored, tmp_path):
    repo, manifest, _ = stored
    pages = next(f for f in manifest.files if f.path == "pages-1.img")
    # A loaded manifest cannot hold such a path (test_model); materialise checks again.
    bad = dataclasses.replace(manifest, files=[dataclasses.replace(pages, path="../escape.img")])
    with pytest.raises(IntegrityError, match="escapes"):
        repo.materialise(bad, str(tmp_path / "out"))


def test_a_worker_killed_midway_fails_it_instead_of_hanging(stored, tmp_path, monkeypatch):
    """The OOM killer taking a worker: materialise raises, it does not wait forever."""
    import signal as sig

    from gpusnap.errors import StoreError
    repo, manifest, _ = stored
    real = repo.read_blob
    parent = os.getpid()

    def read_blob(cid):
        if os.getpid() != parent:
            os.kill(os.getpid(), sig.SIGKILL)     # in a worker
        return real(cid)
    monkeypatch.setattr(repo, "read_blob", read_blob)
    with pytest.raises(StoreError, match="worker process died"):
        repo.materialise(manifest, str(tmp_path / "out"))
