"""Run CRIU and turn its failures into errors that say why."""

from __future__ import annotations

import os
import re
import socket
from typing import Callable

from .. import interrupts, sysrun
from ..errors import CriuFailed, GpusnapError, PidInUse
from .argv import CriuOptions, dump_argv, restore_argv
from .locate import find_criu

_ERROR_LINE = re.compile(r"^\([\d.]+\)\s+(?:\d+:\s+)?Error\s+\(([^)]*)\):\s*(.*)$")
_PID_TAKEN = re.compile(r"Can't fork for (\d+): File exists")
# Error lines that do not say why CRIU failed: a limit it could not raise and went on
# without, and the summaries it prints after the cause.
_AFTERMATH = re.compile(r"RLIMIT_NOFILE|Dumping FAILED|Restoring FAILED")
PS_BUFFER_MB = 4            # socket buffers of the page stream (GPUSNAP_PS_BUFFER_MB)


def log_errors(log_path: str, limit: int = 5) -> list[str]:
    """The error lines of a CRIU log that say why it failed, without timestamps: the
    first `limit` of them, those that explain first (noise and summaries last)."""
    found = _error_lines(log_path, 4 * limit)
    return sorted(found, key=lambda line: bool(_AFTERMATH.search(line)))[:limit]


def _error_lines(log_path: str, limit: int) -> list[str]:
    out = []
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                m = _ERROR_LINE.match(line.strip())
                if m:
                    out.append(f"{m.group(2)} [{m.group(1)}]")
                    if len(out) >= limit:
                        break
    except FileNotFoundError:
        pass
    return out


def _fail(what: str, res: sysrun.Result, log_path: str) -> GpusnapError:
    """The error a failed CRIU run is: PidInUse when a pid it had to restore was taken
    meanwhile (another restore of the same snapshot), else CriuFailed with its log's errors."""
    errors = log_errors(log_path)
    taken = [m.group(1) for m in map(_PID_TAKEN.search, errors) if m]
    if taken:
        return PidInUse(f"pid {taken[0]} was taken while CRIU restored it (another restore of "
                        f"this snapshot at the same time?)",
                        hint="stop the other restored copy first, or restore on another host")
    detail = "; ".join(errors) if errors else (res.stderr.strip().splitlines() or ["no output"])[-1]
    return CriuFailed(f"criu {what} failed (exit {res.returncode}): {detail}",
                      hint=f"full log: {log_path}")


def dump(pid: int, images_dir: str, opts: CriuOptions, *, leave: str = "stopped",
         timeout: float | None = None, criu: str | None = None,
         page_server: Callable[[socket.socket, Callable[[], bool]], None] | None = None) -> None:
    """criu: the CRIU to run (default: find_criu's). page_server(sock, alive): serves
    CRIU's page stream on a connected socket while CRIU runs (criu/pageserver.py); alive()
    says whether CRIU still runs. Without it CRIU writes pages images into images_dir."""
    criu = criu or find_criu()[0]
    log = os.path.join(images_dir, "dump.log")
    if page_server is None:
        res = sysrun.run(dump_argv(criu, pid, images_dir, opts, leave=leave), timeout=timeout)
    else:
        res = _dump_streaming(criu, pid, images_dir, opts, leave, page_server, timeout, log)
    if not res.ok:
        raise _fail("dump", res, log)


def _size_buffers(sock: socket.socket) -> None:
    """The page stream's socket buffers, GPUSNAP_PS_BUFFER_MB (default 4, asked plainly:
    capped by net.core.wmem_max, 208 KiB on a stock kernel). Above 4, SO_SNDBUFFORCE (root:
    past the cap), else what the cap allows. Larger buffers were a guess against CRIU and
    gpusnap taking turns; on the H200 they did not pay (docs/design.md), so the default
    stays."""
    raw = os.environ.get("GPUSNAP_PS_BUFFER_MB", "")
    size = (int(raw) if raw.strip().isdigit() and 0 < int(raw) <= 1024 else PS_BUFFER_MB) << 20
    for force, plain in ((32, socket.SO_SNDBUF), (33, socket.SO_RCVBUF)):   # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force if size > PS_BUFFER_MB << 20 else plain, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _dump_streaming(criu, pid, images_dir, opts, leave, page_server, timeout, log) -> sysrun.Result:
    """CRIU dump with its pages sent to page_server over a socket pair. When serving
    fails (the store, an interrupt), the socket is shut: CRIU's next send fails, so it
    stops and lets the tree run again; the serving error is raised once CRIU has exited,
    unless the stream broke because CRIU failed (then CRIU's own error says why).
    page_server(sock, alive) is told when CRIU has exited: a process CRIU left behind
    holding its end of the socket must not keep gpusnap waiting; what CRIU left in its
    process group is killed once it has failed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (ours, theirs):
        _size_buffers(end)
    with ours:
        running = None
        try:
            try:
                with interrupts.held():     # a CRIU started is a CRIU waited for (sysrun.begin)
                    running = sysrun.begin(dump_argv(criu, pid, images_dir, opts, leave=leave,
                                                     ps_socket=theirs.fileno()),
                                           pass_fds=(theirs.fileno(),), own_group=True)
            finally:
                theirs.close()
            page_server(ours, lambda: not running.exited())
        except BaseException as exc:
            if running is None:
                raise
            ours.shutdown(socket.SHUT_RDWR)
            res = running.wait_group(timeout)
            if isinstance(exc, CriuFailed) and not res.ok:
                raise _fail("dump", res, log) from None
            raise
        return running.wait_group(timeout)


def restore(images_dir: str, opts: CriuOptions, *, work_dir: str | None = None,
            timeout: float | None = None, criu: str | None = None,
            started: Callable[[], None] | None = None) -> int:
    """CRIU restore, detached; the restored root pid. Log and pidfile go to work_dir
    (default: images_dir). criu: the CRIU to run (default: find_criu's). started(): called
    once CRIU runs (a thread may start then: none may run while a child is forked, whose
    pre-exec step runs Python)."""
    with interrupts.held():         # a CRIU started is a CRIU waited for (sysrun.begin)
        running = start_restore(images_dir, opts, work_dir=work_dir, criu=criu)
        if started:
            started()
        res = running.wait(timeout)
    return _restored(running, res)


def start_restore(images_dir: str, opts: CriuOptions, *, work_dir: str | None = None,
                  criu: str | None = None) -> sysrun.Running:
    """CRIU restore started, for a caller that works while it runs (the uffd page path
    serves its tasks' memory meanwhile); finish_restore() collects it. Call it in
    interrupts.held() and keep what it returns before the block ends (sysrun.begin)."""
    criu = criu or find_criu()[0]
    out_dir = work_dir or images_dir
    pidfile = os.path.join(out_dir, "restored.pid")
    if os.path.exists(pidfile):          # CRIU refuses to overwrite it (a second restore)
        os.unlink(pidfile)
    running = sysrun.begin(restore_argv(criu, images_dir, pidfile, opts, work_dir))
    running.out_dir = out_dir
    return running


def finish_restore(running: sysrun.Running, timeout: float | None = None) -> int:
    return _restored(running, running.wait(timeout))


def _restored(running: sysrun.Running, res: sysrun.Result) -> int:
    if not res.ok:
        raise _fail("restore", res, os.path.join(running.out_dir, "restore.log"))
    return int(restored_pid(running.out_dir))


def restored_pid(out_dir: str) -> int | None:
    """The root pid of a CRIU restore whose pidfile went to out_dir, if it finished, else
    None. An interrupt during restore() is raised only once CRIU has finished (sysrun):
    the caller's undo finds the tree it must kill here."""
    try:
        with open(os.path.join(out_dir, "restored.pid")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def check() -> sysrun.Result:
    criu, _ = find_criu()
    return sysrun.run([criu, "check"], timeout=60)
