"""Where a command through gpusnapd spends the time that is not its operation's own.

    python benchmarks/daemon_overhead_probe.py [--runs 5] [--mib 1024] [--out DIR]

The SDK switch (breadth_switch_h200_8b_sdk_s18.md) took 1.06 s from the command's start to
its answer, of which B's resume was 0.90 s and the plan 0.02: ~0.14 s went elsewhere. This
probe starts gpusnapd on a scratch store and a CUDA process holding --mib MiB of device
memory (in its own session), and times, --runs times each:

  python          `python3 -c pass`: the interpreter's start, site included
  client          the interpreter importing what a forwarded command imports (entry, forward,
                  client, http.client)
  ps              `gpusnap ps --json` through gpusnapd (no CUDA in the operation)
  suspend/resume  `gpusnap suspend|resume PID --json` of the CUDA process through gpusnapd
  *_cli           the same standalone (GPUSNAP_SOCKET empty)

For the daemon's rows, from its log (daemon/ops.py, server.py): `answered` is the daemon's
spawn of the operation's child to the child's output and result all in, `reaped` to the
child reaped (its exit, the CUDA driver's teardown included). `engine` is the sum of the
operation's own stages (its JSON's timings). Prints a table; writes
DIR/daemon_overhead_probe_<card>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.daemon_soak import start_daemon  # noqa: E402

HOLDER = ("import sys, time, torch; x = torch.ones({n}, dtype=torch.uint8, device='cuda'); "
          "torch.cuda.synchronize(); print('ready', flush=True); time.sleep(3600)")
CLIENT = "import gpusnap.entry, gpusnap.daemon.forward, gpusnap.daemon.client, http.client"


def timed(argv, env) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    s = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv)}: rc {p.returncode}: {p.stdout} {p.stderr}")
    return s, p.stdout


def finished(log: str) -> list[dict]:
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("msg") == "finished":
                out.append(d)
    return out


def engine_s(stdout: str) -> float | None:
    try:
        timings = json.loads(stdout).get("timings") or {}
    except (ValueError, AttributeError):
        return None
    return round(sum(v for v in timings.values() if isinstance(v, (int, float))), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--no-cuda", action="store_true", help="the rows without a CUDA process only "
                    "(python, client, ps): a check of the probe on a host without a GPU")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS", os.path.join(REPO, "benchmarks", "results")))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="gpusnap-overhead-")
    sock, log = os.path.join(work, "gpusnapd.sock"), os.path.join(work, "gpusnapd.log")
    daemon = start_daemon(os.path.join(work, "store"), sock, log)
    holder = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)" if a.no_cuda
                               else HOLDER.format(n=a.mib << 20)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    rows: list[dict] = []
    gs = [sys.executable, "-m", "gpusnap"]
    via = dict(os.environ, GPUSNAP_SOCKET=sock)
    alone = dict(os.environ, GPUSNAP_SOCKET="")
    try:
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError("the CUDA holder did not start")
        pid = str(holder.pid)
        card = "cpu" if a.no_cuda else subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.splitlines()[0].strip()

        def row(name, argv, env, daemon_op=False):
            before = len(finished(log)) if daemon_op else 0
            wall, out = timed(argv, env)
            r = {"row": name, "wall": round(wall, 4), "engine": engine_s(out) if out.startswith("{") else None}
            if daemon_op:
                done = finished(log)[before:]
                if done:
                    r.update(answered=done[-1].get("answered_s"), reaped=done[-1].get("seconds"))
            print(json.dumps(r), flush=True)
            rows.append(r)

        for _ in range(a.runs):
            row("python", [sys.executable, "-c", "pass"], alone)
            row("client", [sys.executable, "-c", CLIENT], alone)
            row("ps", [*gs, "ps", "--json"], via, True)
            if a.no_cuda:
                continue
            row("suspend", [*gs, "suspend", pid, "--json"], via, True)
            row("resume", [*gs, "resume", pid, "--json"], via, True)
            row("suspend_cli", [*gs, "suspend", pid, "--json"], alone)
            row("resume_cli", [*gs, "resume", pid, "--json"], alone)
    finally:
        holder.kill()
        daemon.terminate()
        daemon.wait(30)
    by: dict = {}
    for r in rows:
        by.setdefault(r["row"], []).append(r)

    def med(rs, k):
        v = [r[k] for r in rs if r.get(k) is not None]
        return round(statistics.median(v), 4) if v else None

    table = []
    for name, rs in by.items():
        m = {k: med(rs, k) for k in ("wall", "engine", "answered", "reaped")}
        m["client_side"] = round(m["wall"] - m["reaped"], 4) if m["reaped"] is not None else None
        m["child_setup"] = round(m["answered"] - m["engine"], 4) \
            if m["answered"] is not None and m["engine"] is not None else None
        m["teardown"] = round(m["reaped"] - m["answered"], 4) \
            if m["reaped"] is not None and m["answered"] is not None else None
        table.append({"row": name, "runs": len(rs), **m})
    res = {"card": card, "mib": a.mib, "runs": a.runs, "rows": rows, "medians": table}
    os.makedirs(a.out, exist_ok=True)
    slug = "h200" if "H200" in card else card.split()[-1].lower()
    with open(os.path.join(a.out, f"daemon_overhead_probe_{slug}.json"), "w") as f:
        json.dump(res, f, indent=1)
    cols = ["wall", "engine", "answered", "reaped", "client_side", "child_setup", "teardown"]
    lines = [f"# Time around a command through gpusnapd — {card}", "",
             f"A CUDA process holding {a.mib} MiB; medians of {a.runs} (s). client_side = wall - reaped; "
             "child_setup = answered - engine; teardown = reaped - answered.", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in table:
        lines.append(f"| {m['row']} | " + " | ".join("-" if m[c] is None else f"{m[c]:.3f}" for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"daemon_overhead_probe_{slug}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
