"""Each operation in a forked child of the daemon, which streams its output back.

Why a child per operation, not a thread: the engine defers SIGINT/SIGTERM around the
steps that must not be cut (gpusnap/interrupts.py), which Python allows
only on a main thread, and the store forks its chunk workers only from a process with
no other thread (store/parallel.py). In a child of the daemon the operation runs exactly
as in the CLI: on the main thread, SIGINT is a Ctrl-C (the engine undoes what it
started), SIGTERM raises Interrupted. The child starts with every module already
imported by the daemon: that, not a resident engine, is the fixed cost saved.

A child
  - gets SIGINT when the daemon dies (PR_SET_PDEATHSIG): a daemon killed with -9
    mid-dump leaves the target resumed, mid-restore no restored tree;
  - writes its stdout and stderr to two pipes, which the daemon streams to the client,
    and its result as one JSON document to a third: {"ok": value} or {"error": {...}};
  - holds no other fd of the daemon (listening socket, other clients' connections): they
    point at /dev/null in it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import sysrun
from ..errors import GpusnapError, Interrupted

_ids = itertools.count(1)


@dataclass
class Child:
    """One running operation, seen from the daemon."""
    op_id: str
    kind: str
    pid: int
    started: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    result: dict | None = None
    exit_code: int | None = None
    task: asyncio.Task | None = None
    interrupted: bool = False
    answered: float | None = None       # monotonic: its output and result were all in

    def interrupt(self) -> None:
        """Ctrl-C for the operation: the engine undoes what it started, then it exits."""
        if self.exit_code is None and not self.interrupted:
            self.interrupted = True
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def describe(self) -> dict:
        return {"op": self.op_id, "kind": self.kind, "pid": self.pid,
                "running_s": round(time.monotonic() - self.started, 3),
                "interrupted": self.interrupted}


def spawn(kind: str, fn: Callable[..., Any], *args, env: dict[str, str] | None = None,
          setup: Callable[[], None] | None = None) -> Child:
    """Fork a child that runs setup() then fn(*args); its output and result arrive on
    child.events: ("stdout", bytes), ("stderr", bytes), then ("exit", exit_code)."""
    pipes = [os.pipe() for _ in range(3)]
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    # Ctrl-C and SIGTERM (a cancel) wait until the child has its own handlers: before,
    # the daemon's (asyncio's wakeup fd) would take them, as if sent to the daemon
    pid, blocked = sysrun.fork_held()
    if pid == 0:                                # pragma: no cover - runs in the child
        try:
            _child_main(fn, args, env, [w for _, w in pipes], parent, setup, blocked)
        finally:
            os._exit(70)
    for _, w in pipes:
        os.close(w)
    child = Child(op_id=f"{kind}-{next(_ids)}-{pid}", kind=kind, pid=pid, started=time.monotonic())
    child.task = asyncio.get_running_loop().create_task(_collect(child, [r for r, _ in pipes]))
    return child


def _sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM; every change to the target was undone")


def _child_main(fn, args, env, writers: list[int], parent: int, setup,
                mask: set) -> None:  # pragma: no cover
    out_w, err_w, res_w = writers
    sysrun.die_with_parent(signal.SIGINT)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    logging.getLogger().handlers.clear()        # the daemon's log is not the client's
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    close_fds_except({0, 1, 2, res_w})
    os.environ.pop("GPUSNAP_SOCKET", None)      # a CLI run inside must not forward again
    os.environ.update(env or {})
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # a cancel already sent: raised here
        if os.getppid() != parent:              # the daemon died before prctl took
            raise Interrupted()
        if setup:
            setup()
        payload, code = {"ok": fn(*args)}, 0
    except KeyboardInterrupt:
        exc = Interrupted()
        payload, code = {"error": exc.to_dict()}, exc.exit_code
    except GpusnapError as exc:
        payload, code = {"error": exc.to_dict()}, exc.exit_code
    except BaseException as exc:  # noqa: BLE001 - reported to the client, as the CLI does
        traceback.print_exc()
        payload = {"error": {"error": type(exc).__name__, "message": str(exc), "exit_code": 1,
                             "hint": None}}
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if isinstance(payload.get("ok"), dict) and "exit_code" in payload["ok"]:
        code = payload["ok"]["exit_code"]
    _write_all(res_w, json.dumps(payload, default=str).encode())
    for fd in (res_w, 1, 2):        # the answer is whole before the exit's teardown starts
        try:
            os.close(fd)
        except OSError:
            pass
    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def close_fds_except(keep: set[int]) -> None:
    """Every other inherited fd becomes /dev/null (rather than closed: a daemon object
    collected in the child must not close an fd number that the operation reuses)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass                                    # the daemon is gone


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _drain(fd: int, sink: Callable[[bytes], None]) -> None:
    os.set_blocking(fd, False)
    try:
        while True:
            await _readable(fd)
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                return
            sink(data)
    finally:
        os.close(fd)


async def _collect(child: Child, readers: list[int]) -> None:
    """Stream the child's output to child.events, then reap it and parse its result."""
    out_r, err_r, res_r = readers
    result = bytearray()
    pidfd = os.pidfd_open(child.pid)
    try:
        await asyncio.gather(
            _drain(out_r, lambda b: child.events.put_nowait(("stdout", b))),
            _drain(err_r, lambda b: child.events.put_nowait(("stderr", b))),
            _drain(res_r, result.extend))
        child.answered = time.monotonic()
        await _readable(pidfd)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        child.result = json.loads(result) if result else None
    except ValueError:
        child.result = None
    if child.result is None:                    # killed before it could answer
        exc = Interrupted(f"the operation's process died (exit status {code})")
        exc.exit_code = 130 if code in (-signal.SIGINT, -signal.SIGKILL) else 1
        child.result = {"error": exc.to_dict()}
    ok = child.result.get("ok")
    child.exit_code = (ok.get("exit_code", 0) if isinstance(ok, dict) else 0) if "ok" in child.result \
        else child.result["error"]["exit_code"]
    child.events.put_nowait(("exit", child.exit_code))
