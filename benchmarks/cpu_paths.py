"""Dump and restore of an idle process tree on this (CPU) host, gpusnap beside plain CRIU.

    python benchmarks/cpu_paths.py [--mib 1024] [--runs 3] [--out benchmarks/results]

Rows, same run, same tree (a memholder: random data, two children, two threads):
- dump: `criu dump` into a tmpfs directory (the naive floor: nothing stored, nothing
  hashed) beside `gpusnap dump` into a fresh store (durable, deduplicated, compressed),
  with pages streamed from CRIU (the default) and staged (`--pages staged --leave-running`,
  into another fresh store); and a second dump of the restored tree into the same store
- restore: `gpusnap restore --pages criu` (materialise, then CRIU writes the pages)
  beside `--pages uffd` (gpusnap places the pages from the store through userfaultfd)
  and plain `criu restore` from the tmpfs images

Medians of --runs, wall clock of the whole command. Writes OUT/cpu_paths_<host>.md/.json.
gpusnap's modules are compiled first, as a wheel's install leaves them (an editable
install under PYTHONDONTWRITEBYTECODE would compile them again in every command timed).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.criu.locate import find_criu  # noqa: E402


def start_tree(state: str, mib: int, zero_mib: int = 0) -> int:
    """The memholder tree: mib MiB of random data and zero_mib MiB of touched zero pages."""
    os.makedirs(state, exist_ok=True)
    log = open(os.path.join(state, "log"), "ab")
    subprocess.Popen([sys.executable, "-m", "gpusnap.workloads.memholder", "--state", state,
                      "--mib", str(mib), "--zero-mib", str(zero_mib), "--children", "2",
                      "--threads", "2"], cwd=REPO,
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    ready = os.path.join(state, "ready")
    for _ in range(1200):
        if os.path.exists(ready):
            with open(ready) as f:
                return json.load(f)["pid"]
        time.sleep(0.05)
    raise TimeoutError("workload did not start")


def check(state: str, pid: int) -> None:
    report = os.path.join(state, "report.json")
    if os.path.exists(report):
        os.unlink(report)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(600):
        if os.path.exists(report):
            with open(report) as f:
                r = json.load(f)
            assert r["data_ok"] and r["children_ok"], r
            return
        time.sleep(0.05)
    raise TimeoutError("no report")


def tree(pid: int) -> list[int]:
    import psutil
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


def kill_tree(pids: list[int]) -> None:
    """SIGKILL pids and wait until every one is free again (init reaps orphans late)."""
    import psutil
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.02)


def timed(argv, env=None) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    took = time.perf_counter() - t
    if res.returncode:
        log = ""
        if "-D" in argv and "-o" in argv:
            path = os.path.join(argv[argv.index("-D") + 1], argv[argv.index("-o") + 1])
            log = open(path).read()[-1500:] if os.path.exists(path) else ""
        raise RuntimeError(f"{argv[:4]}: {res.returncode} {res.stderr[-1500:]} {log}")
    return took, res.stdout


def gpusnap(store: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "gpusnap", "--json", "--store", store, *args]


def one_run(work: str, mib: int, criu: str) -> dict:
    state, store, images = (os.path.join(work, n) for n in ("state", "store", "images"))
    row: dict = {}
    pid = start_tree(state, mib)
    pids = tree(pid)
    os.makedirs(images)
    row["criu_dump"], _ = timed([criu, "dump", "-t", str(pid), "-D", images, "--shell-job",
                                 "--tcp-established", "--file-locks", "--ext-unix-sk", "-o", "d.log"])
    kill_tree(pids)
    row["criu_restore"], _ = timed([criu, "restore", "-D", images, "-d", "--shell-job",
                                    "--tcp-established", "--file-locks", "--ext-unix-sk", "-o", "r.log"])
    check(state, pid)                   # the restored tree is the one gpusnap dumps
    t, out = timed(gpusnap(store + "-staged", "dump", "--pid", str(pid), "--pages", "staged",
                           "--leave-running"))
    row["gpusnap_dump_staged"], row["gpusnap_dump_staged_stages"] = t, json.loads(out)["timings"]
    t, out = timed(gpusnap(store, "dump", "--pid", str(pid), "--name", "bench"))
    row["gpusnap_dump"], row["gpusnap_dump_stages"] = t, json.loads(out)["timings"]
    for pages in ("criu", "uffd"):
        kill_tree(pids)
        t, out = timed(gpusnap(store, "restore", "bench", "--pages", pages))
        res = json.loads(out)
        row[f"restore_{pages}"], row[f"restore_{pages}_stages"] = t, res["timings"]
        if res.get("fill"):
            row["fill_gbps"] = res["fill"]["gb_per_s"]
        check(state, res["pid"])
    t, out = timed(gpusnap(store, "dump", "--pid", str(pid), "--name", "bench"))
    row["gpusnap_dump_second"], row["gpusnap_dump_second_new"] = t, json.loads(out)["bytes_new"]
    kill_tree(pids)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args()
    criu = find_criu()[0]
    compileall.compile_dir(os.path.join(REPO, "gpusnap"), quiet=1)
    rows = []
    for _ in range(args.runs):
        work = tempfile.mkdtemp(prefix="gpusnap-cpu-bench-", dir="/dev/shm")
        try:
            rows.append(one_run(work, args.mib, criu))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
    med["second_over_first"] = med["gpusnap_dump_second"] / med["gpusnap_dump"]
    host = f"{platform.node()} ({os.cpu_count()} cores)"
    lines = [f"# Dump and restore on the CPU host: gpusnap beside plain CRIU — {host}", "",
             f"An idle {args.mib} MiB process tree (memholder, 2 children, 2 threads), medians of "
             f"{args.runs}, whole command wall clock (s). `python benchmarks/cpu_paths.py`.", "",
             "| step | plain CRIU (tmpfs images) | gpusnap | gpusnap / CRIU |", "|---|---|---|---|",
             f"| dump (pages streamed) | {med['criu_dump']:.2f} | {med['gpusnap_dump']:.2f} | "
             f"{med['gpusnap_dump'] / med['criu_dump']:.2f}x |",
             f"| dump, --pages staged --leave-running | {med['criu_dump']:.2f} | "
             f"{med['gpusnap_dump_staged']:.2f} | {med['gpusnap_dump_staged'] / med['criu_dump']:.2f}x |",
             f"| second dump (restored tree, same store) | {med['criu_dump']:.2f} | "
             f"{med['gpusnap_dump_second']:.2f} | {med['gpusnap_dump_second'] / med['criu_dump']:.2f}x |",
             f"| restore, --pages criu | {med['criu_restore']:.2f} | {med['restore_criu']:.2f} | "
             f"{med['restore_criu'] / med['criu_restore']:.2f}x |",
             f"| restore, --pages uffd | {med['criu_restore']:.2f} | {med['restore_uffd']:.2f} | "
             f"{med['restore_uffd'] / med['criu_restore']:.2f}x |", "",
             f"uffd fill: {statistics.median(r.get('fill_gbps') or 0 for r in rows):.2f} GB/s. "
             "Stages of the last run:", "",
             f"- dump: {rows[-1]['gpusnap_dump_stages']}",
             f"- dump --pages staged: {rows[-1]['gpusnap_dump_staged_stages']}",
             f"- second dump: {rows[-1]['gpusnap_dump_second_new']} bytes new",
             f"- restore --pages criu: {rows[-1]['restore_criu_stages']}",
             f"- restore --pages uffd: {rows[-1]['restore_uffd_stages']}"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_paths_cpu.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "cpu_paths_cpu.json"), "w") as f:
        json.dump({"host": host, "mib": args.mib, "rows": rows, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
