"""Scratch directories for CRIU images: on tmpfs where there is one, private to us.

As root, a tmpfs of our own with huge pages (HUGE_BASE): a restore writes the whole image
into it before CRIU reads it back, and on /dev/shm (4 KiB pages, huge pages off by
default) allocating those pages is most of materialise's time. Elsewhere /dev/shm, else
the store's tmp/. GPUSNAP_WORKDIR overrides all of these.

A work dir is named after the gpusnap that owns it (KIND-PID-RANDOM). What a gpusnap
killed outright leaves behind is swept (sweep_plan, then sweep): work dirs whose owner
pid is gone, failed CRIU logs beyond the newest KEEP_FAILED_LOGS, and agent sockets
(agent-PID.sock in the agent dir) whose pid is gone. A work dir named by an intent record
is left to its recovery (engine/intent.py), which must first let a CRIU finish in it. `gpusnap gc` sweeps, and so does
every dump, restore and warm as it makes its work dir (a few directory listings).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import os
import re
import shutil
import stat
import tempfile

import psutil

from ..paths import private_dir

HUGE_BASE = "/run/gpusnap-work"
KEEP_FAILED_LOGS = 20
_OWNED = re.compile(r"^(?:dump|restore|warm)-(\d+)-")
_AGENT_SOCKET = re.compile(r"^agent-(\d+)\.sock$")
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


def base_dir(store_path: str, *, mount: bool = True) -> str:
    """Where scratch images go. mount=False only looks: it never mounts the huge-page tmpfs
    (a question such as doctor's must change nothing), so as root before the first dump
    it answers /dev/shm, and describe() says the tmpfs is still to come."""
    explicit = os.environ.get("GPUSNAP_WORKDIR")
    if explicit:
        return explicit
    if os.geteuid() == 0 and (huge_tmpfs(HUGE_BASE) if mount else tmpfs_options(HUGE_BASE) is not None):
        return os.path.join(HUGE_BASE, "gpusnap")
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm/gpusnap"
    return os.path.join(store_path, "tmp")


def _tmpfs_mounts() -> dict[str, str]:
    """Mount point -> mount options of every tmpfs this process sees."""
    mounts = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) > 4 and rfields and rfields[0] == "tmpfs":
                    mounts[fields[4]] = rfields[2] if len(rfields) > 2 else ""
    except OSError:
        pass
    return mounts


def tmpfs_options(path: str) -> str | None:
    """The mount options of the tmpfs mounted at path, None if none is."""
    return _tmpfs_mounts().get(path)


def tmpfs_of(path: str) -> str | None:
    """The mount point of the tmpfs that path (or the directory it would be made in) lies
    on, None where it lies on none: bytes written there take host memory."""
    mounts = _tmpfs_mounts()
    probe = os.path.abspath(path)
    while probe != "/" and probe not in mounts:
        probe = os.path.dirname(probe)
    return probe if probe in mounts else None


def huge_tmpfs(path: str) -> bool:
    """Mount a tmpfs with huge pages at path (root only; once per boot), True when one is
    there. Under a lock: two gpusnaps mounting at once would stack mounts, and the second
    would hide the first one's files. False (and /dev/shm is used) where mounting is not
    allowed, e.g. in a container without CAP_SYS_ADMIN, or the kernel has no huge tmpfs."""
    if tmpfs_options(path) is not None:
        return True
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if tmpfs_options(path) is not None:
                return True
            libc = ctypes.CDLL(None, use_errno=True)
            return libc.mount(b"gpusnap-work", path.encode(), b"tmpfs",
                              _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                              b"mode=0700,huge=always") == 0
    except OSError:
        return False


def describe(store_path: str) -> dict:
    """Where scratch images go, and whether that tmpfs has huge pages (for doctor).
    Only looks: where base_dir() would mount the huge-page tmpfs, says so
    (mounted_on_use) instead of mounting it."""
    if (not os.environ.get("GPUSNAP_WORKDIR") and os.geteuid() == 0
            and tmpfs_options(HUGE_BASE) is None):
        return {"path": os.path.join(HUGE_BASE, "gpusnap"), "tmpfs": None, "huge_pages": False,
                "mounted_on_use": True}
    base = base_dir(store_path, mount=False)    # only looks
    mount = tmpfs_of(base)
    options = tmpfs_options(mount) if mount else None
    return {"path": base, "tmpfs": mount,
            "huge_pages": "huge=always" in (options or "") or "huge=within_size" in (options or ""),
            "mounted_on_use": False}


def private_base(store_path: str) -> str:
    """base_dir(), created 0700 if missing, and refused unless it is a real directory of
    ours that nobody else can enter: /dev/shm is writable by everyone, and whoever owns
    this directory could swap the images a dump ingests or a restore hands to CRIU."""
    return private_dir(base_dir(store_path), "work directory",
                       hint="remove it (gpusnap recreates it), or set GPUSNAP_WORKDIR "
                            "to a directory only you can open")


def make(store_path: str, prefix: str) -> str:
    """A new work dir PREFIX-PID-RANDOM (prefix ends with "-"), after a sweep."""
    base = private_base(store_path)
    sweep(sweep_plan(store_path))
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)


def _gone(pid: int) -> bool:
    return pid != os.getpid() and not psutil.pid_exists(pid)


def sweep_plan(store_path: str) -> dict[str, list[str]]:
    """What a sweep would remove. Pure reading; symlinks are never followed."""
    from .intent import live_work_dirs
    base, live = base_dir(store_path), live_work_dirs()     # those are recover()'s to remove
    work = [e.path for e in _entries(base)
            if e.is_dir(follow_symlinks=False) and (m := _OWNED.match(e.name))
            and _gone(int(m.group(1))) and e.path not in live]
    logs = sorted((e for e in _entries(os.path.join(store_path, "failed-logs"))
                   if e.is_file(follow_symlinks=False)),
                  key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
    return {"work_dirs": work, "failed_logs": [e.path for e in logs[KEEP_FAILED_LOGS:]],
            "agent_sockets": _stale_agent_sockets()}


def _stale_agent_sockets() -> list[str]:
    """agent-PID.sock files of gone pids, in the agent dir when it is ours alone."""
    from ..sdk.protocol import agent_dir
    directory = agent_dir()
    try:
        st = os.lstat(directory)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return []
    return [e.path for e in _entries(directory)
            if (m := _AGENT_SOCKET.match(e.name)) and _gone(int(m.group(1)))
            and stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)]


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:
        return []


def sweep(plan: dict[str, list[str]]) -> None:
    for path in plan["work_dirs"]:
        remove(path)
    for path in plan["failed_logs"] + plan["agent_sockets"]:
        try:
            os.unlink(path)
        except OSError:
            pass


_kept: contextvars.ContextVar[list | None] = contextvars.ContextVar("gpusnap_kept_workdirs",
                                                                   default=None)


@contextlib.contextmanager
def keeping():
    """Within it, remove() keeps work dirs (CRIU images and logs, for a look afterwards)
    and lists them in the list it yields."""
    kept: list[str] = []
    token = _kept.set(kept)
    try:
        yield kept
    finally:
        _kept.reset(token)


def remove(path: str | None) -> None:
    if not path:
        return
    kept = _kept.get()
    if kept is not None:
        kept.append(path)
        return
    shutil.rmtree(path, ignore_errors=True)


def keep_log(store_path: str, log: str, kind: str) -> str | None:
    """Copy a CRIU log out of a work dir (about to be removed) into the store's
    failed-logs/; None if that fails (the store is full, say): the error being reported
    matters more than its log."""
    dest_dir = os.path.join(store_path, "failed-logs")
    dest = os.path.join(dest_dir, f"{kind}-{os.getpid()}-{os.path.basename(os.path.dirname(os.path.dirname(log)))}.log")
    try:
        os.makedirs(dest_dir, mode=0o700, exist_ok=True)
        shutil.copyfile(log, dest)
        os.chmod(dest, 0o600)
        return dest
    except OSError:
        try:
            os.unlink(dest)
        except OSError:
            pass
        return None
