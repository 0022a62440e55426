"""Durable file writes (temp name in the same directory, fsync, rename, fsync the
directory), and private directories checked before anything is written into them."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import stat
import threading

from ..errors import InsecureStore, StoreError, StoreFull
from ..paths import fsync_dir, replace_file  # noqa: F401  (fsync_dir: store modules call it here)

_libc = ctypes.CDLL(None, use_errno=True)


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    try:
        replace_file(path, data, mode=mode, fsync=fsync)
    except OSError as exc:
        raise_os_error(exc, path)


def write_renamed(path: str, tmp_dir: str, data) -> None:
    """Write data to a name in tmp_dir unique to this thread, then rename it to path: path
    is complete whenever it exists (not durable: no fsync). No temp file is left behind,
    also when SIGTERM ends the writer."""
    write_renamed_many([(path, data)], tmp_dir, fsync=False)


TEMP_PREFIX = ".tmp-"      # beside=True: a temp file's name in its final directory


def write_renamed_many(items: list[tuple[str, bytes]], tmp_dir: str, *, fsync: bool,
                       direct: bool = False, beside: bool = False) -> None:
    """write_renamed of each (path, data); with fsync, each file's data is on disk before
    its name appears (every file is written and its writeback started first, then all
    are made durable and renamed: the disk works on all of them at once). The
    directories holding the new names are not fsynced here. direct: the data goes to the
    disk with O_DIRECT, past the page cache (where tmp_dir's filesystem takes it; else as
    usual).

    Durable, on ext4 and XFS, is one journal commit for the batch (batch_fsync): each
    file's writeback is waited for (sync_file_range), then a new unnamed file in tmp_dir
    is fsynced. That commits the journal up to a transaction newer than every block
    allocation of the batch and flushes the disk's cache, which the batch's completed
    writes were in (git's core.fsyncMethod=batch, the same reasoning). Elsewhere, and
    with GPUSNAP_FSYNC=each, every file is fsynced: on a disk whose cache flush is slow
    (a VM's virtual disk), that is one flush per chunk.

    beside: each temp file is named TEMP_PREFIX... in its final directory rather than in
    tmp_dir, so the rename stays in one directory: a rename between directories takes
    the filesystem's one rename lock (s_vfs_rename_mutex), which many writers then queue
    on, as they do on tmp_dir's own lock for every create and rename out. A killed
    writer's leftover there is the caller's to find (LocalBackend.stale_temps)."""
    tmps = []
    try:
        for path, data in items:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = _temp_name(path, tmp_dir, beside)
            tmps.append(tmp)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = _open_direct(tmp, flags, tmp_dir) if direct else None
            if fd is not None:
                try:
                    _write_direct(fd, data)
                finally:
                    os.close(fd)
                continue
            fd = os.open(tmp, flags, 0o600)
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
                f.flush()
                if fsync:
                    _start_writeback(fd)
        if fsync:
            _make_durable(tmps, tmp_dir)
        for tmp, (path, _data) in zip(tmps, items):
            os.rename(tmp, path)
    except BaseException:
        # SIGTERM and Ctrl-C wait until every temp file is gone: a worker that met a
        # full disk is often told to stop while it cleans up
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            for tmp in tmps:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise


def _temp_name(path: str, tmp_dir: str, beside: bool) -> str:
    """path's temp name for this thread: in tmp_dir, or (beside) TEMP_PREFIX... beside it."""
    name = f"{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}"
    return os.path.join(os.path.dirname(path), TEMP_PREFIX + name) if beside \
        else os.path.join(tmp_dir, name)


DIRECT_ALIGN = 4096                 # O_DIRECT's unit: a multiple of any disk's logical block
_no_direct: set[str] = set()        # tmp dirs whose filesystem refused O_DIRECT
_aligned = threading.local()


def _open_direct(path: str, flags: int, tmp_dir: str) -> int | None:
    """path opened with O_DIRECT, or None where the filesystem refuses it (tmpfs: EINVAL;
    then not asked again for tmp_dir)."""
    if tmp_dir in _no_direct:
        return None
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _no_direct.add(tmp_dir)
        return None


def _write_direct(fd: int, data) -> None:
    """data into fd (opened O_DIRECT) from this thread's page-aligned buffer, zero-padded
    to DIRECT_ALIGN; the file is then cut back to data's length."""
    size = len(data)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = getattr(_aligned, "buf", None)
    if buf is None or len(buf) < padded:
        buf = _aligned.buf = mmap.mmap(-1, max(padded, 1 << 20))
    buf[:size] = data
    buf[size:padded] = bytes(padded - size)
    view, done = memoryview(buf), 0
    try:
        while done < padded:
            n = os.write(fd, view[done:padded])
            if n <= 0 or (n % DIRECT_ALIGN and done + n < padded):
                raise OSError(errno.EIO, "short O_DIRECT write")
            done += n
    finally:
        view.release()
    if padded != size:
        os.ftruncate(fd, size)


def _start_writeback(fd: int) -> None:
    """Have the kernel start writing fd's dirty pages now, without waiting for them
    (sync_file_range SYNC_FILE_RANGE_WRITE): the fsync that follows then finds them
    written or on their way. Where the call is missing, the fsync does it all."""
    try:
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), 2)
    except AttributeError:
        pass


FSYNC_ENV = "GPUSNAP_FSYNC"                 # auto (batch where safe) | each
JOURNALED = {0xEF53: "ext4", 0x58465342: "xfs"}    # statfs f_type: one commit covers all
_SFR_WAIT = 1 | 2 | 4           # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER
_batch_dirs: dict[str, bool] = {}


def _make_durable(paths: list[str], tmp_dir: str) -> None:
    """Every file of paths on disk, data and metadata (write_renamed_many's fsync)."""
    if len(paths) > 1 and batch_fsync(tmp_dir):
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SFR_WAIT):
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err), path)
                finally:
                    os.close(fd)
            fd = os.open(tmp_dir, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR, errno.ENOSYS):
                raise
            _batch_dirs[tmp_dir] = False        # no O_TMPFILE there: one fsync a file
        else:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_each() -> bool:
    """GPUSNAP_FSYNC=each: one fsync a file, wherever the files are."""
    return os.environ.get(FSYNC_ENV, "auto").strip().lower() == "each"


def batch_fsync(tmp_dir: str) -> bool:
    """Whether a batch of files written in tmp_dir is made durable by one journal commit
    (write_renamed_many): tmp_dir is on ext4 or XFS and GPUSNAP_FSYNC is not "each"."""
    if fsync_each():
        return False
    known = _batch_dirs.get(tmp_dir)
    if known is None:
        known = _batch_dirs[tmp_dir] = fs_type(tmp_dir) in JOURNALED and \
            hasattr(_libc, "sync_file_range") and hasattr(os, "O_TMPFILE")
    return known


def fs_type(path: str) -> int | None:
    """statfs(2)'s f_type of path's filesystem (its first field), None when unknown."""
    buf = ctypes.create_string_buffer(256)      # struct statfs is 120 bytes on 64-bit Linux
    try:
        if _libc.statfs(os.fsencode(path), buf) != 0:
            return None
    except AttributeError:
        return None
    return ctypes.c_long.from_buffer(buf).value


def raise_os_error(exc: OSError, path: str):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(f"no space left while writing {path}") from None
    raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_private_dir(path: str, what: str, st: os.stat_result | None = None) -> None:
    """Refuse path unless it is a real directory (a symlink is not followed) of this
    euid that nobody else can open. Changes nothing."""
    if st is None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise StoreError(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise InsecureStore(f"{what} {path} is a symbolic link: gpusnap does not follow one there",
                            hint="name the directory itself (another user may have planted the link)")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise InsecureStore(f"{what} {path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureStore(f"{what} {path} is open to other users (mode {st.st_mode & 0o777:o})",
                            hint=f"chmod 700 {path}, or choose another directory")


def make_private_dir(path: str, what: str) -> bool:
    """A directory at path for gpusnap alone: created 0700 when missing (True), else
    checked as check_private_dir() does (False). An existing directory is never
    chmodded or chowned: one gpusnap did not create is used only as it is."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    old = os.umask(0o077)
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        check_private_dir(path, what)
        return False
    finally:
        os.umask(old)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH-like fd of the directory at path, refusing a symlink there (ELOOP)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InsecureStore(f"{path} is not a directory (a symbolic link?): "
                                f"gpusnap does not follow one there") from None
        raise


def symlinks_under(path: str, depth: int) -> list[str]:
    """Symbolic links under path, down to depth levels, never following one. Pure
    reading, by the directory entries' types (no stat per file)."""
    bad = []
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return bad
    for entry in entries:
        if entry.is_symlink():
            bad.append(entry.path)
        elif depth > 1 and entry.is_dir(follow_symlinks=False):
            bad += symlinks_under(entry.path, depth - 1)
    return bad
