"""Zero-page elision: dump and restore times, bytes, with and without it.

    sudo .venv/bin/python benchmarks/zero_pages.py [--mib 256] [--zero-mib 2048] [--repeat 1]

Runs the real CLI (a subprocess, as users run it) on a memholder holding MIB of random
data and ZERO_MIB of touched zero pages, each row in a fresh store under /var/tmp, and
checks after every restore that the data and the zeros are intact. Also measures the
zero scan alone (gpusnap.imagefile.zero_pages.zero_pages_in) in GB/s. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpusnap.imagefile import zero_pages  # noqa: E402


def wait_file(path: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.05)
    raise TimeoutError(path)


def gpusnap(store: str, *args: str, env: dict | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"gpusnap {args}: {proc.stderr}")
    return json.loads(proc.stdout), took


def one(mib: int, zero_mib: int, elide: bool) -> dict:
    work = tempfile.mkdtemp(prefix="gpusnap-bench-", dir="/var/tmp")
    store, state = os.path.join(work, "store"), os.path.join(work, "state")
    os.makedirs(state)
    env = {} if elide else {"GPUSNAP_NO_ZERO_ELIDE": "1"}
    holder = subprocess.Popen([sys.executable, "-m", "gpusnap.workloads.memholder", "--state", state,
                               "--mib", str(mib), "--zero-mib", str(zero_mib)], cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    pid = wait_file(os.path.join(state, "ready"))["pid"]
    try:
        dumped, dump_s = gpusnap(store, "dump", "--pid", str(pid), env=env)
        holder.wait(timeout=60)
        info, _ = gpusnap(store, "inspect", dumped["id"])
        restored, restore_s = gpusnap(store, "restore", dumped["id"])
        report_path = os.path.join(state, "report.json")
        os.kill(pid, signal.SIGUSR1)
        report = wait_file(report_path)
        if not (report["data_ok"] and report["zeros_ok"]):
            raise RuntimeError(f"restored data is wrong: {report}")
        elide_s = dumped["timings"].get("zero_elide", 0.0)
        return {"mib": mib, "zero_mib": zero_mib, "elide": elide, "dump_s": dump_s, "restore_s": restore_s,
                "elide_s": elide_s, "criu_s": dumped["timings"].get("criu_dump", 0.0),
                "ingest_s": dumped["timings"].get("ingest", 0.0), "logical": dumped["bytes_logical"], "new": dumped["bytes_new"],
                "dropped": info.get("zero_pages_dropped") or 0}
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)


def scan_rate(kind: str, size: int = 1 << 30) -> float:
    buf = bytearray(zero_pages.SCAN_BYTES)
    if kind == "random":
        buf[:] = random.Random(1).randbytes(len(buf))
    elif kind == "half":
        for i in range(0, len(buf), 8192):
            buf[i:i + 4096] = random.Random(i).randbytes(4096)
    start = time.perf_counter()
    for _ in range(size // len(buf)):
        zero_pages.zero_pages_in(buf, len(buf))
    return size / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--zero-mib", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    rows = []
    for _ in range(args.repeat):
        rows.append(one(args.mib, 0, True))
        rows.append(one(args.mib, args.zero_mib, True))
        rows.append(one(args.mib, args.zero_mib, False))
    mi = 1 << 20
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"python {platform.python_version()}\n")
    print("| data MiB | zero MiB | elision | dump s | criu dump s | elide s | ingest s | restore s | "
          "logical MiB | new MiB | zero pages dropped |")
    print("|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mib']} | {r['zero_mib']} | {'on' if r['elide'] else 'off (GPUSNAP_NO_ZERO_ELIDE=1)'} "
              f"| {r['dump_s']:.2f} | {r['criu_s']:.2f} | {r['elide_s']:.2f} | {r['ingest_s']:.2f} | {r['restore_s']:.2f} | {r['logical'] / mi:.0f} "
              f"| {r['new'] / mi:.1f} | {r['dropped']} |")
    print("\nzero scan alone (zero_pages_in over 1 GiB, 1 MiB buffers in memory):\n")
    print("| page contents | GB/s |")
    print("|:---|---:|")
    for kind in ("zero", "random", "half"):
        print(f"| {kind} | {scan_rate(kind):.1f} |")


if __name__ == "__main__":
    main()
