"""Beyond one server on one GPU: switching a GPU between two servers, standbys,
tensor-parallel servers, a 30B-class server, a diffusion pipeline. One row per command:

    python benchmarks/breadth.py switch    [--size 8b] [--runs 3]    one GPU, two servers
    python benchmarks/breadth.py standby   [--size 1b] [--runs 3]    restore --standby, resume
    python benchmarks/breadth.py tp        [--size 8b] [--world 2]   TP=N: cold, transparent, SDK, GPUs permuted
    python benchmarks/breadth.py b30       [--size 30b] --mode transparent|sdk
    python benchmarks/breadth.py diffusion [--size sdxl] [--runs 2]  a diffusers UNet + VAE, random weights
    python benchmarks/breadth.py estimate  --from DIR                120B-class on paper, from measured GB/s

Each prints its table and writes DIR/breadth_<row>_<card>.json and .md (--out, default
$GPUSNAP_RESULTS or benchmarks/results). --dry-run says what the row would do, how many
bytes it moves and whether the disk holds them, and touches nothing. --cpu (tp, diffusion)
runs the row on the CPU (tp: ranks on gloo; diffusion: tiny by default), so it runs end
to end without a GPU. Every row
has a time budget (--budget, seconds): past it, the row stops between steps with the
step named; SIGTERM (gpu-session.sh's timeout) kills every server it started.
Models (random weights) are made once under --work/models and reused by later rows.
--daemon (switch, standby): each run goes through both front doors, the plain CLI and the
CLI forwarding to a gpusnapd started on the row's store (suspend and resume are what it
runs there), and the table has a line for each. --api adds a third: the same command
lines sent to gpusnapd's /v1/run by the benchmark's own process, as a controller that talks
to the daemon does (no interpreter started per command; the switch's pair and switch, the
standby's resume).
The naive baseline (cold_start.py's: the driver's lock + checkpoint by hand, a plain
`criu dump` into /dev/shm, `criu restore`, the driver's restore + unlock by hand) runs
after the other modes in standby, diffusion and b30 --mode transparent: --naive-runs
round trips (default 1, where the other modes run --runs), its images where naive_place
puts them (--dry-run says where), skipped where the budget has no room for it; its line
and "x naive" (naive / the mode's time) are in the table. --no-naive leaves it out.
switch's baseline is the driver's floor by hand; tp has none (TP_NO_NAIVE says why).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.cold_start import env_set, kill_tree, med, note, sh, tree, wait_gone  # noqa: E402
from tests.workloads.llm_server import PROMPT, SIZES  # noqa: E402

STARTED: list[int] = []         # every server's root pid, killed (with its tree) at exit


class Budget:
    """Seconds a row may take; check() between steps raises with the step named."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def check(self, step: str) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"over the row's {self.seconds:.0f} s budget before {step}")

    def left(self) -> float:
        return max(1.0, self.end - time.monotonic())

    def room(self, step: str, seconds: float) -> None:
        """Raises unless the budget has seconds left for step (a step cut by the step's
        limit would cost the row its table)."""
        if self.end - time.monotonic() < seconds:
            raise TimeoutError(f"{max(0.0, self.end - time.monotonic()):.0f} s left of the row's "
                               f"{self.seconds:.0f} s budget, {step} takes about {seconds:.0f} s")


class Ctx:
    """What every row shares: where models, stores and state go, and the card."""

    def __init__(self, args):
        self.args, self.work = args, args.work
        self.store = store_path(args)
        self.env = {"GPUSNAP_STATE_DIR": os.path.join(args.work, f"state-{args.row}")}
        self.budget = Budget(args.budget)
        self.card = card(args)
        self.daemon = None

    def doors(self) -> list[tuple[str, dict]]:
        """(via, env) of each front door a run goes through: the CLI standalone, and
        with --daemon the CLI forwarding to gpusnapd (started once, on this row's store)."""
        doors = [("cli", {"GPUSNAP_SOCKET": ""})]
        if getattr(self.args, "daemon", False):
            sock = os.path.join(self.work, f"gpusnapd-{self.args.row}.sock")
            if self.daemon is None:
                from benchmarks.daemon_soak import start_daemon
                self.daemon = start_daemon(self.store, sock, os.path.join(self.work, "gpusnapd.log"))
            doors.append(("daemon", {"GPUSNAP_SOCKET": sock}))
        return doors

    def doors_and_api(self) -> list[tuple[str, dict]]:
        """doors(), and with --api (and --daemon) the daemon's API called from this
        process (via "api", the daemon door's env)."""
        doors = self.doors()
        if getattr(self.args, "api", False) and doors[-1][0] == "daemon":
            doors.append(("api", doors[-1][1]))
        return doors

    def api(self, *a, env=None):
        """The command sent to gpusnapd's API (/v1/run) from this process, as a controller
        that talks to the daemon does (Client.run): no interpreter started for it. Its
        JSON answer."""
        from gpusnap.daemon.client import Client
        env = {**self.env, **(env or {})}
        sock = env.pop("GPUSNAP_SOCKET", None)
        if not sock:
            raise RuntimeError("the api door needs --daemon")
        code, out, err = Client(sock, timeout=self.budget.left() + 30).run(
            ["--json", "--store", self.store, *a], cwd=REPO, env=env)
        if code != 0:
            raise RuntimeError(f"gpusnap {' '.join(a)} (api): exit {code}: {err[-2000:]}")
        return json.loads(out)

    def run(self, via: str, *a, env=None):
        """gs(), or api() for the api door."""
        return self.api(*a, env=env) if via == "api" else self.gs(*a, env=env)

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(60)

    def gs(self, *a, env=None):
        """The gpusnap CLI, its JSON answer; it may run to the end of the budget (and
        30 s past it), then it is killed and the row stops, the command named."""
        import subprocess
        try:
            res = sh([sys.executable, "-m", "gpusnap", "--json", "--store", self.store, *a], cwd=REPO,
                     env={**os.environ, **self.env, **(env or {})}, timeout=self.budget.left() + 30)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"gpusnap {' '.join(a)}: still running at the end of the budget") from None
        if res.returncode != 0:
            raise RuntimeError(f"gpusnap {' '.join(a)}: exit {res.returncode}: {res.stderr[-2000:]}")
        return json.loads(res.stdout)


def store_path(args) -> str:
    return getattr(args, "store", None) or os.path.join(args.work, f"store-{args.row}")


def card(args) -> str:
    if getattr(args, "cpu", False) or args.dry_run:
        return "cpu" if getattr(args, "cpu", False) else "dry-run"
    import torch
    return torch.cuda.get_device_name(0)


def tag(name: str) -> str:
    return "h200" if "H200" in name else "h100" if "H100" in name else name.replace(" ", "_").lower()


# ---- single-GPU LLM servers (tests/workloads/llm_server.py) -------------------------------

def llm_model(ctx: Ctx, size: str) -> str:
    model_dir = os.path.join(ctx.work, "models", size)
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        ctx.budget.check(f"making the {size} model")
        r = sh([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size", size,
                "--out", model_dir], cwd=REPO, timeout=ctx.budget.left())
        if r.returncode:
            raise RuntimeError(f"making {size}: {r.stderr[-2000:]}")
    return model_dir


def http(port: int, path: str, body=None, timeout: float = 120):
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def first_token(port: int, n: int = 1) -> list[int]:
    return http(port, "/generate", {"ids": PROMPT, "max_new_tokens": n})["ids"]


def start_llm(ctx: Ctx, model_dir: str, name: str, port: int, sdk: bool = False) -> dict:
    """An LLM server to its first token: {pid, proc, port, cold_s, tokens, info}."""
    return start_server(ctx, "tests.workloads.llm_server", model_dir, name, port, sdk, first_token)


def start_server(ctx: Ctx, module: str, model_dir: str, name: str, port: int, sdk: bool,
                 probe, extra: tuple = ()) -> dict:
    """`python -m MODULE serve` to its first answer (probe(port)), in its own session."""
    import shutil
    import subprocess
    state = os.path.join(ctx.work, "servers", name)
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    log = open(os.path.join(state, "log"), "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", "--model", model_dir,
                             "--port", str(port), "--state", state, *extra] + (["--sdk"] if sdk else []),
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    STARTED.append(proc.pid)
    ready = os.path.join(state, "ready")
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} died:\n" + open(os.path.join(state, "log")).read()[-3000:])
        ctx.budget.check(f"server {name} ready")
        time.sleep(0.01)
    tokens = probe(port)
    cold = time.perf_counter() - t0
    with open(ready) as f:
        info = json.load(f)
    return {"pid": proc.pid, "proc": proc, "port": port, "cold_s": cold, "tokens": tokens, "info": info}


MODES = ("transparent", "sdk")
READER_MODES = {"sdk_mapped": "mapped", "sdk_pinned": "pinned"}    # SDK servers with that reader


def asked_modes(args, known=None) -> list[str]:
    """--modes as a list (default MODES); a mode outside known (where given) is refused. Pure."""
    modes = [m for m in (getattr(args, "modes", None) or ",".join(MODES)).split(",") if m]
    bad = [m for m in modes if known is not None and m not in known]
    if bad:
        raise SystemExit(f"{args.row}: --modes {','.join(bad)}: not one of {', '.join(known)}")
    return modes


def each_mode(row: dict, fn, modes=MODES) -> dict:
    """row[mode] = fn(mode) for each mode (transparent and sdk by default); a mode that
    fails is recorded as such and the others still run."""
    for mode in modes:
        guarded(row, mode, lambda: fn(mode))
    return row


def guarded(row: dict, mode: str, fn) -> None:
    """row[mode] = fn(); a failure is recorded there instead and the row goes on."""
    try:
        row[mode] = fn()
    except Exception as e:  # noqa: BLE001 - the other modes' numbers stand
        row[mode] = {"error": f"{type(e).__name__}: {e}"}
        note(row=row["row"], mode=mode, error=row[mode]["error"])


def stop(pid: int) -> None:
    kill_tree(tree(pid))


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


# ---- the naive baseline (cold_start.py's naive_dump / naive_restore) ---------------------

NAIVE_SLACK = 2 << 30       # left free beside the naive images
NAIVE_RAM_MARGIN = 16 << 30  # RAM beside a tmpfs's images and the checkpointed host copy: the
                             # kernel, CUDA's pinned buffers, the benchmark's own processes
TP_NO_NAIVE = ("no naive baseline: a plain `criu dump` of the TP tree fails where gpusnap's "
               "does not: NCCL's deleted /dev/shm segment (33 MiB) is past CRIU's --ghost-limit, "
               "the ranks' TCP store needs a network lock the GPU machines lack (no iptables), "
               "and a restore moments later finds NCCL's listeners' ports in TIME_WAIT "
               "(EADDRINUSE): a baseline that handled these would be gpusnap's own restore")


def naive_bytes(row: str, weights: int) -> int:
    """About what a naive dump of the row's plain server writes (its host copy of device
    memory and its own memory; measured: an LLM's images are its weights and ~1 GB, a
    diffusion server's twice its weights, 10.9 GB for SDXL's 5.3). Pure."""
    return weights * (2 if row == "diffusion" else 1) + NAIVE_SLACK


def naive_seconds(images: int) -> float:
    """About how long one naive round trip of images bytes takes on the H200 machine: the
    driver's checkpoint 2.3 GB/s, CRIU's write 1.5 (a disk's; a tmpfs is faster), CRIU's
    restore 1.9, the driver's restore 6.0, and 10 s of the rest. Pure."""
    return 10.0 + images / 1e9 * (1 / 2.3 + 1 / 1.5 + 1 / 1.9 + 1 / 6.0)


def naive_place(images: int, ram: int, places: list[tuple[str, int, bool]]) -> dict:
    """Where the naive dump's images go: the first of places (directory, free bytes there,
    whether they are host memory: a tmpfs) that holds them with NAIVE_SLACK to spare; one
    in host memory only where RAM also holds the checkpointed process's host copy beside
    them (about as many bytes) and NAIVE_RAM_MARGIN. {dir, in_ram, images_bytes}, dir
    None and why where no place does. Pure."""
    why = []
    for where, free, in_ram in places:
        if free < images + NAIVE_SLACK:
            why.append(f"{where}: {free / 1e9:.1f} GB free")
        elif in_ram and ram < 2 * images + NAIVE_RAM_MARGIN:
            why.append(f"{where}: in RAM ({ram / 1e9:.0f} GB), beside the checkpointed process's "
                       f"host copy of about as much and {NAIVE_RAM_MARGIN >> 30} GiB")
        else:
            return {"dir": where, "in_ram": in_ram, "images_bytes": images}
    return {"dir": None, "images_bytes": images,
            "why": f"no room for {images / 1e9:.1f} GB of images (" + "; ".join(why) + ")"}


def naive_where(args, images: int, work_free: int | None = None) -> dict:
    """naive_place on this host: cold_start.py's /dev/shm directory, else WORK/naive-images.
    work_free: the bytes free under WORK when the naive dump runs (default: free now)."""
    import shutil

    import psutil

    from benchmarks.cold_start import NAIVE_IMAGES
    from gpusnap.engine.workdir import tmpfs_of
    places = []
    shm = os.path.dirname(NAIVE_IMAGES)
    if os.path.isdir(shm):
        places.append((NAIVE_IMAGES, shutil.disk_usage(shm).free, tmpfs_of(shm) is not None))
    os.makedirs(args.work, exist_ok=True)
    free = shutil.disk_usage(args.work).free if work_free is None else work_free
    places.append((os.path.join(args.work, "naive-images"), free, tmpfs_of(args.work) is not None))
    return naive_place(images, psutil.virtual_memory().total, places)


def with_naive(ctx: Ctx, row: dict, images: int, fn, lead_s: float = 0.0,
               work_free: int | None = None) -> None:
    """row["naive"] = fn(images dir) where --naive-runs asks for it, the images have a place
    (naive_where) and the budget room for lead_s (what fn does first, e.g. a cold start)
    and the round trips; else why not. Nothing where --no-naive."""
    runs = ctx.args.naive_runs
    if not runs:
        return
    took = lead_s + runs * naive_seconds(images)

    def run() -> dict:
        where = naive_where(ctx.args, images, work_free)
        if where["dir"] is None:
            note(row=row["row"], mode="naive", skipped=where["why"])
            return {"skipped": where["why"], **where}
        ctx.budget.room("the naive baseline", 1.25 * took)
        return {**where, "runs_asked": runs, "estimate_s": round(took), **fn(where["dir"])}
    guarded(row, "naive", run)


def naive_rounds(ctx: Ctx, srv: dict, probe, images: str, between=None) -> list[dict]:
    """--naive-runs round trips of cold_start.py's naive baseline on the running server srv
    (start_server's answer; pid: its root now): naive_dump into images, naive_restore
    (between(pid) while CUDA is still checkpointed), probe(port), its answer held to the
    cold start's (same_answer). The server is stopped and the images removed after."""
    import shutil

    from benchmarks.cold_start import naive_dump, naive_restore
    pid, runs = srv["pid"], []
    try:
        for i in range(ctx.args.naive_runs):
            ctx.budget.check(f"naive round trip {i}")
            (pids, cuda), t_dump = timed(naive_dump, pid, images, timeout=ctx.budget.left())
            if srv.get("proc") is not None and srv["proc"].pid == pid:
                srv["proc"].wait()          # our child: reap it, so its pid is free
            wait_gone(pids)
            size = sum(e.stat().st_size for e in os.scandir(images) if e.is_file())
            pid, answer, stages = naive_restore(images, cuda, lambda: probe(srv["port"]), between,
                                                timeout=ctx.budget.left())
            runs.append({"dump_s": t_dump, "bytes_logical": size, "same_answer": answer == srv["tokens"],
                         **stages})
            note(row=ctx.args.row, mode="naive", **runs[-1])
    finally:
        stop(pid)
        shutil.rmtree(images, ignore_errors=True)
    return runs


# ---- (a) switching one GPU between two servers ------------------------------------------

def row_switch(ctx: Ctx) -> dict:
    """Two servers share one GPU; a switch is: suspend the running one, resume the parked
    one, its first token. Transparent and SDK; the driver's floor by hand (lock +
    checkpoint of one, restore + unlock of the other) on the transparent pair."""
    return llm_row(ctx, "switch", _switch_mode)


def llm_row(ctx: Ctx, name: str, mode_fn) -> dict:
    """A row over one LLM size: the model made once, mode_fn(ctx, model, sdk) per mode."""
    model = llm_model(ctx, ctx.args.size)
    row = {"row": name, "size": ctx.args.size, "weights_bytes": _weights(model), "runs": ctx.args.runs}
    modes = asked_modes(ctx.args)

    def one(mode: str):
        reader = READER_MODES.get(mode)
        if reader is None:
            return mode_fn(ctx, model, mode == "sdk")
        with env_set("GPUSNAP_SDK_READER", reader):      # the servers it starts inherit it
            return mode_fn(ctx, model, True, mode)
    return each_mode(row, one, modes)


def _switch_ways(ctx: Ctx) -> list[tuple[str, dict, str]]:
    """(via, env, how) of each way a switch is made: how is "pair" (`suspend A` then
    `resume B`, two commands), "switch" (`gpusnap switch A B`: B's resume overlaps A's
    suspend where B fits beside A) or "sequential" (`switch --sequential`). With --daemon
    every way goes through gpusnapd (the plain CLI's pair is the earlier rows': +2.5 s);
    with --api too, the pair and the switch also go to the daemon's API from this process
    (via "api": no interpreter started per command, as a controller does)."""
    doors = ctx.doors_and_api()
    via, env = [d for d in doors if d[0] != "api"][-1]
    return [(via, env, how) for how in ("pair", "switch", "sequential")] + \
        [(door, e, how) for door, e in doors if door == "api" for how in ("pair", "switch")]


def _answered_via(via: str) -> str:
    """The "via" a command's answer says for a door: the api door's runs in gpusnapd."""
    return "daemon" if via == "api" else via


def _switch_once(ctx: Ctx, how: str, env: dict, running: dict, parked: dict,
                 via: str = "cli") -> tuple[dict, dict]:
    """One switch from running to parked, made how; (the runs' record, the resume's answer)."""
    def gs(*a, env=None):
        return ctx.run(via, *a, env=env)
    if how == "pair":
        out, t_out = timed(gs, "suspend", str(running["pid"]), env=env)
        res, t_in = timed(gs, "resume", str(parked["pid"]), env=env)
        return {"suspend_s": t_out, "resume_s": t_in, "command_s": t_out + t_in,
                **_prefixed("suspend_", out["timings"])}, res
    extra = ["--sequential"] if how == "sequential" else []
    both, t = timed(gs, "switch", str(running["pid"]), str(parked["pid"]), *extra, env=env)
    res = dict(both["in"], via=both.get("via"))
    return {"suspend_s": both["timings"]["suspend"], "resume_s": both["timings"]["resume"],
            "command_s": t, "plan_s": both["timings"].get("plan"), "overlapped": both["overlapped"],
            "reason": both["reason"],
            **_prefixed("suspend_", both["out"]["timings"])}, res


def _sdk_reply(res: dict) -> dict:
    """A resume's SDK agents' own times (the slowest agent's; None without agents), as
    resume_sdk_*: where the weight read's stage goes (allocation, the read, the check)."""
    sdk = res.get("sdk") or {}
    return {f"resume_sdk_{k}": sdk.get(k)
            for k in ("alloc_seconds", "read_seconds", "verify_seconds", "seconds")}


def _prefixed(prefix: str, timings: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in timings.items()}


def _switch_mode(ctx: Ctx, model: str, sdk: bool, mode: str | None = None) -> dict:
    mode = mode or ("sdk" if sdk else "transparent")
    servers = []
    try:
        for name, port in (("A", 18201), ("B", 18202)):
            servers.append(start_llm(ctx, model, f"switch-{mode}-{name}", port, sdk))
        out = {"cold_s": [s["cold_s"] for s in servers]}
        ctx.gs("suspend", str(servers[1]["pid"]))
        runs, running, parked = [], servers[0], servers[1]
        ways = _switch_ways(ctx)
        for i in range(2 * ctx.args.runs * len(ways)):
            via, env, how = ways[i % len(ways)]
            ctx.budget.check(f"{mode} switch {i}")
            rec, res = _switch_once(ctx, how, env, running, parked, via)
            tokens, t_tok = timed(first_token, parked["port"])
            assert tokens == parked["tokens"], (tokens, parked["tokens"])
            assert res.get("via", via) == _answered_via(via), res
            runs.append({"via": via, "how": how, "way": f"{via}, {how}", **rec, "first_token_s": t_tok,
                         "total": rec["command_s"] + t_tok, **_sdk_reply(res),
                         **_prefixed("resume_", res["timings"])})
            note(row="switch", mode=mode, **runs[-1])
            running, parked = parked, running
        out["switches"] = runs
        if not sdk:     # an even number of switches each: running and parked as they were
            out["floor"] = _driver_floor(ctx, running, parked)
            out["floor_overlapped"] = _driver_floor(ctx, running, parked, overlapped=True)
            if not getattr(ctx.args, "no_floor_thp", False):
                out["floor_thp"] = _driver_floor(ctx, running, parked, huge_pages=True)
        return out
    finally:
        for s in servers:
            stop(s["pid"])


def _driver_floor(ctx: Ctx, running: dict, parked: dict, huge_pages: bool = False,
                  overlapped: bool = False) -> list[dict]:
    """The same switch through the driver API alone, in this process: lock + checkpoint
    the running server, restore + unlock the parked one (gpusnap parked it: its CUDA
    state is checkpointed), first token. No CLI, no state records. huge_pages: the
    checkpoint inside gpusnap's huge-page window (cuda/hugepages.py), as gpusnap's own
    suspend does; else the host's THP mode as it is (the floor the issue names).
    overlapped: the parked one's restore + unlock on a thread while the running one is
    locked and checkpointed (what `gpusnap switch` does where both fit)."""
    import threading

    from gpusnap.cuda.session import CudaSession
    out = []
    for i in range(2 * ctx.args.runs):
        ctx.budget.check(f"driver floor {i}")
        s_out = CudaSession([running["pid"]], huge_pages=huge_pages)
        s_in = CudaSession([parked["pid"]])
        t = {}

        def bring_in():
            _, t["restore_s"] = timed(s_in.restore_all, None)
            _, t["unlock_s"] = timed(s_in.unlock_all)
        began = time.perf_counter()
        worker = threading.Thread(target=bring_in) if overlapped else None
        if worker:
            worker.start()
        _, t["lock_s"] = timed(s_out.lock_all, 10_000)
        _, t["checkpoint_s"] = timed(s_out.checkpoint_all)
        if worker:
            worker.join()
        else:
            bring_in()
        driver_s = time.perf_counter() - began
        tokens, t_tok = timed(first_token, parked["port"])
        assert tokens == parked["tokens"]
        out.append({**t, "driver_s": driver_s, "first_token_s": t_tok, "total": driver_s + t_tok})
        note(row="switch", mode="driver_floor" + ("_overlapped" if overlapped else "")
             + ("_thp" if huge_pages else ""), **out[-1])
        running, parked = parked, running
    return out


def _weights(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))


# ---- (b) standby -------------------------------------------------------------------------

def row_standby(ctx: Ctx) -> dict:
    """restore --standby (CRIU restore, CUDA left checkpointed: no GPU memory), the host
    memory it holds, then resume to the first token; transparent and SDK; then the naive
    baseline of the plain server (_standby_naive)."""
    row = llm_row(ctx, "standby", _standby_mode)
    model = llm_model(ctx, ctx.args.size)
    with_naive(ctx, row, naive_bytes("standby", row["weights_bytes"]),
               lambda images: _standby_naive(ctx, model, images), lead_s=_cold(row))
    return row


def _cold(row: dict) -> float:
    """The transparent mode's cold start (a naive server's start costs about as much), 60 s
    where it has none."""
    cold = (row.get("transparent") or {}).get("cold_s")
    return float(cold) if isinstance(cold, (int, float)) else 60.0


def _standby_naive(ctx: Ctx, model: str, images: str) -> dict:
    """The plain server's naive round trips, shaped as the standby runs: its `criu restore`
    leaves CUDA checkpointed (what restore --standby does; host and GPU memory are measured
    then), the driver's restore + unlock by hand is its resume; restore_total: the whole
    naive restore to first token."""
    from gpusnap.targets.process import tree_rss
    srv = start_llm(ctx, model, "standby-naive", 18206)

    def held(pid: int) -> dict:
        return {"host_memory": tree_rss(tree(pid)), "gpu_memory_while_standby": _gpu_use(pid)}
    runs = naive_rounds(ctx, srv, first_token, images, held)
    return {"cold_s": srv["cold_s"], "runs": [
        dict(r, standby_restore_s=r["criu_restore"], resume_s=r["cuda_restore+unlock"],
             first_token_s=r["first_token"], restore_total=r["total"],
             total=r["cuda_restore+unlock"] + r["first_token"]) for r in runs]}


def _standby_mode(ctx: Ctx, model: str, sdk: bool, mode: str | None = None) -> dict:
    mode = mode or ("sdk" if sdk else "transparent")
    srv = start_llm(ctx, model, f"standby-{mode}", 18203, sdk)
    snap, t_dump = timed(ctx.gs, "dump", "--pid", str(srv["pid"]), "--name", f"standby-{mode}")
    srv["proc"].wait()
    wait_gone([srv["pid"]])
    out = {"cold_s": srv["cold_s"], "dump_s": t_dump, "bytes_logical": snap["bytes_logical"], "runs": []}
    doors = ctx.doors_and_api()
    for i in range(ctx.args.runs * len(doors)):
        via, env = doors[i % len(doors)]
        ctx.budget.check(f"{mode} standby {i}")
        res, t_standby = timed(ctx.gs, "restore", snap["id"], "--standby")
        pid = res["pid"]
        try:
            held = {e["pid"]: e for e in ctx.gs("ps")}.get(pid, {})
            gpu = _gpu_use(pid)
            r2, t_resume = timed(ctx.run, via, "resume", str(pid), env=env)
            tokens, t_tok = timed(first_token, srv["port"])
            assert tokens == srv["tokens"], (tokens, srv["tokens"])
            assert r2.get("via", via) == _answered_via(via), r2
        finally:
            stop(pid)
        wait_gone([pid])
        out["runs"].append({"via": via, "standby_restore_s": t_standby,
                            "host_memory": (res.get("standby") or {}).get("host_memory"),
                            "host_memory_ps": held.get("host_memory"),
                            "gpu_memory_while_standby": gpu, "resume_s": t_resume,
                            "first_token_s": t_tok, "total": t_resume + t_tok, **_sdk_reply(r2),
                            **_prefixed("resume_", r2["timings"])})
        note(row="standby", mode=mode, **out["runs"][-1])
    ctx.gs("rm", snap["id"])
    return out


def _gpu_use(pid: int) -> int:
    from gpusnap.cuda import host_gpus
    return sum(host_gpus().used_memory([pid]).values())


# ---- (c) tensor-parallel servers (tests/workloads/tp_server.py) ------------------------------

def row_tp(ctx: Ctx) -> dict:
    """A TP=N server: cold start to first token; transparent (NCCL off CUDA IPC, as the
    driver's checkpoint needs) and SDK (NCCL defaults, communicators torn down and rebuilt)
    dump -> restore -> first token, the same tokens, then restore onto the GPUs in reverse
    order. --world 2 on the two-GPU machine is the rehearsal of TP=4/8 (the 120B row)."""
    from tests.workloads.tp_server import shard_bytes
    a = ctx.args
    row = {"row": "tp", "size": a.size, "world": a.world, "runs": a.runs,
           "weights_bytes": a.world * shard_bytes(a.size, a.world)}
    model = os.path.join(ctx.work, "models", f"tp-{a.size}-{a.world}{'-cpu' if a.cpu else ''}")
    each_mode(row, lambda mode: _tp_mode(ctx, model, mode), asked_modes(a, MODES))
    return row


def _tp_mode(ctx: Ctx, model: str, mode: str) -> dict:
    from tests.workloads.tp_server import TpServer
    a = ctx.args
    srv = TpServer(model, os.path.join(ctx.work, "servers", f"tp-{mode}"), a.world, 18210,
                   sdk=mode == "sdk", cpu=a.cpu, nccl_safe=mode == "transparent")
    ctx.budget.check(f"tp {mode}: make")
    _, t_make = timed(srv.make, a.size, ctx.budget.left())
    out = {"make_s": t_make, "cold_s": [], "restore": []}
    try:
        for i in range(a.runs):
            ctx.budget.check(f"tp {mode}: cold start {i}")
            srv.stop()
            t0 = time.perf_counter()
            srv.start(timeout=ctx.budget.left())
            STARTED.append(srv.pid)
            srv.generate(1)
            out["cold_s"].append(time.perf_counter() - t0)
        want = srv.generate(4)
        orders = [None] + ([] if a.cpu else [",".join(str(i) for i in reversed(range(a.world)))])
        for run in range(a.runs):
            for order in orders:
                ctx.budget.check(f"tp {mode}: restore {run} {order or 'same GPUs'}")
                out["restore"].append(_tp_round_trip(ctx, srv, order, want))
                note(row="tp", mode=mode, **out["restore"][-1])
        out["tokens_same"] = True
        return out
    finally:
        srv.stop()


def _tp_round_trip(ctx: Ctx, srv, order: str | None, want: list[int]) -> dict:
    snap, t_dump = timed(ctx.gs, "dump", "--pid", str(srv.pid))
    srv.reap()
    wait_gone([srv.pid, *srv.ranks])
    t0 = time.perf_counter()
    res = ctx.gs("restore", snap["id"], *(["--gpu", order] if order else []))
    t1 = time.perf_counter()
    srv.generate(1)
    t2 = time.perf_counter()
    got = srv.generate(4)
    assert got == want, (got, want, order)
    ctx.gs("rm", snap["id"])
    return {"gpus": order or "same", "dump_s": t_dump, "bytes_logical": snap["bytes_logical"],
            "bytes_out_of_image": (snap.get("sdk") or {}).get("bytes_out_of_image"),
            "restore_cli_s": t1 - t0, "first_token_s": t2 - t1, "total": t2 - t0,
            **{f"restore_{k}": v for k, v in res["timings"].items()},
            **{f"dump_{k}": v for k, v in snap["timings"].items()}}


# ---- (d) a 30B-class server on one GPU ------------------------------------------------------

def b30_needs(size: str, mode: str = "transparent", compress: str = "fast") -> dict:
    """Bytes the row needs: disk for the weights file and the store (transparent: the
    weights again; random normal bf16 in 64 MiB: zstd -1, the store's default, keeps 100%
    of it, level 1 78%, measured on the CPU; sdk: the image without its weights), RAM for
    the process's host copy of its GPU memory while checkpointed (pages stream from CRIU
    into the store: no images in a tmpfs; the SDK drops the weights first). compress:
    GPUSNAP_COMPRESS's value (fast, none, or a level). Pure."""
    from tests.workloads.tp_server import shard_bytes
    w = shard_bytes(size, 1)
    if mode == "sdk":
        return {"weights": w, "disk": w + (4 << 30), "ram": 16 << 30}
    store = w if compress in ("fast", "none") or compress.startswith("-") else int(w * 0.8)
    return {"weights": w, "store": store, "disk": w + store + (4 << 30), "ram": w + (8 << 30)}


def b30_disk_plan(need: dict, free: int, model_there: bool) -> bool | None:
    """Whether the row must drop the weights file once the server has loaded it (so one
    disk holds the store where it could not hold both: the one-GPU machine's 64 GiB), or
    None where even that does not fit. Pure."""
    have = free + (need["weights"] if model_there else 0)      # the file is counted in need
    if have >= need["disk"]:
        return False
    if "store" in need and have >= need["weights"] + (4 << 30) and \
            have >= need["store"] + (4 << 30):
        return True
    return None


def b30_disk(args) -> tuple[dict, int, bool | None]:
    """(need, free bytes under --work, b30_disk_plan's answer) for this b30 run: a store
    on another filesystem (--store) leaves the disk the weights file and some slack."""
    import shutil
    need = b30_needs(args.size, args.mode, os.environ.get("GPUSNAP_COMPRESS", "fast"))
    os.makedirs(args.work, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    model_there = os.path.exists(os.path.join(args.work, "models", args.size, "model.safetensors"))
    if os.stat(args.work).st_dev != os.stat(os.path.dirname(store_path(args)) or ".").st_dev:
        need = dict(need, disk=need["weights"] + (2 << 30))     # the store lives elsewhere
        need.pop("store", None)
    return need, free, b30_disk_plan(need, free, model_there)


def row_b30(ctx: Ctx) -> dict:
    """One H200, a ~60 GB bf16 server: cold start, then --mode transparent (weights in the
    image) or sdk (weights read back from their file) dump -> restore -> first token.
    Transparent on a disk too small for the weights file and the store together: the
    file is removed once the server has loaded it (the next run makes it again). Then,
    transparent only, the naive baseline on the restored server, once the store is gone:
    its ~62 GB of images where naive_place finds room (on the one-GPU machine the disk:
    RAM does not hold them beside the checkpointed process's host copy)."""
    import shutil
    a = ctx.args
    need, free, drop = b30_disk(a)
    if drop is None:
        raise SystemExit(f"b30: {free / 1e9:.0f} GB free under {ctx.work}, the row needs "
                         f"{need['disk'] / 1e9:.0f} GB (weights {need['weights'] / 1e9:.0f} GB and a store of "
                         f"about as much): remove older models/stores there, use the two-GPU "
                         f"machine (128 GiB disk), or GPUSNAP_COMPRESS=1 (a fifth smaller store)")
    model = llm_model(ctx, a.size)
    row = {"row": "b30", "size": a.size, "mode": a.mode, "weights_bytes": _weights(model), "needs": need}
    srv = start_llm(ctx, model, f"b30-{a.mode}", 18204, a.mode == "sdk")
    row["cold_s"], row["load_s"] = srv["cold_s"], srv["info"].get("load_s")
    note(row="b30", step="cold", cold_s=srv["cold_s"])
    if drop:
        os.unlink(os.path.join(model, "model.safetensors"))
        row["weights_file_dropped"] = True
        note(row="b30", step="weights file removed after the cold start: the store needs its room")
    try:
        ctx.budget.check("b30 dump")
        snap, row["dump_s"] = timed(ctx.gs, "dump", "--pid", str(srv["pid"]), "--name", f"b30-{a.mode}")
        srv["proc"].wait()
        wait_gone([srv["pid"]])
        row.update(bytes_logical=snap["bytes_logical"], bytes_stored=snap["bytes_stored"],
                   dump_stages=snap["timings"],
                   bytes_out_of_image=(snap.get("sdk") or {}).get("bytes_out_of_image"))
        note(row="b30", step="dump", dump_s=row["dump_s"], **snap["timings"])
        res = _b30_restores(ctx, row, snap["id"], srv)
        if a.mode == "transparent":
            shutil.rmtree(ctx.store, ignore_errors=True)    # the naive images may need its room
            with_naive(ctx, row, snap["bytes_logical"] + NAIVE_SLACK, lambda images: {
                "runs": naive_rounds(ctx, dict(srv, pid=res["pid"]), first_token, images)})
        stop(res["pid"])
    finally:
        stop(srv["pid"])
        shutil.rmtree(ctx.store, ignore_errors=True)     # 50+ GB: give the disk back
    return row


def _b30_restores(ctx: Ctx, row: dict, snap_id: str, srv: dict) -> dict:
    """The snapshot restored to the first token once through each front door (the CLI;
    with --daemon gpusnapd's CLI, with --api its API), each restored server stopped before
    the next; with --warm its images prepared first (`gpusnap warm`, through the last
    door). row["restore"]: the first door's run (the CLI's), row["restores"]: all. Returns
    the last restore's answer (its server left running)."""
    doors = ctx.doors_and_api()
    if ctx.args.warm:
        ctx.budget.check("b30 warm")
        _, row["warm_s"] = timed(ctx.run, doors[-1][0], "warm", snap_id, env=doors[-1][1])
    row["restores"] = []
    for i, (via, env) in enumerate(doors):
        if i:
            stop(res["pid"])
            wait_gone([res["pid"]])
        ctx.budget.check(f"b30 restore ({via})")
        res, t_restore = timed(ctx.run, via, "restore", snap_id, env=env)
        tokens, t_tok = timed(first_token, srv["port"])
        assert tokens == srv["tokens"], (tokens, srv["tokens"])
        row["restores"].append({"via": via, "restore_cli_s": t_restore, "first_token_s": t_tok,
                                "total": t_restore + t_tok, **res["timings"], "sdk": res.get("sdk")})
        note(row="b30", step="restore", **{k: v for k, v in row["restores"][-1].items() if k != "sdk"})
    row["restore"] = row["restores"][0]
    return res


# ---- (e) a diffusion pipeline (tests/workloads/diffusion_server.py) --------------------------

def first_image(port: int) -> str:
    return http(port, "/generate", {"steps": 4, "seed": 1})["sha256"]


def diffusion_bytes(size: str) -> int:
    """bf16 bytes of a diffusion size's UNet + VAE; an unknown size is refused. Pure."""
    from tests.workloads.diffusion_server import WEIGHTS_BYTES
    if size not in WEIGHTS_BYTES:
        raise SystemExit(f"diffusion: no size {size!r} (sizes: {', '.join(WEIGHTS_BYTES)})")
    return WEIGHTS_BYTES[size]


def row_diffusion(ctx: Ctx) -> dict:
    """An SDXL-shaped UNet + VAE (--size), random weights: cold start to the first image
    (4 steps), gpusnap transparent and SDK (the UNet's weights out of the image)
    dump -> restore -> the same image."""
    import shutil
    a = ctx.args
    diffusion_bytes(a.size)
    model = os.path.join(ctx.work, "models", f"diffusion-{a.size}{'-cpu' if a.cpu else ''}")
    device = ["--device", "cpu"] if a.cpu else []
    if not os.path.exists(os.path.join(model, "size.json")):
        ctx.budget.check("making the diffusion model")
        r = sh([sys.executable, "-m", "tests.workloads.diffusion_server", "make", "--size", a.size,
                "--out", model, *device], cwd=REPO, timeout=ctx.budget.left())
        if r.returncode:
            raise RuntimeError(f"making the diffusion model: {r.stderr[-2000:]}")
    row = {"row": "diffusion", "size": a.size, "runs": a.runs,
           "weights_bytes": sum(_weights(os.path.join(model, d)) for d in ("unet", "vae"))}
    module = "tests.workloads.diffusion_server"
    each_mode(row, lambda mode: _single_server_round_trips(
        ctx, module, model, f"diffusion-{mode}", 18205, mode == "sdk", first_image, device))
    shutil.rmtree(ctx.store, ignore_errors=True)
    with_naive(ctx, row, naive_bytes("diffusion", row["weights_bytes"]), lambda images: _single_server_naive(
        ctx, module, model, "diffusion-naive", 18207, first_image, images, device), lead_s=_cold(row))
    return row


def _single_server_naive(ctx: Ctx, module: str, model: str, name: str, port: int, probe,
                         images: str, extra=()) -> dict:
    """The plain server's cold start and naive round trips (naive_rounds), shaped as
    _single_server_round_trips' answer."""
    srv = start_server(ctx, module, model, name, port, False, probe, extra)
    deterministic = probe(port) == srv["tokens"]
    return {"cold_s": srv["cold_s"], "deterministic": deterministic,
            "restore": naive_rounds(ctx, srv, probe, images)}


def _single_server_round_trips(ctx: Ctx, module: str, model: str, name: str, port: int,
                               sdk: bool, probe, extra=()) -> dict:
    """Cold start to the first answer, then --runs of dump -> restore -> the same answer
    (asserted where the server gives the same answer twice before any dump: otherwise the
    server's own nondeterminism, recorded, does not cost the row its numbers)."""
    srv = start_server(ctx, module, model, name, port, sdk, probe, extra)
    deterministic = probe(port) == srv["tokens"]
    out = {"cold_s": srv["cold_s"], "load_s": srv["info"].get("load_s"),
           "accelerate": srv["info"].get("accelerate"), "deterministic": deterministic, "restore": []}
    pid = srv["pid"]
    try:
        for i in range(ctx.args.runs):
            ctx.budget.check(f"{name} round trip {i}")
            snap, t_dump = timed(ctx.gs, "dump", "--pid", str(pid))
            if pid == srv["pid"]:
                srv["proc"].wait()          # our child: reap it, so its pid is free
            wait_gone([pid])
            res, t_restore = timed(ctx.gs, "restore", snap["id"])
            pid = res["pid"]
            answer, t_probe = timed(probe, port)
            assert answer == srv["tokens"] or not deterministic, (answer, srv["tokens"])
            out["restore"].append({"dump_s": t_dump, "same_answer": answer == srv["tokens"],
                                   "bytes_logical": snap["bytes_logical"],
                                   "bytes_out_of_image": (snap.get("sdk") or {}).get("bytes_out_of_image"),
                                   "restore_cli_s": t_restore, "first_answer_s": t_probe,
                                   "total": t_restore + t_probe, **res["timings"]})
            note(row=name, **out["restore"][-1])
            ctx.gs("rm", snap["id"])
    finally:
        stop(pid)
    return out


# ---- 120B-class on paper -----------------------------------------------------------------------

def estimate_120b(measured: dict, size: str = "120b", world: int = 8) -> dict:
    """What a TP=world 120B-class server (random bf16, tests/workloads/tp_server.py's
    shape) would take, from the GB/s measured on a smaller TP row: the restore and the
    SDK's read-back scale with the bytes per GPU (every rank restores in parallel, each
    GPU its own share); CRIU's part and the first token are taken as measured.
    measured: {"restore_gbps_per_gpu", "sdk_gbps_per_gpu", "fixed_s", "cold_gbps_per_gpu"}
    (from row_tp's numbers: bytes per GPU / seconds). Pure."""
    from tests.workloads.tp_server import shard_bytes
    per_gpu = shard_bytes(size, world)
    out = {"size": size, "world": world, "bytes_per_gpu": per_gpu, "bytes": per_gpu * world}
    for key in ("restore", "sdk", "cold"):
        gbps = measured.get(f"{key}_gbps_per_gpu")
        if gbps:
            out[f"{key}_s"] = round(per_gpu / 1e9 / gbps + measured.get("fixed_s", 0.0), 2)
    return out


def measured_rates(tp_row: dict) -> dict:
    """GB/s per GPU of a row_tp result: transparent restore, SDK restore, cold start."""
    per_gpu = tp_row["weights_bytes"] / tp_row["world"] / 1e9
    rates = {}
    for key, mode in (("restore", "transparent"), ("sdk", "sdk")):
        runs = [r for r in (tp_row.get(mode) or {}).get("restore", []) if r.get("gpus") == "same"]
        if runs:
            rates[f"{key}_gbps_per_gpu"] = per_gpu / med([r["total"] for r in runs])
    cold = (tp_row.get("transparent") or {}).get("cold_s")
    if cold:
        rates["cold_gbps_per_gpu"] = per_gpu / med(cold)
    return rates


# ---- tables ---------------------------------------------------------------------------------

def _m(runs: list[dict], key: str):
    xs = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return med(xs)


def _f(x, digits: int = 2, scale: float = 1.0) -> str:
    return "" if x is None else f"{x / scale:.{digits}f}"


def table(headers: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(line) + " |" for line in lines]


def summarise(row: dict, card_name: str) -> str:
    kind = row["row"]
    head = [f"# {kind} — {card_name}", "",
            f"size {row.get('size')}, weights {_f(row.get('weights_bytes'), 2, 1e9)} GB"
            + (f", TP={row['world']}" if row.get("world") else "") + ". Medians of each mode's runs (s).", ""]
    body = SUMMARIES[kind](row)
    return "\n".join(head + body) + "\n"


def _by_via(runs: list[dict]) -> dict[str, list[dict]]:
    """A mode's runs by front door (a run's "via": cli, daemon; cli where none is said), or
    by its "way" where it has one (switch: the door and how the switch was made)."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r.get("way") or r.get("via", "cli"), []).append(r)
    return dict(sorted(out.items()))


def _modes(row: dict, fn, runs: str | None = None) -> list[list[str]]:
    """A line per mode; with runs (the key of its list of runs), a line per mode and
    front door (a run's "via": cli, daemon) where the runs went through more than one."""
    lines = []
    for mode in ("transparent", "sdk", *READER_MODES, "naive"):
        x = row.get(mode)
        if x is None:
            continue
        if "error" in x or "skipped" in x:
            lines.append([mode, f"failed: {x['error'][:300]}" if "error" in x else f"skipped: {x['skipped']}"])
            continue
        doors = _by_via(x[runs]) if runs else {}
        if len(doors) < 2:
            lines.append([mode, *fn(x)])
            continue
        for via, part in doors.items():
            lines.append([f"{mode} ({via})", *fn({**x, runs: part})])
    return lines


def _naive(row: dict, headline) -> float | None:
    """headline(row["naive"]): the naive baseline's time for the table's first column,
    None where the row has no naive numbers."""
    x = row.get("naive")
    if not x or "error" in x or "skipped" in x:
        return None
    return headline(x)


def _x_naive(naive: float | None, t: float | None) -> list[str]:
    """The "x naive" cell (naive / the mode's time): none where the row has no naive."""
    if naive is None:
        return []
    return [f"{naive / t:.2f}" if t else ""]


def _naive_note(row: dict) -> list[str]:
    """What the naive line is, where its images went, how many runs."""
    x = row.get("naive")
    if not x or "error" in x:
        return []
    if "skipped" in x:
        return ["", f"Naive baseline skipped: {x['skipped']}."]
    runs = x.get("runs") or x.get("restore") or []
    where = (f"`criu dump` into {x['dir']} ({'host memory' if x.get('in_ram') else 'disk'})"
             if x.get("dir") else "`criu dump`")
    return ["", f"naive: cold_start.py's baseline on the plain server, {len(runs)} run(s)"
            + (f" (the other modes: {row['runs']} each)" if row.get("runs") else "")
            + f": the driver's lock + checkpoint by hand, {where}, `criu restore`, the driver's "
            "restore + unlock by hand, the first answer. x naive: naive / the mode's time."
            + (" A naive restore answered otherwise than before its dump."
               if any(r.get("same_answer") is False for r in runs) else "")]


def _sum_switch(row: dict) -> list[str]:
    out = table(["mode", "switch to first token", "suspend", "resume", "first token", "cold start (A, B)"],
                _modes(row, lambda x: [_f(_m(x["switches"], "total")), _f(_m(x["switches"], "suspend_s")),
                                       _f(_m(x["switches"], "resume_s")), _f(_m(x["switches"], "first_token_s")),
                                       ", ".join(_f(c) for c in x["cold_s"])], "switches"))
    floors = row.get("transparent") or {}
    floor, thp, both = floors.get("floor"), floors.get("floor_thp"), floors.get("floor_overlapped")
    if floor:
        out += ["", f"Driver floor (same run, by hand: lock {_f(_m(floor, 'lock_s'))} + checkpoint "
                f"{_f(_m(floor, 'checkpoint_s'))} of the running server, restore {_f(_m(floor, 'restore_s'))} "
                f"+ unlock {_f(_m(floor, 'unlock_s'))} of the parked one = {_f(_m(floor, 'driver_s'))} s; "
                f"to its first token {_f(_m(floor, 'total'))} s). Transparent gpusnap is "
                f"{_gap(row, floor)} from it."]
    if both:
        out += ["", f"The driver's floor overlapped by hand (restore + unlock of the parked one on a "
                f"thread while the running one is locked and checkpointed, as `gpusnap switch` does "
                f"where both fit): {_f(_m(both, 'driver_s'))} s, to first token {_f(_m(both, 'total'))} s; "
                f"transparent gpusnap is {_gap(row, both)} from that."]
    if thp:
        out += ["", f"The same by hand with gpusnap's huge-page window around the checkpoint "
                f"(cuda/hugepages.py, as gpusnap's suspend has it): checkpoint {_f(_m(thp, 'checkpoint_s'))} "
                f"+ restore {_f(_m(thp, 'restore_s'))}, to first token {_f(_m(thp, 'total'))} s; "
                f"transparent gpusnap is {_gap(row, thp)} from that."]
    return out


def _gap(row: dict, floor: list[dict]) -> str:
    """The transparent switches' median total less floor's, per front door ("+0.38 s (cli),
    +0.08 s (daemon)"; no door named where there is one)."""
    doors = _by_via(row["transparent"]["switches"])
    return ", ".join(f"{_m(part, 'total') - _m(floor, 'total'):+.2f} s"
                     + (f" ({via})" if len(doors) > 1 else "") for via, part in doors.items())


def _sum_standby(row: dict) -> list[str]:
    naive = _naive(row, lambda x: _m(x["runs"], "total"))
    out = table(["mode", "resume to first token", *(["x naive"] if naive is not None else []), "resume",
                 "first token", "restore --standby", "host memory GB", "GPU memory while standby GB",
                 "cold start"],
                _modes(row, lambda x: [_f(_m(x["runs"], "total")), *_x_naive(naive, _m(x["runs"], "total")),
                                       _f(_m(x["runs"], "resume_s")), _f(_m(x["runs"], "first_token_s")),
                                       _f(_m(x["runs"], "standby_restore_s")),
                                       _f(_m(x["runs"], "host_memory"), 2, 1e9),
                                       _f(_m(x["runs"], "gpu_memory_while_standby"), 2, 1e9),
                                       _f(x["cold_s"])], "runs"))
    out += _naive_note(row)
    if naive is not None:
        out[-1] += (" Its restore --standby is `criu restore` (CUDA left checkpointed), its resume "
                    "the driver's restore + unlock; the whole naive restore to first token: "
                    f"{_f(_m(row['naive']['runs'], 'restore_total'))} s.")
    return out


def _sum_tp(row: dict) -> list[str]:
    def cells(x):
        same = [r for r in x["restore"] if r["gpus"] == "same"]
        moved = [r for r in x["restore"] if r["gpus"] != "same"]
        return [_f(med(x["cold_s"])), _f(_m(same, "total")), _f(_m(moved, "total")),
                _f(_m(same, "dump_s")), _f(_m(same, "bytes_logical"), 2, 1e9),
                _f(_m(same, "bytes_out_of_image"), 2, 1e9)]
    return table(["mode", "cold start to first token", "restore to first token",
                  "restore, GPUs reversed", "dump", "images GB", "weights out of image GB"],
                 _modes(row, cells)) + ["", f"TP={row['world']}: {TP_NO_NAIVE}."]


def _sum_b30(row: dict) -> list[str]:
    r = row.get("restore") or {}
    naive = _naive(row, lambda x: _m(x["runs"], "total"))
    warmed = ", images warmed" if "warm_s" in row else ""
    lines = [[row["mode"] + (f" ({r.get('via', 'cli')}{warmed})" if warmed else ""),
              _f(row.get("cold_s")), _f(row.get("dump_s")),
              _f(row.get("bytes_logical"), 2, 1e9), _f(row.get("bytes_stored"), 2, 1e9),
              _f(r.get("total")), *_x_naive(naive, r.get("total")),
              ", ".join(f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float) and k != "total")]]
    for d in row.get("restores", [])[1:]:
        lines.append([f"{row['mode']} ({d['via']}{warmed})",
                      "", "", "", "", _f(d.get("total")), *_x_naive(naive, d.get("total")),
                      ", ".join(f"{k} {v:.2f}" for k, v in d.items() if isinstance(v, float) and k != "total")])
    x = row.get("naive")
    if naive is not None:
        runs = x["runs"]
        lines.append(["naive", "", _f(_m(runs, "dump_s")), _f(_m(runs, "bytes_logical"), 2, 1e9), "",
                      _f(naive), "1.00", ", ".join(f"{k} {_m(runs, k):.2f}" for k in
                                                   ("criu_restore", "cuda_restore+unlock", "first_token"))])
    elif x and "error" in x:
        lines.append(["naive", f"failed: {x['error'][:300]}"])
    return table(["mode", "cold start", "dump", "images GB", "stored GB", "restore to first token",
                  *(["x naive"] if naive is not None else []), "restore stages"], lines) + _naive_note(row)


def _sum_diffusion(row: dict) -> list[str]:
    naive = _naive(row, lambda x: _m(x["restore"], "total"))

    def same(x):
        runs = x["restore"]
        if not runs:
            return ""
        ok = all(r.get("same_answer", True) for r in runs)
        return "yes" if ok else "no" + ("" if x.get("deterministic", True) else
                                        " (nor twice before the dump)")
    return table(["mode", "cold start to first image", "restore to first image",
                  *(["x naive"] if naive is not None else []), "dump", "images GB", "weights out of image GB",
                  "same image"],
                 _modes(row, lambda x: [_f(x["cold_s"]), _f(_m(x["restore"], "total")),
                                        *_x_naive(naive, _m(x["restore"], "total")),
                                        _f(_m(x["restore"], "dump_s")),
                                        _f(_m(x["restore"], "bytes_logical"), 2, 1e9),
                                        _f(_m(x["restore"], "bytes_out_of_image"), 2, 1e9),
                                        same(x)])) + _naive_note(row)


def _sum_estimate(row: dict) -> list[str]:
    e = row["estimate"]
    return [f"On paper: a {e['size']} server, TP={e['world']}, {e['bytes'] / 1e9:.0f} GB of bf16 "
            f"weights, {e['bytes_per_gpu'] / 1e9:.1f} GB per GPU, from the GB/s per GPU measured "
            f"in {row['source']} (TP={row['measured_world']}):", "",
            *table(["", "cold start", "gpusnap restore", "gpusnap + SDK restore"],
                   [["estimated s", _f(e.get("cold_s")), _f(e.get("restore_s")), _f(e.get("sdk_s"))],
                    ["GB/s per GPU", *(_f(row["rates"].get(f"{k}_gbps_per_gpu")) for k in ("cold", "restore", "sdk"))]]),
            "", "Not measured: no machine of 4 or 8 GPUs was lent."]


SUMMARIES = {"switch": _sum_switch, "standby": _sum_standby, "tp": _sum_tp, "b30": _sum_b30,
             "diffusion": _sum_diffusion, "estimate": _sum_estimate}


# ---- plan (--dry-run), the 120B estimate row, main -------------------------------------------------

def plan(args) -> dict:
    """What the row would do and need, from sizes alone; "fits": the disk holds it (tp: and
    the host's available memory the ranks' checkpointed GPU memory; a WORK on a tmpfs
    draws both from memory, which this does not add up). Pure but for the free space and
    memory it reads."""
    import shutil

    from tests.workloads.tp_server import shard_bytes, shapes
    size, world = args.size, (args.world if args.row == "tp" else 1)
    if args.row == "tp":
        try:
            shapes(size, world)
        except ValueError as e:
            raise SystemExit(f"tp: {e}") from None
    weights = world * shard_bytes(size, world) if args.row != "diffusion" else diffusion_bytes(size)
    drop = None
    if args.row == "b30":
        need, _free, drop = b30_disk(args)
    elif args.row == "diffusion":   # the images hold the weights and the activations' cache
        need = {"weights": weights, "disk": 3 * weights + (8 << 30), "ram": 3 * weights + (8 << 30)}
    elif args.row == "tp":
        need = tp_needs(weights, world, asked_modes(args, MODES))
    else:           # the weights' files, and one snapshot at a time in the store
        need = {"weights": weights, "disk": 2 * weights + (4 << 30),
                "ram": weights * (2 if args.row == "switch" else 1) + (8 << 30)}
    os.makedirs(args.work, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    ram = _ram_available()
    return {"row": args.row, "size": size, "world": world, "runs": args.runs,
            "gpus_needed": world, "gpu_memory_per_gpu": weights // world * (2 if args.row == "switch" else 1),
            **{f"{k}_bytes": v for k, v in need.items()}, "disk_free_bytes": free,
            "ram_available_bytes": ram,
            "fits": drop is not None if args.row == "b30" else
            free >= need["disk"] and (args.row != "tp" or ram >= need["ram"]),
            **({"drops_weights_file": drop} if args.row == "b30" else {}), "budget_s": args.budget,
            "naive": naive_plan(args, weights, free - need["disk"] if args.row != "b30" else
                                b30_free_after(free, _file_bytes(os.path.join(args.work, "models", size,
                                                                              "model.safetensors")),
                                               need["weights"], drop))}


def _ram_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tp_needs(weights: int, world: int, modes: list[str]) -> dict:
    """Bytes the tp row needs under WORK (disk: the ranks' weight files and one snapshot at
    a time in the store; transparent: the weights again, the default codec keeping
    random bf16 whole; sdk: each rank's image without its weights, ~1.2 GB measured at
    8B TP=2, breadth_tp_2xh200_8b_tp2.md) and host RAM (transparent: the ranks' checkpointed
    GPU memory while the dump runs). Pure."""
    store = weights if "transparent" in modes else world * (2 << 30)
    return {"weights": weights, "disk": weights + store + (4 << 30),
            "ram": (weights if "transparent" in modes else 0) + world * (8 << 30)}


def naive_plan(args, weights: int, work_free: int) -> dict | str:
    """What the row's naive baseline would do (--dry-run): where its images go (naive_where,
    work_free: the bytes free under WORK by then), or why the row has none."""
    if args.row == "switch":
        return "the driver's floor by hand (lock + checkpoint, restore + unlock) is this row's baseline"
    if args.row == "tp":
        return TP_NO_NAIVE
    if args.row == "b30" and args.mode != "transparent":
        return "run by b30 --mode transparent (the plain server's baseline)"
    if not args.naive_runs:
        return "off (--no-naive)"
    images = naive_bytes(args.row, weights)
    return {"runs": args.naive_runs, **naive_where(args, images, work_free),
            "estimate_s": round(args.naive_runs * naive_seconds(images))}


def b30_free_after(free: int, model_file: int, weights: int, drop: bool | None) -> int:
    """Bytes free under WORK when b30's naive baseline runs, from free now: the row's store
    is gone by then, the weights file (model_file bytes now, weights once made) is there
    unless the row drops it. Pure."""
    return max(0, free + model_file - (0 if drop else weights))


def _file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def row_estimate(args) -> tuple[dict, str]:
    """The 120B-class estimate from the newest breadth_tp_*.json under --from."""
    import glob
    paths = sorted(glob.glob(os.path.join(args.source, "breadth_tp_*.json")), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"estimate: no breadth_tp_*.json under {args.source}: run the tp row first")
    with open(paths[-1]) as f:
        saved = json.load(f)
    tp_row = saved["row"]
    rates = measured_rates(tp_row)
    row = {"row": "estimate", "size": "120b", "world": args.world,
           "weights_bytes": None, "source": os.path.basename(paths[-1]),
           "measured_world": tp_row["world"], "rates": rates,
           "estimate": estimate_120b(rates, "120b", args.world)}
    row["weights_bytes"] = row["estimate"]["bytes"]
    return row, saved["card"]


ROWS = {"switch": row_switch, "standby": row_standby, "tp": row_tp, "b30": row_b30,
        "diffusion": row_diffusion}
DEFAULT_SIZE = {"switch": "8b", "standby": "1b", "tp": "8b", "b30": "30b", "diffusion": "sdxl",
                "estimate": "120b"}
CPU_SIZE = {"diffusion": "tiny"}       # --cpu's default where it differs


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", choices=[*ROWS, "estimate"])
    ap.add_argument("--size", help="model size (default per row: " + ", ".join(
        f"{k} {v}" for k, v in DEFAULT_SIZE.items()) + "; with --cpu: " + ", ".join(
        f"{k} {v}" for k, v in CPU_SIZE.items()) + ")")
    ap.add_argument("--world", type=int, help="tp: ranks, one a GPU (default 2); estimate: the TP "
                    "estimated (default 8)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mode", choices=["transparent", "sdk"], default="transparent", help="b30")
    ap.add_argument("--modes", help="switch, standby, tp: the modes, a comma list of transparent "
                    "and sdk; switch and standby also take sdk_mapped (SDK servers with "
                    "GPUSNAP_SDK_READER=mapped) and sdk_pinned (default transparent,sdk)")
    ap.add_argument("--cpu", action="store_true", help="tp, diffusion: on the CPU (tp: gloo ranks), "
                    "no GPU needed")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds the row may take")
    ap.add_argument("--work", default="/tmp/gpusnap-bench")
    ap.add_argument("--store", help="the row's store (default WORK/store-ROW); b30 --mode sdk on "
                    "the one-GPU machine: /dev/shm/..., its disk holding the weights file")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS")
                    or os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--from", dest="source", help="estimate: where the tp row's JSON is (default --out)")
    ap.add_argument("--dry-run", action="store_true", help="say what the row needs; touch nothing")
    ap.add_argument("--api", action="store_true", help="switch, standby, b30, with --daemon: the pair and "
                    "the switch, the standby's resume, b30's restore also sent to gpusnapd's API "
                    "from the benchmark's process (via api)")
    ap.add_argument("--warm", action="store_true", help="b30: the snapshot's images prepared "
                    "(`gpusnap warm`) before its restores")
    ap.add_argument("--daemon", action="store_true", help="switch, standby, b30: each run through the "
                    "plain CLI and through gpusnapd")
    ap.add_argument("--no-floor-thp", action="store_true", help="switch: leave out the driver's "
                    "floor with gpusnap's huge-page window around the checkpoint (gpusnap's own "
                    "suspend has it; the floor the issue names, the host's THP mode as it is, stays)")
    ap.add_argument("--naive-runs", type=int, default=1, help="standby, diffusion, b30 --mode transparent: "
                    "round trips of the naive baseline, after the other modes (default 1)")
    ap.add_argument("--no-naive", dest="naive_runs", action="store_const", const=0,
                    help="leave the naive baseline out (--naive-runs 0)")
    args = ap.parse_args(argv)
    args.size = args.size or (args.cpu and CPU_SIZE.get(args.row)) or DEFAULT_SIZE[args.row]
    args.world = args.world or (8 if args.row == "estimate" else 2)
    args.source = args.source or args.out
    return args


def write(row: dict, card_name: str, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    extra = f"_{row.get('mode')}" if row["row"] == "b30" else f"_tp{row['world']}" if row["row"] == "tp" else ""
    base = os.path.join(out_dir, f"breadth_{row['row']}_{tag(card_name)}_{row['size']}{extra}")
    md = summarise(row, card_name)
    with open(base + ".json", "w") as f:
        json.dump({"card": card_name, "row": row}, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md, flush=True)
    return base + ".md"


def main(argv=None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # finally: servers killed
    if args.row == "estimate":
        row, card_name = row_estimate(args)
        write(row, card_name, args.out)
        return 0
    if args.dry_run:
        p = plan(args)
        print(json.dumps(p, indent=1))
        return 0 if p["fits"] else 1
    os.makedirs(args.work, exist_ok=True)
    ctx = Ctx(args)
    try:
        row = ROWS[args.row](ctx)
    finally:
        for pid in STARTED:
            stop(pid)
        ctx.close()
    write(row, ctx.card, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
