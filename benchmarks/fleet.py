"""Fleet rows: a restore from object storage, and a restore through gpusnapd, each beside
the plain local-store CLI restore in the same run, to first token.

    python benchmarks/fleet.py --rows s3,daemon --size 1b --runs 3 --out DIR
    python benchmarks/fleet.py --cpu --mib 256 ...     # the same steps with a CPU workload

s3: a real S3 server process on 127.0.0.1 (moto's server mode, as the tests start it:
tests/s3server.py). The LLM server (tests/workloads/llm_server.py) is dumped into a local
store, restored, dumped again into an s3:// store; then, alternating, restores from the
s3:// store into an empty chunk cache (a fresh --cache each run) and from the local store;
last, restores from s3 on a node whose cache already holds the chunks (second node, warm
cache). Time to first token from the start of `gpusnap restore`.
daemon: `gpusnap daemon --socket S` on the local store; alternating restores with the plain
CLI (no warm cache), with GPUSNAP_SOCKET=S after prefetching the snapshot through the
daemon (`gpusnap warm`; the CLI forwards, checked by "via"), and with the plain CLI finding
that warm cache, to first token, with the stages of each; the daemon's RSS when idle,
before and after.
--cpu swaps the LLM server for the memholder tree (no GPU, no transformers; its "first
token" is its checked report), so every step but the GPU runs anywhere as root.
Every wait has a deadline; servers, the daemon and restored trees are stopped on any exit
(SIGTERM included). Prints each step as a JSON line and the tables at the end; writes
DIR/fleet_<card>_<size>_<rows>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cold_start import PORT, first_token, kill_tree, med, note, tree  # noqa: E402

CLI_TIMEOUT = 240


def gpusnap(args: list[str], env: dict) -> dict:
    """`gpusnap --json ARGS` as users run it; its JSON, or RuntimeError with its stderr."""
    res = subprocess.run([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    if res.returncode != 0:
        raise RuntimeError(f"gpusnap {' '.join(args)}: exit {res.returncode}: {res.stderr[-2000:]}")
    return json.loads(res.stdout)


class Llm:
    """tests/workloads/llm_server.py on the GPU; its answer is the first token."""

    def __init__(self, size: str, work: str):
        self.size, self.label = size, f"LLM server {size}"
        self.model = os.path.join(work, "models", size)     # cold_start.py's, shared
        self.state = os.path.join(work, "fleet-state")
        self.expected = None

    def start(self) -> int:
        if not os.path.exists(os.path.join(self.model, "model.safetensors")):
            subprocess.run([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size",
                            self.size, "--out", self.model], cwd=REPO, check=True, timeout=600,
                           stdin=subprocess.DEVNULL)
        os.makedirs(self.state, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.state, "ready"))
        log = open(os.path.join(self.state, "log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workloads.llm_server", "serve", "--model", self.model,
             "--port", str(PORT), "--state", self.state], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(self.state, "ready")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("LLM server did not start: "
                                   + open(os.path.join(self.state, "log")).read()[-3000:])
            time.sleep(0.02)
        self.expected = first_token()
        return self.proc.pid

    def dumped(self) -> None:
        self.proc.wait(60)

    def answer(self) -> None:
        tokens = first_token()
        assert tokens == self.expected, (tokens, self.expected)


class Holder:
    """The memholder tree (CPU only); its answer is its report, data checked."""

    def __init__(self, mib: int, work: str):
        self.mib, self.label = mib, f"memholder {mib} MiB (CPU)"
        self.state = os.path.join(work, "fleet-holder")

    def start(self) -> int:
        from conftest import Workload
        self.w = Workload(self.state, ["--mib", str(self.mib), "--children", "1"])
        return self.w.pid

    def dumped(self) -> None:
        self.w.reap()

    def answer(self) -> None:
        report = self.w.report()
        assert report["data_ok"] and report["children_ok"], report


class Bench:
    """One run's workload, environment and what to stop at the end."""

    def __init__(self, workload, work: str, stack: contextlib.ExitStack, deadline: float | None = None,
                 s3_variants: list[str] = (), server: str = "moto"):
        self.w, self.work, self.stack = workload, work, stack
        self.deadline = deadline            # time.monotonic() by which the row must be done
        self.s3_variants = list(s3_variants)    # extra empty-cache rows of the s3 row
        self.server = server                    # the s3 row's server: moto or rclone
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("GPUSNAP_SOCKET", "GPUSNAP_STORE", "GPUSNAP_CACHE")}
        self.local = os.path.join(work, "fleet-store")
        self.live: int | None = None
        stack.callback(self.kill)

    def time_for(self, started: float, done: int) -> bool:
        """Whether another run (as long as the slowest so far, with a margin) fits."""
        if self.deadline is None or not done:
            return True
        return time.monotonic() + 1.5 * (time.monotonic() - started) / done < self.deadline

    def kill(self) -> None:
        if self.live:
            kill_tree(tree(self.live))
            self.live = None

    def dump(self, pid: int, store: str, env: dict | None = None) -> dict:
        pids = tree(pid)
        t = time.perf_counter()
        snap = gpusnap(["--store", store, "dump", "--pid", str(pid)], {**self.env, **(env or {})})
        snap["wall_s"] = time.perf_counter() - t
        if self.live == pid:
            self.live = None
        kill_tree(pids)                     # gone already: a dump leaves the target killed
        return snap

    def restore(self, snap_id: str, store: str, env: dict | None = None) -> dict:
        self.kill()
        t0 = time.perf_counter()
        res = gpusnap(["--store", store, "restore", snap_id], {**self.env, **(env or {})})
        t1 = time.perf_counter()
        self.live = res["pid"]
        self.w.answer()
        t2 = time.perf_counter()
        return {"total": t2 - t0, "restore_cli": t1 - t0, "answer": t2 - t1, "via": res.get("via"),
                "command": res.get("command_s", 0.0), "store_open": res.get("store_open_s", 0.0),
                **{k: v for k, v in res.get("timings", {}).items() if isinstance(v, (int, float))}}

    def local_snapshot(self) -> str:
        """The workload started fresh and dumped into the local store; its id."""
        pid = self.w.start()
        self.live = pid
        snap = self.dump(pid, self.local)
        self.w.dumped()
        note(step="dump_local", s=snap["wall_s"], bytes_logical=snap["bytes_logical"])
        return snap["id"]


# ---- rows ---------------------------------------------------------------------------
def s3_row(b: Bench, runs: int) -> dict:
    """Local store vs s3:// store (empty cache, then warm cache) restores, same run."""
    from s3server import RcloneS3Server, S3Server
    server = RcloneS3Server(os.path.join(b.work, "rclone-root")) if b.server == "rclone" \
        else S3Server()
    b.stack.callback(server.stop)
    url = f"s3://{server.bucket()}/fleet"
    s3env = server.env()
    local_id = b.local_snapshot()
    b.restore(local_id, b.local)
    snap = b.dump(b.live, url, {**s3env, "GPUSNAP_CACHE": os.path.join(b.work, "cache-dump")})
    row = {"dump_s3_s": snap["wall_s"], "bytes_logical": snap["bytes_logical"],
           "bytes_stored": snap["bytes_stored"], "local": [], "s3_empty_cache": [], "s3_warm_cache": []}
    note(step="dump_s3", s=snap["wall_s"], bytes_stored=snap["bytes_stored"])
    cache = ""
    for i in range(runs):
        cache = os.path.join(b.work, f"cache-node{i}")
        row["s3_empty_cache"].append(b.restore(snap["id"], url, {**s3env, "GPUSNAP_CACHE": cache}))
        note(step="restore_s3_empty_cache", **row["s3_empty_cache"][-1])
        row["local"].append(b.restore(local_id, b.local))
        note(step="restore_local", **row["local"][-1])
    for i in range(runs):
        row["s3_warm_cache"].append(b.restore(snap["id"], url, {**s3env, "GPUSNAP_CACHE": cache}))
        note(step="restore_s3_warm_cache", **row["s3_warm_cache"][-1])
    for name in b.s3_variants:
        key = f"s3_empty_cache_{name}"
        row[key] = []
        for i in range(runs):
            cache = os.path.join(b.work, f"cache-{name}-{i}")
            row[key].append(b.restore(snap["id"], url, {**s3env, **S3_VARIANTS[name],
                                                         "GPUSNAP_CACHE": cache}))
            note(step=f"restore_{key}", **row[key][-1])
    b.kill()
    return row


# extra empty-cache rows (--s3-variants): the same restore with fewer requests in flight,
# or with the driver's staging memory placed during the CUDA restore, or with one (the
# behaviour before several) or eight prefetch helper processes
S3_VARIANTS = {"c4": {"GPUSNAP_S3_CONCURRENCY": "4"}, "c8": {"GPUSNAP_S3_CONCURRENCY": "8"},
               "overlap": {"GPUSNAP_UFFD_OVERLAP": "1"},
               "p1": {"GPUSNAP_S3_PREFETCH_PROCS": "1"}, "p8": {"GPUSNAP_S3_PREFETCH_PROCS": "8"}}


def daemon_row(b: Bench, runs: int) -> dict:
    """The standalone CLI vs the CLI forwarding to gpusnapd, alternating, same snapshot and
    store. Each run: the warm caches dropped, a CLI restore (as a user without the daemon
    runs it); the snapshot prefetched through the daemon (`gpusnap warm`, GPUSNAP_SOCKET
    set: what a user of the daemon does once, untimed), a restore through the daemon; a CLI
    restore that finds that cache (what of the gain is the cache, what the resident
    daemon)."""
    from daemon_soak import start_daemon

    from gpusnap.daemon.client import Client
    snap_id = b.local_snapshot()
    sock = os.path.join(b.work, "gpusnapd.sock")
    daemon = start_daemon(b.local, sock, os.path.join(b.work, "gpusnapd.log"))
    b.stack.callback(stop, daemon)
    via = {"GPUSNAP_SOCKET": sock}
    status = Client(sock).request("GET", "/v1/status")[1]
    row = {"idle_rss_start_mib": status["rss_bytes"] / 2**20, "cli": [], "daemon": [], "cli_warm": [],
           "warm": []}
    started = time.monotonic()
    for i in range(runs):
        if not b.time_for(started, i):
            note(step="daemon", stopped=f"after {i} runs: the next would not fit the budget")
            break
        gpusnap(["--store", b.local, "warm", "--drop"], b.env)
        row["cli"].append(b.restore(snap_id, b.local))
        note(step="restore_cli", **row["cli"][-1])
        t = time.perf_counter()
        warmed = gpusnap(["--store", b.local, "warm", snap_id], {**b.env, **via})
        row["warm"].append({"s": time.perf_counter() - t, "pages": warmed[0]["pages"]})
        note(step="warm_via_daemon", **row["warm"][-1])
        row["daemon"].append(b.restore(snap_id, b.local, via))
        note(step="restore_daemon", **row["daemon"][-1])
        row["cli_warm"].append(b.restore(snap_id, b.local))
        note(step="restore_cli_warm", **row["cli_warm"][-1])
        assert [row[k][-1]["via"] for k in ("cli", "daemon", "cli_warm")] == ["cli", "daemon", "cli"], row
        assert "warm_cache" in row["daemon"][-1] and "materialise" not in row["daemon"][-1], row
    b.kill()
    gpusnap(["--store", b.local, "warm", "--drop"], b.env)     # the cache lives outside the work dir
    status = Client(sock).request("GET", "/v1/status")[1]
    row["idle_rss_after_mib"] = status["rss_bytes"] / 2**20
    row["gpu_facts"] = status.get("gpu_facts")
    return row


ROWS = {"s3": s3_row, "daemon": daemon_row}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- report -------------------------------------------------------------------------
def total(xs: list[dict]) -> float:
    return med([x["total"] for x in xs])


def render(result: dict) -> str:
    lines = [f"# Fleet rows — {result['card']}, {result['workload']}", "",
             f"`benchmarks/fleet.py {' '.join(result['argv'])}`, {result['date']}; "
             f"medians of {result['runs']}, seconds from the start of `gpusnap restore` to the "
             "first answer (first token).", ""]
    for key in ("s3", "daemon"):
        if "error" in result.get(key, {}):
            lines += [f"## {key}: failed", "", "    " + result[key]["error"][-3000:].replace("\n", "\n    "), ""]
    s3 = result.get("s3")
    if s3 and "error" not in s3:
        local = total(s3["local"])
        server = "rclone serve s3" if result.get("server") == "rclone" else "moto server"
        lines += [f"## Restore from object storage ({server}, 127.0.0.1) vs local store", "",
                  "| store | to first token s | x local |", "|---|---|---|",
                  f"| local directory | {local:.2f} | 1.00 |"]
        extra = [(k, f"s3://, empty chunk cache, {k[len('s3_empty_cache_'):]} "
                     f"({S3_VARIANTS.get(k[len('s3_empty_cache_'):], '?')})")
                 for k in s3 if k.startswith("s3_empty_cache_")]
        for key, label in (("s3_empty_cache", "s3://, empty chunk cache"),
                           ("s3_warm_cache", "s3://, warm chunk cache (second restore on a node)"),
                           *extra):
            lines.append(f"| {label} | {total(s3[key]):.2f} | {total(s3[key]) / local:.2f} |")
        rows = [("local directory", s3["local"]),
                *((label, s3[key]) for key, label in (("s3_empty_cache", "s3://, empty cache"),
                                                      ("s3_warm_cache", "s3://, warm cache"))),
                *((k[len("s3_"):], s3[k]) for k, _label in extra)]
        opened = "; ".join(f"{label} {med([x.get('store_open', 0.0) for x in xs]):.3f}"
                           for label, xs in rows)
        lines += ["", "Stages (medians, s; plan includes opening the store: " + opened + "):",
                  "", *stage_table(rows, "store")]
        lines += ["", f"Target: s3 into an empty cache within 1.5x of local: "
                  f"{'met' if total(s3['s3_empty_cache']) <= 1.5 * local else 'not met'}. "
                  f"Dump into s3 {s3['dump_s3_s']:.2f} s ({s3['bytes_logical'] / 1e9:.2f} GB "
                  f"logical, {s3['bytes_stored'] / 1e9:.2f} GB stored).", ""]
    d = result.get("daemon")
    if d and "error" not in d:
        lines += daemon_table(d)
    return "\n".join(lines) + "\n"


FRONT_DOORS = (("cli", "CLI (no warm cache)"), ("daemon", "CLI -> gpusnapd (prefetched)"),
               ("cli_warm", "CLI (warm cache)"))
NOT_STAGES = {"total", "restore_cli", "answer", "via", "command", "store_open"}


def stage_table(rows: list[tuple[str, list[dict]]], what: str) -> list[str]:
    """Medians per row: to first token, the restore command, each stage, what of the
    restore command no stage covers (in): the command's own steps outside stages, and
    (out) interpreter start, imports, click, the round trip to a daemon."""
    stages = sorted({k for _label, xs in rows for x in xs for k in x} - NOT_STAGES)
    lines = [f"| {what} | to first token s | restore command s | " + " | ".join(stages)
             + " | other in | other out |", "|---" * (len(stages) + 5) + "|"]
    for label, xs in rows:
        cells = [med([x.get(s, 0.0) for x in xs]) for s in stages]
        inside = med([x["command"] - sum(x.get(s, 0.0) for s in stages) for x in xs])
        outside = med([x["restore_cli"] - x["command"] for x in xs])
        lines.append(f"| {label} (n={len(xs)}) | {total(xs):.2f} | {med([x['restore_cli'] for x in xs]):.2f} | "
                     + " | ".join(f"{c:.3f}" for c in cells) + f" | {inside:.3f} | {outside:.3f} |")
    return lines


def daemon_table(d: dict) -> list[str]:
    """The daemon row: stage_table of each front door, then what it adds up to."""
    lines = ["## Restore through gpusnapd vs the standalone CLI", "",
             *stage_table([(label, d[key]) for key, label in FRONT_DOORS], "front door")]
    cli, via, warm = total(d["cli"]), total(d["daemon"]), total(d["cli_warm"])
    return lines + ["", f"Daemon faster than the CLI by {cli - via:.2f} s (target >= 0.3 s: "
                    f"{'met' if cli - via >= 0.3 else 'not met'}); than the CLI with the same warm "
                    f"cache by {warm - via:.2f} s. Prefetch (`gpusnap warm` through the daemon, "
                    f"{d['warm'][0]['pages']} path) {med([w['s'] for w in d['warm']]):.2f} s. Daemon "
                    f"idle RSS {d['idle_rss_start_mib']:.0f} MiB after start, "
                    f"{d['idle_rss_after_mib']:.0f} MiB after the restores. GPU facts from the "
                    f"daemon's NVML helper: {(d.get('gpu_facts') or {}).get('nvml')}.", ""]


def card_name(cpu: bool) -> tuple[str, str]:
    if cpu:
        return "CPU host", "cpu"
    import torch
    card = torch.cuda.get_device_name(0)
    tag = "h200" if "H200" in card else "h100" if "H100" in card else card.replace(" ", "_").lower()
    return card, tag


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="s3,daemon", help="comma list: s3, daemon")
    ap.add_argument("--size", default="1b", help="LLM server size (tests/workloads/llm_server.py)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: the daemon row runs no more restores than fit, then reports")
    ap.add_argument("--s3-variants", default="",
                    help=f"s3 row: extra empty-cache rows, comma list of {', '.join(S3_VARIANTS)}")
    ap.add_argument("--server", choices=["moto", "rclone"], default="moto",
                    help="the s3 row's server: moto's server mode (what the tests use), or "
                         "`rclone serve s3` over a directory (GPUSNAP_RCLONE or rclone on PATH)")
    ap.add_argument("--cpu", action="store_true", help="memholder instead of the LLM server")
    ap.add_argument("--mib", type=int, default=256, help="memholder size with --cpu")
    ap.add_argument("--work", default="/tmp/gpusnap-bench")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS") or
                    os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    s3_variants = [v for v in args.s3_variants.split(",") if v]
    unknown = set(s3_variants) - set(S3_VARIANTS)
    if unknown:
        ap.error(f"--s3-variants: unknown {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # run the cleanups below
    card, tag = card_name(args.cpu)
    os.makedirs(args.work, exist_ok=True)
    # as installed: byte-compiled (PYTHONDONTWRITEBYTECODE would have every CLI run compile)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "gpusnap")],
                   check=False, stdout=subprocess.DEVNULL)
    result = {"card": card, "runs": args.runs, "argv": argv or sys.argv[1:], "server": args.server,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    failed = False
    deadline = time.monotonic() + args.budget if args.budget else None
    for row in args.rows.split(","):
        work = os.path.join(args.work, f"fleet-{row}")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        workload = Holder(args.mib, work) if args.cpu else Llm(args.size, args.work)
        result["workload"] = workload.label
        try:
            with contextlib.ExitStack() as stack:
                result[row] = ROWS[row](Bench(workload, work, stack, deadline, s3_variants,
                                              args.server), args.runs)
        except Exception as exc:  # noqa: BLE001 - the other row stands; say what broke
            failed = True
            result[row] = {"error": f"{type(exc).__name__}: {exc}"}
            note(step=row, error=result[row]["error"])
    text = render(result)
    print(text, flush=True)
    os.makedirs(args.out, exist_ok=True)
    what = f"{args.mib}mib" if args.cpu else args.size
    base = os.path.join(args.out, f"fleet_{tag}_{what}_{args.rows.replace(',', '_')}"
                        + ("_rclone" if args.server == "rclone" else ""))
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)
    if failed:
        sys.exit(1)
    return base + ".md"


if __name__ == "__main__":
    main()
