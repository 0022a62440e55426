"""Intent records are read as untrusted input; recovery never follows a path it was given
blindly (the kill -9 cases themselves, with real CRIU: tests/integration/test_kill9.py)."""

from __future__ import annotations

import json
import os

import pytest

from gpusnap.engine import intent


def _good(tmp_path) -> dict:
    return intent.Record(op="dump", owner=4242, owner_started=1.0, began=2.0,
                         work=str(tmp_path / "dump-4242-abc"), root=77, pids=[77, 78],
                         cuda={"77": "LOCKED"}, store="/s", snapshot="ab" * 32).__dict__


def _write(tmp_path, raw, mode=0o600) -> str:
    path = tmp_path / "dump-4242.json"
    path.write_text(json.dumps(raw))
    path.chmod(mode)
    return str(path)


def test_a_good_record_reads_back(tmp_path):
    rec = intent.read(_write(tmp_path, _good(tmp_path)))
    assert rec.root == 77 and rec.cuda == {"77": "LOCKED"}


@pytest.mark.parametrize("change", [
    lambda r: [],                                   # not an object
    lambda r: {**r, "extra": 1},
    lambda r: {k: v for k, v in r.items() if k != "work"},
    lambda r: {**r, "op": "gc"},
    lambda r: {**r, "owner": 1},
    lambda r: {**r, "pids": [-5]},
    lambda r: {**r, "pids": "77"},
    lambda r: {**r, "root": True},
    lambda r: {**r, "cuda": {"77": "GONE"}},
    lambda r: {**r, "cuda": ["77"]},
    lambda r: {**r, "snapshot": "../../etc"},
    lambda r: {**r, "stage": "x; rm -rf /"},
    lambda r: {**r, "leave_running": "yes"},
    lambda r: {**r, "work": "relative/dump-4242-abc"},
    lambda r: {**r, "work": "/tmp/dump-4242-abc/../../etc"},
    lambda r: {**r, "work": "/etc"},
    lambda r: {**r, "work": "/tmp/dump-999-abc"},    # another gpusnap's
    lambda r: {**r, "work": "/tmp/restore-4242-abc"},
], ids=lambda f: "")
def test_a_malformed_record_is_refused(tmp_path, change):
    with pytest.raises(ValueError):
        intent.read(_write(tmp_path, change(_good(tmp_path))))


def test_a_record_others_can_write_or_a_link_is_refused(tmp_path):
    path = _write(tmp_path, _good(tmp_path), mode=0o622)
    with pytest.raises(ValueError):
        intent.read(path)
    os.chmod(path, 0o600)
    link = tmp_path / "dump-1.json"
    link.symlink_to(path)
    with pytest.raises(OSError):
        intent.read(str(link))


def test_recover_leaves_an_invalid_record_alone(tmp_path):
    path = _write(tmp_path, {**_good(tmp_path), "op": "gc"})
    assert intent.recover(path) is None
    assert os.path.exists(path)


def test_remove_work_only_removes_a_private_dir_never_a_link(tmp_path):
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "keep").write_text("x")
    link = base / "dump-1-link"
    link.symlink_to(victim)
    assert not intent.remove_work(str(link))
    assert (victim / "keep").exists()
    open_dir = base / "dump-1-open"
    open_dir.mkdir(mode=0o700)
    open_dir.chmod(0o777)
    assert not intent.remove_work(str(open_dir)) and open_dir.exists()
    mine = base / "dump-1-mine"
    mine.mkdir(mode=0o700)
    (mine / "images").mkdir()
    assert intent.remove_work(str(mine)) and not mine.exists()


def test_same_process_needs_the_recorded_start_time():
    me = os.getpid()
    assert intent.same_process(me, intent.started(me))
    assert not intent.same_process(me, intent.started(me) - 10)
    assert not intent.same_process(0, 1.0)
