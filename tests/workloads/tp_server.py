"""A tensor-parallel LLM server: N ranks (torch.distributed, one process per GPU), a
Llama-shaped model split Megatron-style (attention heads and MLP columns per rank, one
all-reduce after attention and one after the MLP), random weights, greedy decoding.

    python -m tests.workloads.tp_server make --size 8b --world 2 --out DIR [--cpu]
    python -m tests.workloads.tp_server serve --model DIR --world 2 --port P --state DIR
        [--sdk] [--nccl-safe] [--cpu]

`make` writes DIR/rank<r>-of-<N>.safetensors (rank r's shard, generated where it will
run) and DIR/tp.json. `serve` is the launcher: it starts the N ranks as its children (so
its pid names the whole server for gpusnap), rank r on GPU r, each with RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE set as torchrun sets them and NVLink multicast off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
--nccl-safe adds NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0 (what a transparent checkpoint
can restore); without it NCCL keeps its defaults, which gpusnap refuses unless --sdk.
--sdk: every rank enables gpusnap.sdk over its shard and registers its process groups'
teardown and rebuild (gpusnap.sdk.collectives), so a dump drops the weights and the
communicators and a restore brings both back (a rebuild that takes more than
--rebuild-timeout seconds fails the restore). --cpu: gloo on the CPU (tests without GPU).

Rank 0 answers on 127.0.0.1:P:
    GET  /health                                       -> {"ok": true, "pid": launcher}
    POST /generate {"ids": [...], "max_new_tokens": n} -> {"ids": [...]}
The ranks move in lockstep: each step they all-reduce a small header over a gloo group
(rank 0's job, every rank's checkpoint_wanted()), so an idle rank waits on the CPU, never
inside a GPU collective (the driver's lock waits for GPU work in flight), and all stop
at the same step when any agent wants to prepare. Rank 0 sends an idle step every 0.1 s.
SIGUSR2 prints every thread's stack of a rank in STATE/rank<r>.log.
STATE/ready (launcher pid, rank pids, load and warm-up seconds) once every rank is ready.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

from tests.workloads.llm_server import PROMPT, SIZES

TP_SIZES = {**SIZES,
            "70b": (8192, 80, 64, 8, 28672, 128256),        # Llama-3-70B-shaped
            "120b": (12288, 72, 96, 8, 33792, 128256)}      # ~116B, for TP=4/8
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
NO_CUDA_IPC = {"NCCL_P2P_DISABLE": "1", "NCCL_CUMEM_ENABLE": "0"}
NO_IO_URING = {"USE_LIBUV": "0", "UV_USE_IO_URING": "0"}
HEADER = 4                  # op, new tokens, prompt length, stop votes
MAX_IDS = 512
IDLE_S = 0.1


def shard_path(model_dir: str, rank: int, world: int) -> str:
    return os.path.join(model_dir, f"rank{rank}-of-{world}.safetensors")


def shapes(size: str, world: int) -> dict[str, tuple]:
    """name -> shape of one rank's shard. Pure."""
    h, layers, heads, kv, inter, vocab = TP_SIZES[size]
    hd = h // heads
    if heads % world or kv % world or inter % world:
        raise ValueError(f"{size}: {heads} heads, {kv} kv heads, {inter} MLP columns do not "
                         f"split over {world} ranks")
    q, k, m = heads // world * hd, kv // world * hd, inter // world
    out = {"embed": (vocab, h), "norm": (h,), "lm_head": (vocab, h)}
    for i in range(layers):
        out |= {f"l{i}.in_norm": (h,), f"l{i}.wq": (q, h), f"l{i}.wk": (k, h), f"l{i}.wv": (k, h),
                f"l{i}.wo": (h, q), f"l{i}.post_norm": (h,), f"l{i}.w_gate": (m, h),
                f"l{i}.w_up": (m, h), f"l{i}.w_down": (h, m)}
    return out


def shard_bytes(size: str, world: int) -> int:
    n = 0
    for shape in shapes(size, world).values():
        c = 1
        for d in shape:
            c *= d
        n += c
    return 2 * n


def make(size: str, world: int, out: str, cpu: bool = False, seed: int = 0) -> None:
    import torch

    from tests.workloads.sdk_server import write_safetensors_stream
    os.makedirs(out, exist_ok=True)
    for rank in range(world):
        dev = "cpu" if cpu else f"cuda:{rank}"
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
        specs = shapes(size, world)

        def tensor(name: str, specs=specs, dev=dev, gen=gen):
            # made in file order, as before: the generator's draws are the same
            t = torch.empty(specs[name], dtype=torch.bfloat16, device=dev)
            return t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02, generator=gen)
        write_safetensors_stream([(n, torch.bfloat16, sh) for n, sh in specs.items()], tensor,
                                 shard_path(out, rank, world))
    with open(os.path.join(out, "tp.json"), "w") as f:
        json.dump({"size": size, "world": world, "dims": TP_SIZES[size]}, f)


# ---- the model ----------------------------------------------------------------------

class Shard:
    """One rank's part of the model (weights: name -> tensor, as in its file)."""

    def __init__(self, size: str, world: int, weights: dict):
        self.w = weights
        h, self.layers, heads, kv, _, _ = TP_SIZES[size]
        self.hd = h // heads
        self.heads, self.kv = heads // world, kv // world

    def _norm(self, x, w):
        import torch
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    def _rope(self, x):
        import torch
        t, d = x.shape[1], self.hd
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv)
        cos, sin = ang.cos()[None], ang.sin()[None]
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)

    def forward(self, ids, reduce):
        """Logits of the last position; reduce(t) sums t over the ranks in place."""
        import torch
        import torch.nn.functional as F
        w, t = self.w, ids.shape[0]
        x = w["embed"][ids]
        for i in range(self.layers):
            a = self._norm(x, w[f"l{i}.in_norm"])
            q = (a @ w[f"l{i}.wq"].T).view(t, self.heads, self.hd).transpose(0, 1)
            k = (a @ w[f"l{i}.wk"].T).view(t, self.kv, self.hd).transpose(0, 1)
            v = (a @ w[f"l{i}.wv"].T).view(t, self.kv, self.hd).transpose(0, 1)
            q, k = self._rope(q), self._rope(k)
            rep = self.heads // self.kv
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, -1)
            x = x + reduce((o @ w[f"l{i}.wo"].T).float()).to(x.dtype)
            m = self._norm(x, w[f"l{i}.post_norm"])
            m = F.silu(m @ w[f"l{i}.w_gate"].T) * (m @ w[f"l{i}.w_up"].T)
            x = x + reduce((m @ w[f"l{i}.w_down"].T).float()).to(x.dtype)
        return self._norm(x[-1:], w["norm"]) @ w["lm_head"].T

    def generate(self, ids: list[int], n: int, device, reduce) -> list[int]:
        import torch
        out = list(ids)
        with torch.inference_mode():
            for _ in range(n):
                logits = self.forward(torch.tensor(out, device=device), reduce)
                out.append(int(logits[0].float().argmax()))
        return out[len(ids):]


# ---- a rank ---------------------------------------------------------------------------

class Jobs:
    """Rank 0's requests, from the HTTP thread to the lockstep loop."""

    def __init__(self):
        self.queue: collections.deque = collections.deque()
        self.ready = threading.Condition()

    def submit(self, ids: list[int], n: int) -> list[int]:
        job = {"ids": ids, "n": n, "done": threading.Event(), "out": None}
        with self.ready:
            self.queue.append(job)
            self.ready.notify()
        job["done"].wait()
        return job["out"]

    def take(self, timeout: float):
        with self.ready:
            if not self.queue:
                self.ready.wait(timeout)
            return self.queue.popleft() if self.queue else None

    def put_back(self, job) -> None:
        with self.ready:
            self.queue.appendleft(job)


def serve_http(port: int, jobs: Jobs, launcher: int) -> None:
    from http.server import ThreadingHTTPServer

    from tests.workloads.common import JsonHandler

    class Handler(JsonHandler):
        def do_GET(self):
            self._send({"ok": True, "pid": launcher})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = (req.get("ids") or PROMPT)[:MAX_IDS]
            self._send({"ids": jobs.submit(ids, int(req.get("max_new_tokens", 1)))})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()


def _step(agent, group, shard, jobs, device, reduce) -> bool:
    """One lockstep step (under the serving gate); True when the ranks agreed to stop."""
    import torch
    import torch.distributed as dist
    job = jobs.take(IDLE_S) if jobs else None
    h = torch.zeros(HEADER + MAX_IDS, dtype=torch.int64)
    if job:
        h[0], h[1], h[2] = 1, job["n"], len(job["ids"])
        h[HEADER:HEADER + len(job["ids"])] = torch.tensor(job["ids"])
    h[3] = int(agent.checkpoint_wanted()) if agent else 0
    dist.all_reduce(h, group=group.cpu_group)
    if h[3] > 0:
        if job:
            jobs.put_back(job)
        return True
    if h[0] == 1:
        out = shard.generate(h[HEADER:HEADER + int(h[2])].tolist(), int(h[1]), device, reduce)
        if job:
            job["out"] = out
            job["done"].set()
    return False


def load_shard(path: str, device: str) -> dict:
    """name -> tensor on device, each read from its range of the file (a tensor of its
    own: the SDK reloads it from there)."""
    import ctypes

    import torch

    from gpusnap.sdk import read_header
    from gpusnap.sdk.registry import torch_dtype
    out = {}
    with open(path, "rb", buffering=0) as f:
        for name, e in read_header(path).entries.items():
            cpu = torch.empty(e.shape, dtype=torch_dtype(e.dtype))
            f.seek(e.offset)
            f.readinto((ctypes.c_char * e.length).from_address(cpu.data_ptr()))
            out[name] = cpu.to(device)
    return out


def rank_main(args) -> int:
    import contextlib

    import torch
    import torch.distributed as dist

    import gpusnap.sdk
    from tests.workloads.common import stacks_on_sigusr2
    stacks_on_sigusr2()
    rank, world = args.rank, args.world
    device = "cpu" if args.cpu else f"cuda:{rank}"
    if not args.cpu:
        torch.cuda.set_device(rank)
    t0 = time.time()
    path = shard_path(args.model, rank, world)
    weights = load_shard(path, device)
    with open(os.path.join(args.model, "tp.json")) as f:
        shard = Shard(json.load(f)["size"], world, weights)
    group = gpusnap.sdk.TorchGroup(os.path.join(args.state, "rendezvous"), rank, world,
                                   "gloo" if args.cpu else "nccl", device, cpu_group=True)
    group.init()
    t_load = time.time()
    agent = None
    if args.sdk:
        agent = gpusnap.sdk.enable(weights, path, socket_dir=args.socket_dir)
        gpusnap.sdk.collectives(agent, group.destroy, group.init,
                                rebuild_timeout_s=args.rebuild_timeout)

    def reduce(t):
        dist.all_reduce(t)
        return t

    warm = shard.generate(PROMPT, 2, device, reduce)
    jobs = Jobs() if rank == 0 else None
    if jobs:
        serve_http(args.port, jobs, os.getppid())
    _write_json(os.path.join(args.state, f"ready-{rank}.json"),
                {"pid": os.getpid(), "rank": rank, "load_s": t_load - t0,
                 "warm_s": time.time() - t_load, "warm_ids": warm,
                 "sdk": agent.status() if agent else None})
    gate = agent.serving if agent else contextlib.nullcontext
    while True:
        with gate():
            while not _step(agent, group, shard, jobs, device, reduce):
                pass
        agent.wait_prepared(60)


def _write_json(path: str, data: dict) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f)
    os.replace(f"{path}.tmp", path)


# ---- the launcher ---------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(args) -> int:
    os.makedirs(os.path.join(args.state, "rendezvous"), exist_ok=True)
    ranks = []
    for rank in range(args.world):
        env = {**os.environ, **NO_MULTICAST, **NO_IO_URING, "RANK": str(rank),
               "WORLD_SIZE": str(args.world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(args.world), "PYTHONPATH": REPO}
        if args.nccl_safe:
            env.update(NO_CUDA_IPC)
        log = open(os.path.join(args.state, f"rank{rank}.log"), "ab")
        argv = [sys.executable, "-m", "tests.workloads.tp_server", "rank", "--rank", str(rank)]
        for key in ("model", "world", "port", "state", "socket_dir", "rebuild_timeout"):
            if getattr(args, key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        argv += [flag for flag, on in (("--sdk", args.sdk), ("--cpu", args.cpu)) if on]
        ranks.append(subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log))
    ready = [os.path.join(args.state, f"ready-{r}.json") for r in range(args.world)]
    while not all(os.path.exists(p) for p in ready):
        if any(p.poll() is not None for p in ranks):
            return _end(ranks, 1)
        time.sleep(0.05)
    infos = []
    for p in ready:
        with open(p) as f:
            infos.append(json.load(f))
    _write_json(os.path.join(args.state, "ready"),
                {"pid": os.getpid(), "ranks": [p.pid for p in ranks], "port": args.port,
                 "load_s": max(i["load_s"] for i in infos), "warm_s": max(i["warm_s"] for i in infos),
                 "warm_ids": infos[0]["warm_ids"], "sdk": infos[0]["sdk"]})
    while all(p.poll() is None for p in ranks):
        time.sleep(0.2)
    return _end(ranks, 0)


def _end(ranks, rc: int) -> int:
    for p in ranks:
        if p.poll() is None:
            p.kill()
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--size", choices=sorted(TP_SIZES), default="tiny")
    m.add_argument("--world", type=int, default=2)
    m.add_argument("--out", required=True)
    m.add_argument("--cpu", action="store_true")
    for name in ("serve", "rank"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--world", type=int, default=2)
        s.add_argument("--port", type=int, default=18100)
        s.add_argument("--state", required=True)
        s.add_argument("--socket-dir")
        s.add_argument("--sdk", action="store_true")
        s.add_argument("--cpu", action="store_true")
        s.add_argument("--nccl-safe", action="store_true")
        s.add_argument("--rank", type=int)
        s.add_argument("--rebuild-timeout", type=float, default=300.0,
                       help="--sdk: seconds a rebuild of the process groups may take")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        make(args.size, args.world, args.out, args.cpu)
        return 0
    return launch(args) if args.cmd == "serve" else rank_main(args)


# ---- the test side ------------------------------------------------------------------------

class TpServer:
    """Starts `serve` detached (its own session, stdio in files), talks to rank 0, and
    kills the tree. make() builds the model first where it is missing."""

    def __init__(self, model_dir: str, state: str, world: int = 2, port: int = 18100,
                 sdk: bool = False, cpu: bool = False, nccl_safe: bool = False,
                 socket_dir: str | None = None, rebuild_timeout: float | None = None):
        self.model_dir, self.state, self.world, self.port = model_dir, state, world, port
        self.rebuild_timeout = rebuild_timeout
        self.flags = [f for f, on in (("--sdk", sdk), ("--cpu", cpu), ("--nccl-safe", nccl_safe)) if on]
        self.socket_dir = socket_dir
        self.pid: int | None = None
        self.ranks: list[int] = []
        self.ready: dict = {}

    def make(self, size: str, timeout: float = 600) -> None:
        """`make` in a child process (the caller keeps no GPU memory), once."""
        if os.path.exists(os.path.join(self.model_dir, "tp.json")):
            return
        r = subprocess.run([sys.executable, "-m", "tests.workloads.tp_server", "make", "--size", size,
                            "--world", str(self.world), "--out", self.model_dir,
                            *(["--cpu"] if "--cpu" in self.flags else [])],
                           cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"making the {size} TP={self.world} model: {r.stderr[-3000:]}")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "tests.workloads.tp_server", "serve", "--model",
                self.model_dir, "--world", str(self.world), "--port", str(self.port),
                "--state", self.state, *self.flags] + \
            (["--socket-dir", self.socket_dir] if self.socket_dir else []) + \
            (["--rebuild-timeout", str(self.rebuild_timeout)] if self.rebuild_timeout else [])

    def start(self, timeout: float = 300) -> TpServer:
        import shutil
        shutil.rmtree(self.state, ignore_errors=True)
        os.makedirs(self.state)
        log = open(os.path.join(self.state, "launcher.log"), "ab")
        proc = subprocess.Popen(self.argv(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
        self._proc = proc
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        path = os.path.join(self.state, "ready")
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the TP server did not start\n{self.logs()}")
            time.sleep(0.02)
        with open(path) as f:
            self.ready = json.load(f)
        self.ranks = self.ready["ranks"]
        return self

    def generate(self, n: int = 1, ids: list[int] | None = None, timeout: float = 120) -> list[int]:
        """Rank 0's answer; RuntimeError with every rank's stacks in the logs it quotes
        when there is none."""
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/generate",
                                     json.dumps({"ids": ids or PROMPT, "max_new_tokens": n}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["ids"]
        except OSError as e:
            from tests.workloads.common import ask_stacks
            ask_stacks(self.ranks)
            raise RuntimeError(f"no answer from the TP server: {e}\n{self.logs()}") from None

    def logs(self) -> str:
        from tests.workloads.common import tail_logs
        return tail_logs(self.state, ["launcher.log"] + [f"rank{r}.log" for r in range(self.world)])

    def reap(self) -> None:
        """Collect the launcher (our child until a restore makes it CRIU's) once gpusnap
        killed it, so that its pid is free for the restore."""
        try:
            self._proc.wait(timeout=60)
        except (AttributeError, subprocess.TimeoutExpired):
            pass

    def stop(self) -> None:
        from tests.workloads.common import kill_all
        kill_all([*self.ranks, self.pid])
        self.reap()
        self.pid, self.ranks = None, []


if __name__ == "__main__":
    sys.exit(main())
