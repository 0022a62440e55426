"""A parent that forks CUDA-using children: several at once (gpusnap's parallel CUDA
stages have more than one pid to work on), or a new one every --every seconds (a
process of the tree starts using the GPU while gpusnap dumps it).

    python -m tests.workloads.cuda_forker --dir D [--children 2] [--every 0] [--max 0] [--life 0]
                                          [--mib 256] [--device cpu]

The parent imports torch but never initialises CUDA (a child then may), starts
--children children at once, then, with --every > 0, one more every --every seconds
until it has started --max (0: no end), and reaps those that end (each lives --life
seconds, 0: until killed). A child fills
--mib of device memory with a pattern (as gpusnap/workloads/torch_holder.py) and
sleeps in 20 ms steps. Protocol, in D:
  - state.json (parent pid, children: [pids]) once the first --children are ready;
  - child-PID.json (pid, checksum) once that child is ready;
  - on SIGUSR1 a child re-checks its device memory and writes result-PID.json
    (intact, checksum, ticks);
  - SIGTERM to the parent ends it and its children.
Stdio must be files (CRIU cannot dump a terminal it does not own): Forker starts it so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

from gpusnap.workloads.torch_holder import _read_json, _write_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(torch, args) -> None:
    flags = {"check": 0}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("check", flags["check"] + 1))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    n = args.mib * (1 << 20) // 4
    key = os.getpid() & 0x7FFFFFFF

    def pattern():
        return torch.arange(n, dtype=torch.int32, device=args.device).bitwise_xor_(key)

    data = pattern()
    checksum = hashlib.sha256(str(int(data.sum(dtype=torch.int64))).encode()).hexdigest()[:16]
    if args.device == "cuda":
        torch.cuda.synchronize()
    _write_json(os.path.join(args.dir, f"child-{os.getpid()}.json"),
                {"pid": os.getpid(), "checksum": checksum})
    end = time.monotonic() + args.life if args.life > 0 else None
    ticks = answered = 0
    while end is None or time.monotonic() < end:
        ticks += 1
        if flags["check"] > answered:
            answered = flags["check"]
            _write_json(os.path.join(args.dir, f"result-{os.getpid()}.json"),
                        {"intact": bool(torch.equal(data, pattern())), "ticks": ticks,
                         "checksum": checksum})
        time.sleep(0.02)


def _fork(torch, args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(torch, args)
        except BaseException:       # noqa: BLE001 - the exit code says it failed
            code = 1
        os._exit(code)
    return pid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--every", type=float, default=0.0)
    ap.add_argument("--max", type=int, default=0)
    ap.add_argument("--life", type=float, default=0.0)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="cpu: the same without a GPU (a check "
                    "of the workload itself)")
    args = ap.parse_args(argv)
    import torch                    # CUDA is not initialised here: the children may
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    children = {_fork(torch, args) for _ in range(args.children)}
    first = sorted(children)
    while not all(os.path.exists(os.path.join(args.dir, f"child-{p}.json")) for p in first):
        time.sleep(0.05)
    _write_json(os.path.join(args.dir, "state.json"), {"pid": os.getpid(), "children": first})
    last, started = time.monotonic(), len(children)
    while not stop["now"]:
        try:
            while True:
                done, _ = os.waitpid(-1, os.WNOHANG)
                if not done:
                    break
                children.discard(done)
        except ChildProcessError:
            pass
        more = args.every > 0 and (args.max <= 0 or started < args.max)
        if more and time.monotonic() - last >= args.every:
            children.add(_fork(torch, args))
            last, started = time.monotonic(), started + 1
        time.sleep(0.02)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


class Forker:
    """Starts the workload detached with stdio in a file and waits for it; stop() kills
    the parent and every child it has now."""

    def __init__(self, workdir: str, *extra: str):
        self.dir, self.extra = workdir, list(extra)
        self.pid: int | None = None
        self.children: list[int] = []

    def start(self, timeout: float = 240) -> Forker:
        from gpusnap import sysrun
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT}
        for key in ("LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "CUDA_HOME"):
            if key in os.environ:
                env[key] = os.environ[key]
        self.pid = sysrun.spawn_detached(
            [sys.executable, "-m", "tests.workloads.cuda_forker", "--dir", self.dir, *self.extra],
            env=env, cwd=ROOT, stdout=os.path.join(self.dir, "forker.log"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _read_json(os.path.join(self.dir, "state.json"))
            if state:
                self.children = state["children"]
                return self
            time.sleep(0.2)
        raise TimeoutError(f"forker not ready after {timeout:.0f}s: {self.log_tail()}")

    def tree(self) -> list[int]:
        import psutil
        try:
            return [self.pid] + [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def check(self, pid: int, timeout: float = 60) -> dict:
        """Ask child pid to check its device memory (it must be running)."""
        path = os.path.join(self.dir, f"result-{pid}.json")
        if os.path.exists(path):
            os.unlink(path)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = _read_json(path)
            if result:
                return result
            time.sleep(0.05)
        raise TimeoutError(f"child {pid} did not answer: {self.log_tail()}")

    def stop(self) -> None:
        for pid in reversed(self.tree()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.pid:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        self.pid = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(os.path.join(self.dir, "forker.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
