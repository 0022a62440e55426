"""gpusnapd soak: N dump/restore cycles of a real process tree through the daemon, and
what the daemon holds along the way (fds, RSS, work dirs left), plus the CLI's fixed
cost standalone vs through the daemon.

    sudo .venv/bin/python benchmarks/daemon_soak.py [--cycles 100] [--mib 64] [--out FILE.md]

Each cycle: `gpusnap --json dump --pid P` then `gpusnap --json restore ID` (the real CLI,
GPUSNAP_SOCKET set), the restored tree checked by its own report (data intact, ticks
moving). Samples of the daemon (GET /v1/status) after cycles 1, 10, 25, 50, ... N.
First, for comparison, --standalone cycles of the same kind without the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import Workload, wait_pids_free  # noqa: E402  (the test workload, started the same way)
from gpusnap.daemon.client import Client  # noqa: E402


def cli(env: dict, *args: str) -> tuple[int, dict | None, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpusnap", "--json", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"gpusnap {args}: {proc.returncode}: {proc.stderr}")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, secs


def start_daemon(store: str, sock: str, log: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gpusnap", "--store", store, "daemon", "--socket", sock],
                            cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if Client(sock).request("GET", "/v1/status")[0] == 200:
                return proc
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.05)
    raise RuntimeError("gpusnapd did not start")


def soak(cycles: int, mib: int, env: dict, sock: str | None, state: str) -> tuple[list[dict], dict]:
    """cycles dump/restore cycles of one tree with the CLI (through the daemon when sock);
    daemon samples, and the CLI wall times of each dump and restore."""
    w = Workload(state, ["--mib", str(mib), "--children", "1", "--threads", "1"])
    client = Client(sock) if sock else None
    marks = {1, 10, 25, 50, 75, cycles} | set(range(100, cycles + 1, 100))
    samples, times = [], {"dump": [], "restore": [], "cycle": []}
    for i in range(1, cycles + 1):
        started = time.perf_counter()
        _, dump, dump_s = cli(env, "dump", "--pid", str(w.pid))
        if i == 1:
            w.reap()
        wait_pids_free(w.pids)
        _, restored, restore_s = cli(env, "restore", dump["id"])
        assert dump["via"] == restored["via"] == ("daemon" if sock else "cli")
        report = w.report()
        assert report["data_ok"] and report["children_ok"], report
        times["cycle"].append(time.perf_counter() - started)
        times["dump"].append(dump_s)
        times["restore"].append(restore_s)
        if client and i in marks:
            st = client.request("GET", "/v1/status")[1]
            samples.append({"cycle": i, "fds": st["fds"], "rss_mib": round(st["rss_bytes"] / 2**20, 1),
                            "workdir_entries": len(st["workdir_entries"]), "ops_in_flight": len(st["operations"])})
            print(json.dumps(samples[-1]), flush=True)
        cli(env, "rm", dump["id"])                      # the store stays small
    w.kill_all()
    return samples, times


def _row(name: str, times: dict) -> str:
    return (f"| {name} | {statistics.median(times['dump']) * 1000:.0f} ms | "
            f"{statistics.median(times['restore']) * 1000:.0f} ms | {statistics.median(times['cycle']):.3f} s |")


def render(args, idle_rss: float, samples: list[dict], times: dict, standalone: dict) -> str:
    rows = "\n".join(f"| {s['cycle']} | {s['fds']} | {s['rss_mib']} | {s['workdir_entries']} | {s['ops_in_flight']} |"
                     for s in samples)
    return f"""# gpusnapd soak on a CPU host

`sudo .venv/bin/python benchmarks/daemon_soak.py --cycles {args.cycles} --mib {args.mib}` on
{platform.node()} ({os.cpu_count()} cores, kernel {platform.release()}), {time.strftime('%Y-%m-%d')}.
A memholder tree ({args.mib} MiB, 1 child, 1 thread) dumped and restored through the daemon
{args.cycles} times with the real CLI (GPUSNAP_SOCKET set), checked after each restore.

Idle RSS of the daemon after start (every operation module imported): **{idle_rss:.1f} MiB**
(target < 200 MB).

| after cycle | daemon fds | daemon RSS (MiB) | work dirs left | operations in flight |
| --- | --- | --- | --- | --- |
{rows}

CLI wall time per command (medians; the standalone row: {args.standalone} cycles of the same tree
without the daemon, run first):

| | dump | restore | cycle (dump + restore + check) |
| --- | --- | --- | --- |
{_row("standalone", standalone)}
{_row("through the daemon", times)}

Through the daemon the CLI still starts an interpreter and imports click and http.client;
the operation runs in a child forked from the daemon, with gpusnap's modules imported and
CRIU located already.
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--standalone", type=int, default=10, help="cycles without the daemon, for comparison")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gpusnapd-soak-")
    store, sock = os.path.join(tmp, "store"), os.path.join(tmp, "gpusnapd.sock")
    env_cli = {**os.environ, "GPUSNAP_STORE": store}
    env_cli.pop("GPUSNAP_SOCKET", None)
    _, standalone = soak(args.standalone, args.mib, env_cli, None, os.path.join(tmp, "w0"))
    daemon = start_daemon(store, sock, os.path.join(tmp, "daemon.log"))
    try:
        idle_rss = Client(sock).request("GET", "/v1/status")[1]["rss_bytes"] / 2**20
        samples, times = soak(args.cycles, args.mib, {**env_cli, "GPUSNAP_SOCKET": sock}, sock,
                              os.path.join(tmp, "w1"))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    text = render(args, idle_rss, samples, times, standalone)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
