"""Two NCCL ranks (torch.distributed, one process per GPU, TP=2) all-reducing a known
tensor in a loop, whose correctness survives checkpoint/restore or says it did not.

    python tp_allreduce.py --dir D [--mib 256] [--unsafe] [--cpu]   (the launcher)

The launcher starts rank 0 and rank 1 as its children (so the launcher's pid names the
whole tree for gpusnap), rank r on GPU r (torch.cuda.set_device, as torchrun's
LOCAL_RANK: each sees both GPUs, so a restore maps both, e.g. swapped), with an
environment that keeps NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) and NCCL off CUDA IPC
(NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0: what the driver's checkpoint can restore).
--unsafe leaves the last two out (NCCL's defaults: gpusnap must refuse it). --cpu runs
the same protocol over gloo on the CPU (a check of the workload without a GPU).

Each rank holds --mib of a pattern and, every loop, all-reduces (rank + 1) * base: the
sum must be 3 * base exactly (small integers in float32). Protocol, per rank r, as in
gpusnap/workloads/torch_holder.py:
  - D/state-r.json once ready (pid, rank, device, checksum), written atomically;
  - on SIGUSR1: D/result-r.json (seq, intact, allreduce_ok, iterations, failures);
  - on SIGUSR2: every thread's Python stack in D/rank<r>.log (a check that times out
    asks for them before it reads the logs).
NCCL_DEBUG is WARN unless the caller's environment sets it, so NCCL's own complaints
reach the logs.
Between collectives each rank synchronizes and sleeps 50 ms: a rank locked while its
peer is inside a collective waiting for it never drains (the driver's lock waits for
work in flight), so the lock times out and gpusnap rolls back; a server that runs
collectives back to back needs the SDK to tear its communicators down first.
The launcher writes D/state.json (pid, ranks: [pid0, pid1]) once both are ready, and ends
when a rank does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
NO_CUDA_IPC = {"NCCL_P2P_DISABLE": "1", "NCCL_CUMEM_ENABLE": "0"}
# CRIU 4.2 cannot dump an io_uring: torch's TCPStore (libuv) keeps one open unless told not to
NO_IO_URING = {"USE_LIBUV": "0", "UV_USE_IO_URING": "0"}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> int:
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = {**os.environ, **NO_MULTICAST, **NO_IO_URING,
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if not args.unsafe:
            env.update(NO_CUDA_IPC)
        log = open(os.path.join(args.dir, f"rank{rank}.log"), "ab")
        ranks.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--mib",
             str(args.mib), "--rank", str(rank)] + (["--cpu"] if args.cpu else []),
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
    while not all(os.path.exists(os.path.join(args.dir, f"state-{r}.json")) for r in range(2)):
        if any(p.poll() is not None for p in ranks):
            return 1
        time.sleep(0.1)
    _write_json(os.path.join(args.dir, "state.json"),
                {"pid": os.getpid(), "ranks": [p.pid for p in ranks]})
    while all(p.poll() is None for p in ranks):
        time.sleep(0.2)
    for p in ranks:
        if p.poll() is None:
            p.kill()
    return 0


def rank_main(args) -> int:
    import torch
    import torch.distributed as dist

    import faulthandler
    faulthandler.register(signal.SIGUSR2, all_threads=True)     # where it hangs, in the log
    flags = {"check": 0}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("check", flags["check"] + 1))
    rank, dev = args.rank, "cpu" if args.cpu else "cuda"
    if not args.cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if args.cpu else "nccl", init_method="env://",
                            rank=rank, world_size=2)
    n = args.mib * (1 << 20) // 4
    held = torch.arange(n, dtype=torch.int32, device=dev).bitwise_xor_(0x5A5A5A5A ^ (rank << 20))
    checksum = int(torch.sum(held, dtype=torch.int64).item())
    base = (torch.arange(1 << 20, device=dev, dtype=torch.float32) % 1000)
    buf = torch.empty_like(base)
    iterations = failures = answered = 0

    def step() -> bool:
        buf.copy_(base).mul_(rank + 1)
        dist.all_reduce(buf)
        return bool(torch.equal(buf, base * 3))

    assert step()
    _write_json(os.path.join(args.dir, f"state-{rank}.json"),
                {"pid": os.getpid(), "rank": rank, "checksum": checksum,
                 "device": "cpu" if args.cpu else torch.cuda.get_device_name()})
    while True:
        ok = step()
        if not args.cpu:
            torch.cuda.synchronize()
        iterations += 1
        failures += not ok
        if flags["check"] > answered:
            answered = flags["check"]
            again = held.clone().bitwise_xor_(0x5A5A5A5A ^ (rank << 20))
            intact = bool(torch.equal(again, torch.arange(n, dtype=torch.int32, device=dev)))
            _write_json(os.path.join(args.dir, f"result-{rank}.json"),
                        {"seq": answered, "intact": intact, "allreduce_ok": ok,
                         "iterations": iterations, "failures": failures,
                         "checksum": int(torch.sum(held, dtype=torch.int64).item())})
        time.sleep(0.05)    # idle between collectives: see the module's docstring


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--unsafe", action="store_true", help="NCCL's defaults (CUDA IPC on)")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU: the protocol without a GPU")
    args = ap.parse_args(argv)
    return launch(args) if args.rank is None else rank_main(args)


# ---- the test side ----

class TensorParallel:
    """Starts the launcher detached with stdio in files, waits for both ranks, asks them
    to check, and kills the tree."""

    def __init__(self, workdir: str, mib: int = 256, unsafe: bool = False, cpu: bool = False):
        self.dir, self.mib, self.unsafe, self.cpu = workdir, mib, unsafe, cpu
        self.pid: int | None = None
        self.ranks: list[int] = []

    def start(self, timeout: float = 300) -> TensorParallel:
        from gpusnap import sysrun
        env = {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
        for key in ("LD_LIBRARY_PATH", "CUDA_HOME", "PATH"):
            if key in os.environ:
                env[key] = os.environ[key]
        argv = [sys.executable, os.path.abspath(__file__), "--dir", self.dir,
                "--mib", str(self.mib)] + (["--unsafe"] if self.unsafe else []) \
            + (["--cpu"] if self.cpu else [])
        self.pid = sysrun.spawn_detached(argv, env=env, cwd=self.dir,
                                         stdout=os.path.join(self.dir, "launcher.log"))
        state = self._wait(os.path.join(self.dir, "state.json"), timeout)
        self.ranks = state["ranks"]
        return self

    def check(self, timeout: float = 120) -> list[dict]:
        """Both ranks' fresh results (the tree must be running); TimeoutError with every
        rank's stacks in the logs it quotes when one does not answer."""
        paths = [os.path.join(self.dir, f"result-{r}.json") for r in range(2)]
        for path, pid in zip(paths, self.ranks):
            if os.path.exists(path):
                os.unlink(path)
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        try:
            return [self._wait(path, max(0.0, deadline - time.monotonic()), quiet=True)
                    for path in paths]
        except TimeoutError as e:
            from tests.workloads.common import ask_stacks
            ask_stacks(self.ranks)
            raise TimeoutError(f"{e}: the ranks did not answer a check in {timeout:g} s\n"
                               f"{self.logs()}") from None

    def checksums(self) -> list[int]:
        return [self._wait(os.path.join(self.dir, f"state-{r}.json"), 1)["checksum"]
                for r in range(2)]

    def _wait(self, path: str, timeout: float, quiet: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        raise TimeoutError(f"{path} not written in {timeout:.0f}s" + ("" if quiet else f"\n{self.logs()}"))

    def logs(self) -> str:
        from tests.workloads.common import tail_logs
        return tail_logs(self.dir, ["launcher.log", "rank0.log", "rank1.log"], chars=6000)

    def reap(self) -> None:
        """Collect the launcher (our child until a restore makes it CRIU's) once gpusnap
        killed it, so that its pid is free for the restore."""
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def stop(self) -> None:
        from tests.workloads.common import kill_all
        kill_all([*self.ranks, self.pid])
        try:
            os.waitpid(self.pid, 0)
        except (ChildProcessError, TypeError):
            pass
        self.pid, self.ranks = None, []


if __name__ == "__main__":
    sys.exit(main())
