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
