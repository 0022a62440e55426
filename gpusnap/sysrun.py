"""The only module that spawns processes.

Children get a clean environment (PATH, LANG=C, plus what the caller names), no shell,
and ignore SIGINT so that a Ctrl-C reaches gpusnap alone and gpusnap decides how to
unwind (a CRIU killed mid-restore is worse than one allowed to finish). run() therefore
lets a child finish when gpusnap is interrupted (Ctrl-C, or SIGTERM, which the CLI turns
into Interrupted), and raises the interrupt once it has (gpusnap.interrupts): subprocess.run
would kill it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from . import interrupts

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", SAFE_PATH), "LANG": "C", "LC_ALL": "C"}
    for key in ("HOME", "TMPDIR", "XDG_RUNTIME_DIR", "CUDA_VISIBLE_DEVICES"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


# How a child starts ignoring SIGINT with no Python between fork and exec (a preexec_fn
# runs in a child forked beside other threads, which CPython documents as unsafe: a lock
# one of them held stays held there). A disposition set to "ignore" survives exec, and
# sh's trap sets it before sh execs the command in its place.
_IGNORING_SIGINT = ["/bin/sh", "-c", 'trap "" INT; exec "$0" "$@"']


def _resolved(program: str, path: str, cwd: str | None) -> str:
    """program as an absolute path, or the error Popen would raise for it: sh would only
    print 'not found' and exit 127."""
    if "/" not in program:
        found = shutil.which(program, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        program = found
    full = os.path.join(cwd or os.getcwd(), program)
    if not os.path.isfile(full):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if not os.access(full, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return os.path.abspath(full)


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
        cwd: str | None = None, input: str | None = None, pass_fds: tuple[int, ...] = ()) -> Result:
    """Run argv to completion, capturing its output. Never raises on a non-zero exit.

    A Ctrl-C or SIGTERM that arrives meanwhile is held until the child has finished, then
    raised (gpusnap.interrupts.held): the child is never cut short by one (a CRIU dump
    killed with its parasite inside the target can leave the target broken). A timeout
    still kills the child (subprocess.TimeoutExpired). Held from before the fork: one that
    lands while the child starts (Popen waits for its exec) would otherwise leave it
    running, unwaited, beside gpusnap's undo.
    """
    with interrupts.held():
        return begin(argv, env=env, cwd=cwd, input=input, pass_fds=pass_fds).wait(timeout)


class Running:
    """A child started by begin(), whose output is collected by wait()."""

    def __init__(self, proc: subprocess.Popen, argv: list[str], input: str | None,
                 own_group: bool = False):
        self.proc, self.argv, self.input, self.own_group = proc, list(argv), input, own_group

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        """Whether the child itself has exited (what it started may live on)."""
        return self.proc.poll() is not None

    def exit_code(self, within: float) -> int | None:
        """The child's exit code once it has exited, waiting at most `within` seconds;
        None while it runs. Its output stays for wait()."""
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            return None

    def wait_group(self, timeout: float | None = None) -> Result:
        """wait() for a child started with own_group: once the child itself has exited
        with a failure, what it left in its process group (which would hold its output
        pipes and keep wait() waiting) is killed first."""
        with interrupts.held():
            try:
                self.proc.wait(timeout)
            except BaseException:
                self.proc.kill()
                raise
        if self.proc.returncode != 0 and self.own_group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> Result:
        """run()'s second half: wait for the child (interrupts held until it exits)."""
        with interrupts.held():
            with self.proc as proc:
                try:
                    stdout, stderr = proc.communicate(self.input, timeout)
                except BaseException:
                    proc.kill()
                    raise
        return Result(self.argv, proc.returncode, stdout, stderr)


def begin(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          input: str | None = None, pass_fds: tuple[int, ...] = (),
          own_group: bool = False) -> Running:
    """Start argv (clean environment, no shell parsing, ignoring SIGINT) for a caller that works
    while it runs; Running.wait() collects it as run() does. Starts no thread.
    own_group: in a process group of its own (Running.wait_group). An interrupt that
    lands while the child starts loses it: a caller that must wait for the child calls
    begin() in interrupts.held() and keeps the Running before the block ends."""
    env = clean_env(env)
    program = _resolved(argv[0], env["PATH"], cwd)
    proc = subprocess.Popen([*_IGNORING_SIGINT, program, *argv[1:]], env=env, cwd=cwd,
                            text=True, errors="replace",
                            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                            process_group=0 if own_group else None)
    return Running(proc, argv, input, own_group)


def start(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          stdout: str = os.devnull, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start argv in a new session, stdin from /dev/null, stdout and stderr appended to
    the file stdout; the caller waits for it (a workload gpusnap dumps and restores)."""
    with open(stdout, "ab") as out:
        return subprocess.Popen(argv, env=clean_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=pass_fds)


def spawn_detached(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   stdout: str = os.devnull, pass_fds: tuple[int, ...] = ()) -> int:
    """start() for a process nobody waits for here; its pid."""
    return start(argv, env=env, cwd=cwd, stdout=stdout, pass_fds=pass_fds).pid


def fork_helper(fn, *args) -> int:
    """Fork a helper process that runs fn(*args) in its own session and exits; its pid.

    For a helper that must outlive gpusnap (criu/lazy.py's guard): a new session keeps
    it out of a Ctrl-C or a kill of gpusnap's process group, and it ignores SIGINT and
    SIGHUP. It leaves through os._exit: nothing of gpusnap's runs twice. Fork only where
    no other thread runs (the child would inherit their locks held).
    A SIGTERM that comes before the helper has its handlers ends it (SIG_DFL): forked
    unheld, it could meet the parent's handler of the moment (interrupts.held()'s, which
    only notes it), and a helper ended at once, as a store lock released right after it
    was taken ends its refresher, ran on until end_helper's SIGKILL 30 s later."""
    pid, blocked = fork_held()
    if pid:
        return pid
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        fn(*args)
    except BaseException:       # noqa: BLE001 - the helper's exit code says it failed
        code = 1
        if os.environ.get("GPUSNAP_TRACEBACK"):
            import traceback
            traceback.print_exc()
    finally:
        os._exit(code)


HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def fork_held() -> tuple[int, set]:
    """os.fork() with Ctrl-C and SIGTERM blocked across it: (pid, the mask before). The
    parent has its mask back on return; the child keeps them blocked until it has its
    own handlers, then sets the mask returned (a signal sent meanwhile is raised then),
    so that the parent's handler never runs in the child."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pid, blocked


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """In a forked helper: sig when the process that forked it dies (PR_SET_PDEATHSIG), so
    that it never outlives a gpusnap or gpusnapd killed with SIGKILL. parent (its pid,
    taken before the fork): sig at once when it died before this call."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def kill_child(pid: int) -> None:
    """SIGKILL a child of this process and reap it (gone already: nothing to do)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def stop_on_sigterm(parent: int):
    """In a forked helper: a threading.Event set by SIGTERM, which comes also when parent
    (its pid, taken before the fork) dies or died already (die_with_parent)."""
    import threading
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    die_with_parent(signal.SIGTERM, parent)
    return stop


def reap(pid: int, timeout: float) -> bool:
    """Wait up to timeout seconds for a child of this process to exit and reap it;
    whether it is gone (False: still running when the time was up)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
    except ChildProcessError:
        return True


def end_helper(pid: int, wait: float) -> None:
    """SIGTERM a forked helper (fork_helper) and reap it; SIGKILL when it takes longer
    than wait seconds to go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not reap(pid, wait):
        kill_child(pid)
