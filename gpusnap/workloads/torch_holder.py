"""A PyTorch process whose device memory can be proven intact across checkpoint/restore.

    python torch_holder.py --gib 2 [--mode idle|graphs|busy] --state S --result R

Its stdio must be files (CRIU cannot dump a terminal it does not own); Holder below
starts it that way. Both sides of the protocol live in this file:

  - after setup the workload writes S (JSON: pid, gib, mode, checksum) atomically;
  - on SIGUSR1 it re-reads all its GPU data, compares every element with the pattern
    regenerated on the GPU, and writes R (JSON: seq, checksum, intact, graphs_ok,
    iterations) atomically; seq counts requests, so a reader waits for a newer one;
  - SIGTERM ends it.

The pattern is arange XOR a per-chunk constant: regenerated in place, so the check is
exact (torch.equal), not a hash that a partial restore could collide with.
Modes: idle runs a tiny kernel every 20 ms; graphs replays a CUDA graph of cuBLAS
matmuls on each of two streams and checks the products stay bit-identical; busy keeps
the GPU in ~1 s spin kernels with a synchronize after each (a CUDA call in flight for a
lock to wait on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time

CHUNK_ELEMS = 1 << 28           # int32 elements: 1 GiB a chunk


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---- the workload (runs in its own process; imports torch) ----

def _chunk_sizes(gib: float) -> list[int]:
    total = int(gib * (1 << 30)) // 4
    return [min(CHUNK_ELEMS, total - start) for start in range(0, total, CHUNK_ELEMS)]


def _pattern(torch, i: int, n: int):
    key = (0x9E3779B1 * (i + 1)) & 0x7FFFFFFF
    return torch.arange(n, dtype=torch.int32, device="cuda").bitwise_xor_(key)


def _verify(torch, chunks) -> tuple[str, bool]:
    sums, intact = [], True
    for i, chunk in enumerate(chunks):
        sums.append(int(torch.sum(chunk, dtype=torch.int64).item()))
        intact = intact and bool(torch.equal(chunk, _pattern(torch, i, chunk.numel())))
    return hashlib.sha256(repr(sums).encode()).hexdigest()[:16], intact


def _build_graphs(torch, n: int = 2048):
    gen = torch.Generator(device="cuda").manual_seed(1234)
    work = []
    for _ in range(2):
        stream = torch.cuda.Stream()
        a = torch.randn(n, n, device="cuda", generator=gen)
        b = torch.randn(n, n, device="cuda", generator=gen)
        out = torch.empty(n, n, device="cuda")
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                torch.matmul(a, b, out=out)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            torch.matmul(a, b, out=out)
        with torch.cuda.stream(stream):
            graph.replay()
        torch.cuda.synchronize()
        # a and b go along: a graph keeps raw pointers, not references, so inputs dropped
        # here would be freed and reused under it (seen: wrong products, then a fault)
        work.append((stream, graph, out, out.clone(), a, b))
    return work


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--mode", choices=("idle", "graphs", "busy"), default="idle")
    ap.add_argument("--state", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args(argv)

    import torch

    flags = {"check": 0, "stop": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("check", flags["check"] + 1))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))

    chunks = [_pattern(torch, i, n) for i, n in enumerate(_chunk_sizes(args.gib))]
    checksum, intact = _verify(torch, chunks)
    assert intact
    torch.cuda.empty_cache()        # a checkpoint then holds the data, not the check's temps
    graphs = _build_graphs(torch) if args.mode == "graphs" else []
    tick = torch.zeros(1024, device="cuda")
    torch.cuda.synchronize()
    _write_json(args.state, {"pid": os.getpid(), "gib": args.gib, "mode": args.mode,
                             "checksum": checksum, "device": torch.cuda.get_device_name()})
    print(f"ready pid={os.getpid()} checksum={checksum}", flush=True)

    iterations = answered = 0
    while not flags["stop"]:
        if args.mode == "busy":
            torch.cuda._sleep(2_000_000_000)
        for stream, graph, *_ in graphs:
            with torch.cuda.stream(stream):
                graph.replay()
        tick.add_(1)
        torch.cuda.synchronize()
        iterations += 1
        if flags["check"] > answered:
            answered = flags["check"]
            checksum, intact = _verify(torch, chunks)
            diff = max((float((out - ref).abs().max() / ref.abs().max())
                        for _, _, out, ref, *_ in graphs), default=0.0)
            _write_json(args.result, {"seq": answered, "checksum": checksum,
                                      "intact": intact, "graphs_ok": diff < 1e-4,
                                      "graphs_rel_diff": diff, "iterations": iterations})
        if args.mode != "busy":
            time.sleep(0.005 if graphs else 0.02)
    return 0


# ---- the test side ----

class Holder:
    """Starts the workload detached with stdio in files, waits until it is ready, asks
    it to check its data, and kills it."""

    def __init__(self, workdir: str, gib: float = 1.0, mode: str = "idle"):
        self.workdir, self.gib, self.mode = workdir, gib, mode
        self.state_path = os.path.join(workdir, "holder.state.json")
        self.result_path = os.path.join(workdir, "holder.result.json")
        self.log_path = os.path.join(workdir, "holder.log")
        self.pid: int | None = None
        self.ready: dict = {}

    @property
    def checksum(self) -> str:
        return self.ready["checksum"]

    def start(self, timeout: float = 240) -> Holder:
        from gpusnap import sysrun
        env = {"PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        for key in ("LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "CUDA_HOME"):
            if key in os.environ:
                env[key] = os.environ[key]
        for path in (self.state_path, self.result_path):
            if os.path.exists(path):
                os.unlink(path)
        self.pid = sysrun.spawn_detached(
            [sys.executable, os.path.abspath(__file__), "--gib", str(self.gib),
             "--mode", self.mode, "--state", self.state_path, "--result", self.result_path],
            env=env, cwd=self.workdir, stdout=self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _read_json(self.state_path)
            if state:
                self.ready = state
                return self
            self._alive_or_raise()
            time.sleep(0.2)
        raise TimeoutError(f"holder not ready after {timeout:.0f}s\n{self.log_tail()}")

    def check(self, timeout: float = 120) -> dict:
        """Ask for a fresh check of the GPU data (the process must be running)."""
        # A restored copy counts from where it was dumped, so seq can go back: remove the
        # old result instead of comparing sequence numbers.
        if os.path.exists(self.result_path):
            os.unlink(self.result_path)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = _read_json(self.result_path)
            if result:
                return result
            self._alive_or_raise()
            time.sleep(0.05)
        raise TimeoutError(f"holder did not answer within {timeout:.0f}s\n{self.log_tail()}")

    def nvidia_fds(self) -> list[str]:
        fds = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/nvidia"):
                fds.append(target)
        return fds

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        """SIGKILL: a locked process would hang in a SIGTERM handler's CUDA calls."""
        if self.pid is None:
            return
        from gpusnap.sysrun import kill_child
        kill_child(self.pid)
        self.pid = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no holder log)"

    def _alive_or_raise(self) -> None:
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return      # not our child (another process started it): cannot tell
        if done:
            self.pid = None
            raise RuntimeError(f"holder exited (status {status})\n{self.log_tail()}")


if __name__ == "__main__":
    sys.exit(main())
