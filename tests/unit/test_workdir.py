"""Where scratch images go: asking (doctor) never mounts anything."""

from __future__ import annotations

import os

import pytest

from gpusnap.engine import doctor, workdir


def _no_mount(*_args):
    raise AssertionError("describe() mounted a tmpfs")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts the huge-page tmpfs")
def test_describe_says_where_root_would_mount_without_mounting(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUSNAP_WORKDIR", raising=False)
    monkeypatch.setattr(workdir, "HUGE_BASE", str(tmp_path / "huge"))
    monkeypatch.setattr(workdir, "huge_tmpfs", _no_mount)
    where = workdir.describe("/store")
    assert where["mounted_on_use"] and where["path"] == str(tmp_path / "huge" / "gpusnap")
    assert not os.path.exists(tmp_path / "huge")
    [check] = doctor._workdir()
    assert check.status == "ok" and "mounted by the first dump or restore" in check.detail


def test_describe_follows_gpusnap_workdir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUSNAP_WORKDIR", str(tmp_path))
    monkeypatch.setattr(workdir, "huge_tmpfs", _no_mount)
    where = workdir.describe("/store")
    assert where["path"] == str(tmp_path) and not where["mounted_on_use"]


def test_doctor_says_how_the_store_makes_chunks_durable(tmp_path, monkeypatch):
    """Asks the filesystem of the store, or of the directory it will be made in; makes
    nothing."""
    from gpusnap.store import fsutil
    store = tmp_path / "not" / "yet"
    check = doctor.store_writes(str(store))
    assert not (tmp_path / "not").exists()
    if fsutil.fs_type(str(tmp_path)) == 0xEF53:
        assert check.status == "ok" and "one journal commit" in check.detail
    monkeypatch.setenv("GPUSNAP_FSYNC", "each")
    assert "GPUSNAP_FSYNC=each" in doctor.store_writes(str(store)).detail
    assert doctor.store_writes("s3://bucket/p").status == "ok"
    if os.path.isdir("/dev/shm") and fsutil.fs_type("/dev/shm") == 0x01021994:
        shm = doctor.store_writes("/dev/shm/gpusnap-store")
        assert shm.status == "warn" and "reboot" in shm.detail
