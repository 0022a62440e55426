"""Chunk files written with O_DIRECT (GPUSNAP_DIRECT_IO=1): byte-exact at every size
around the alignment, and a filesystem without O_DIRECT (tmpfs) written as usual."""

import os

import pytest

from gpusnap.store import fsutil

SIZES = [0, 1, 4095, 4096, 4097, (1 << 20) + 3, 3 << 20]


def _items(root):
    return [(os.path.join(root, "chunks", "ab", f"c{n}"), os.urandom(n)) for n in SIZES]


def _direct_works(path) -> bool:
    try:
        os.close(os.open(os.path.join(path, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_direct_writes_are_byte_exact(tmp_path):
    if not _direct_works(tmp_path):
        pytest.skip("tmp_path's filesystem refuses O_DIRECT")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    items = _items(str(tmp_path))
    fsutil.write_renamed_many(items, str(tmp), fsync=True, direct=True)
    for path, data in items:
        with open(path, "rb") as f:
            assert f.read() == data
        assert os.path.getsize(path) == len(data)
    assert os.listdir(tmp) == []                 # nothing left under a temp name
    assert str(tmp) not in fsutil._no_direct


def test_a_memoryview_is_written_as_its_bytes(tmp_path):
    if not _direct_works(tmp_path):
        pytest.skip("tmp_path's filesystem refuses O_DIRECT")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    data = bytearray(os.urandom(10000))
    path = str(tmp_path / "x")
    fsutil.write_renamed_many([(path, memoryview(data)[7:9007])], str(tmp), fsync=True, direct=True)
    with open(path, "rb") as f:
        assert f.read() == bytes(data[7:9007])


def test_a_filesystem_without_o_direct_is_written_as_usual(tmp_path, monkeypatch):
    """Where open(O_DIRECT) is refused with EINVAL (tmpfs before Linux 6.6), the files
    are written through the page cache, and O_DIRECT is not asked again for that dir."""
    import errno
    real, asked = os.open, []

    def no_direct(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            asked.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", no_direct)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    items = _items(str(tmp_path))
    try:
        fsutil.write_renamed_many(items, str(tmp), fsync=True, direct=True)
        assert str(tmp) in fsutil._no_direct and len(asked) == 1
    finally:
        fsutil._no_direct.discard(str(tmp))
    for path, data in items:
        with open(path, "rb") as f:
            assert f.read() == data


def test_a_failed_direct_write_leaves_no_temp_file(tmp_path, monkeypatch):
    if not _direct_works(tmp_path):
        pytest.skip("tmp_path's filesystem refuses O_DIRECT")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    real = os.write

    def short(fd, data):                    # the disk took part of a block
        return real(fd, bytes(data)[:100]) if len(data) > 100 else real(fd, data)
    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError):
        fsutil.write_renamed_many([(str(tmp_path / "y"), os.urandom(8192))], str(tmp),
                                  fsync=True, direct=True)
    assert os.listdir(tmp) == [] and not (tmp_path / "y").exists()
