"""Huge pages for the driver's staging memory while it checkpoints (GPUSNAP_HUGE_PAGES).

cuCheckpointProcessCheckpoint copies a process's device memory into new private anonymous
memory of that process (staging.py). Where the host's THP mode is "madvise" (Debian's and
Ubuntu's default) that memory is faulted in 4 KiB at a time; with "always", 2 MiB at a time.
Measured on an H200 (8 GiB of device memory, benchmarks/results/dump_probe_h200_thp.md):
the checkpoint 4.9 -> 3.0 s, the driver's restore from that memory 2.2 -> 1.3 s, and
`criu dump` of the process 5.8 -> 4.3 s. The mode is the host's (there is no way to set it
for another process), so window() sets it to "always" for as long as the checkpoint call
runs and puts the old mode back right after. Only "madvise" is changed: "never" is an
administrator's choice, and "always" needs nothing.

Several gpusnaps may checkpoint at once (gpusnapd, the CRIU hook of several containers):
DIR/saved holds the mode to put back, written by the first to enter and put back by the
last to leave. Each holder keeps a shared flock on DIR/users; whoever then gets it
exclusively (under DIR/mutex) is the last. A helper process forked at entry (its own
session) holds that lock with the holder and leaves for it when the holder says it is
done or dies, so a gpusnap killed with SIGKILL mid-checkpoint still puts the mode back;
where no helper could be forked (another thread runs, or gpusnap died between switching
and forking it), the next entry finds DIR/saved with no holder and puts that mode back
first. DIR is STATE_DIR/thp (GPUSNAP_STATE_DIR, default /run/gpusnap/state:
tmpfs, gone at reboot as the mode itself is).

GPUSNAP_HUGE_PAGES=off (or the config's `huge_pages: off`) leaves the host's mode alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading

from gpusnap import paths, sysrun
from gpusnap.errors import GpusnapError

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
DEFAULT_STATE_DIR = "/run/gpusnap/state"
MODES = ("always", "madvise", "never")
GUARD_WAIT = 10.0       # seconds the holder waits for its helper to put the mode back


OFF = ("off", "0", "no", "false")


def wanted(value) -> bool:
    """A huge_pages setting ("auto", "off"; YAML may give False): on unless off."""
    return str(value).strip().lower() not in OFF


def enabled() -> bool:
    """GPUSNAP_HUGE_PAGES (the CLI exports the config's huge_pages there): on unless off."""
    return wanted(os.environ.get("GPUSNAP_HUGE_PAGES", "auto"))


def notes(session) -> list[str]:
    """What a dump or suspend says of it (session: a CudaSession, or None)."""
    if session is None or not getattr(session, "huge_pages", False):
        return []
    return ["the host's THP mode was 'always' while the CUDA driver checkpointed "
            "(GPUSNAP_HUGE_PAGES=off leaves it alone)"]


def read_mode(path: str = THP_ENABLED) -> str | None:
    """The selected mode of a THP sysfs file ("always [madvise] never" -> "madvise"), None
    when unreadable or malformed."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    head, sep, rest = text.partition("[")
    if not sep:                     # a bare word: what a write leaves in a stand-in file
        return text.strip() if text.strip() in MODES else None
    mode, sep2, _ = rest.partition("]")
    return mode if sep2 and mode in MODES else None


def _write_mode(path: str, mode: str) -> None:
    with open(path, "w") as f:
        f.write(mode)


DEFAULT_DIR = os.path.join(DEFAULT_STATE_DIR, "thp")     # the CRIU hook's (it reads no env)


def _state_dir() -> str:
    return os.path.join(os.environ.get("GPUSNAP_STATE_DIR") or DEFAULT_STATE_DIR, "thp")


class _Dir:
    """The three files of DIR; every method but open() expects the mutex held."""

    def __init__(self, path: str, sysfs: str):
        self.path, self.sysfs = path, sysfs
        self.saved = os.path.join(path, "saved")

    def open(self, name: str) -> int:
        return os.open(os.path.join(self.path, name),
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def mutex(self):
        fd = self.open("mutex")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def saved_mode(self) -> str | None:
        try:
            with open(self.saved) as f:
                mode = f.read().strip()
        except FileNotFoundError:
            return None
        return mode if mode in MODES else None

    def nobody_inside(self) -> bool:
        fd = self.open("users")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def put_back(self) -> None:
        """The saved mode back in sysfs, and DIR/saved gone (no-op without one)."""
        mode = self.saved_mode()
        if mode is not None and read_mode(self.sysfs) != mode:
            _write_mode(self.sysfs, mode)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.saved)

    def enter(self) -> int | None:
        """Take a share, switching madvise -> always if nobody did; the users fd to keep
        (its flock is the share), or None when the mode is left as it is."""
        with self.mutex():
            if os.path.exists(self.saved) and self.nobody_inside():
                self.put_back()                 # left by a holder that died with no helper
            if self.saved_mode() is None:
                if read_mode(self.sysfs) != "madvise":
                    return None
                with open(self.saved, "w") as f:
                    f.write("madvise")
                try:
                    _write_mode(self.sysfs, "always")
                except OSError:
                    os.unlink(self.saved)
                    return None
            users = self.open("users")
            fcntl.flock(users, fcntl.LOCK_SH)
            return users

    def leave(self, users: int) -> None:
        with self.mutex():
            fcntl.flock(users, fcntl.LOCK_UN)
            os.close(users)
            if self.nobody_inside():
                self.put_back()


class _HolderGone(Exception):
    pass


def _holder_gone(signum, frame):
    raise _HolderGone


def _guard(d: _Dir, pipe_r: int, users: int, holder: int) -> None:
    """The helper: wait until the holder says it is done (a byte on the pipe) or dies
    (SIGTERM through PR_SET_PDEATHSIG, or the pipe's end: a child the holder forked
    meanwhile may keep the pipe open), then leave. It keeps no other descriptor of the
    holder's: a client's socket held here would wait for this helper."""
    keep = sorted({0, 1, 2, pipe_r, users})
    for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
        os.closerange(low + 1, high)
    signal.signal(signal.SIGTERM, _holder_gone)
    try:
        try:
            sysrun.die_with_parent(signal.SIGTERM, holder)
            os.read(pipe_r, 64)         # b"L": done; b"": every writer gone
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except _HolderGone:
        pass
    d.leave(users)


@contextlib.contextmanager
def window(sysfs: str = THP_ENABLED, state_dir: str | None = None, on: bool | None = None):
    """THP "always" for the body (see the module's doc); yields whether it switched. on:
    whether to (None: enabled() decides). Never raises for THP's sake: a host where the
    mode cannot be read or written runs the body with the mode as it is."""
    users = None
    d = _Dir(state_dir or _state_dir(), sysfs)
    if enabled() if on is None else on:
        try:
            paths.private_dir(os.path.dirname(d.path), "state directory")
            paths.private_dir(d.path, "huge-page state directory")
            users = d.enter()
        except (OSError, GpusnapError):
            users = None
    if users is None:
        yield False
        return
    guard, pipe_w = _start_guard(d, users)
    try:
        yield True
    finally:
        if guard is None:
            with contextlib.suppress(OSError):
                d.leave(users)
        else:
            os.close(users)             # the helper's copy keeps the share
            with contextlib.suppress(OSError):
                os.write(pipe_w, b"L")
            os.close(pipe_w)
            sysrun.reap(guard, GUARD_WAIT)  # one still at it puts the mode back on its own


def _start_guard(d: _Dir, users: int) -> tuple[int | None, int | None]:
    """Fork the helper that leaves for us (None, None where another thread runs: a fork
    there could inherit a lock held, and leave() then runs here)."""
    if threading.active_count() > 1:
        return None, None
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = sysrun.fork_helper(_guard, d, pipe_r, users, os.getpid())
    except OSError:
        os.close(pipe_r)
        os.close(pipe_w)
        return None, None
    os.close(pipe_r)
    return pid, pipe_w


