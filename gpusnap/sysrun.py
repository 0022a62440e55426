"""The only module that spawns processes.

Children get a clean environment (PATH, LANG=C, plus what the caller names), no shell,
and ignore SIGINT so that a Ctrl-C reaches gpusnap alone and gpusnap decides how to
unwind (a CRIU killed mid-restore is worse than one allowed to finish). run() therefore
lets a child finish when gpusnap is interrupted (Ctrl-C, or SIGTERM, which the CLI turns
into Interrupted), and raises the interrupt once it has (gpusnap.interrupts): subprocess.run
would kill it.
"""

from __future__ import annotations

import os
import signal
import subprocess
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


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
        cwd: str | None = None, input: str | None = None, pass_fds: tuple[int, ...] = ()) -> Result:
    """Run argv to completion, capturing its output. Never raises on a non-zero exit.

    A Ctrl-C or SIGTERM that arrives meanwhile is held until the child has finished, then
    raised (gpusnap.interrupts.held): the child is never cut short by one (a CRIU dump
    killed with its parasite inside the target can leave the target broken). A timeout
    still kills the child (subprocess.TimeoutExpired).
    """
    with interrupts.held():
        with subprocess.Popen(argv, env=clean_env(env), cwd=cwd, text=True, errors="replace",
                              stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=_ignore_sigint, pass_fds=pass_fds) as proc:
            try:
                stdout, stderr = proc.communicate(input, timeout)
            except BaseException:
                proc.kill()
                raise
    return Result(list(argv), proc.returncode, stdout, stderr)


def spawn_detached(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   stdout: str = os.devnull) -> int:
    """Start argv in a new session, stdio away from us; return its pid (for workloads)."""
    with open(stdout, "ab") as out:
        proc = subprocess.Popen(argv, env=clean_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid
