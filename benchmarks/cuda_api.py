"""Time the CUDA checkpoint API per stage on a torch_holder, and prove its data survives.

    PYTHONPATH=. python3 benchmarks/cuda_api.py --gib 2 8 --repeat 3 --out benchmarks/results

Per size: start a holder, then `repeat` times lock -> checkpoint -> restore -> unlock
through CudaSession (cuInit is timed once, before, so restores don't carry it), reading
the holder's RSS and /dev/nvidia* descriptors while it is checkpointed; finally ask the
holder to compare every element of its device data with the pattern. Writes
cuda_api_<card>.md (e.g. cuda_api_h100.md) into --out and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpusnap.cuda import CudaSession, get_driver, host_gpus  # noqa: E402

STAGES = ("lock", "checkpoint", "restore", "unlock")
GIB = 1 << 30


def load_holder():
    spec = importlib.util.spec_from_file_location(
        "torch_holder", ROOT / "gpusnap" / "workloads" / "torch_holder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]+\d+[A-Z]*|\d{3,}[A-Z]*)\b", name.removeprefix("NVIDIA "))
    return (m.group(1) if m else re.sub(r"\W+", "_", name)).lower()


def persistence_mode() -> str:
    import pynvml as nv
    nv.nvmlInit()
    try:
        on = nv.nvmlDeviceGetPersistenceMode(nv.nvmlDeviceGetHandleByIndex(0))
        return "on" if on == nv.NVML_FEATURE_ENABLED else "off"
    except nv.NVMLError as e:
        return f"unknown ({e})"
    finally:
        nv.nvmlShutdown()


def measure(holder_mod, gib: float, mode: str, repeat: int) -> dict:
    driver = get_driver()
    with tempfile.TemporaryDirectory() as tmp:
        h = holder_mod.Holder(tmp, gib=gib, mode=mode)
        t0 = time.monotonic()
        h.start()
        startup = time.monotonic() - t0
        try:
            device = sum(host_gpus().used_memory([h.pid]).values())
            rss0 = h.rss()
            runs, rss, fds = [], [], []
            for _ in range(repeat):
                with CudaSession([h.pid], driver) as s:
                    s.lock_all(30_000)
                    s.checkpoint_all()
                    rss.append(h.rss())
                    fds.append(len(h.nvidia_fds()))
                    s.restore_all()
                    s.unlock_all()
                runs.append(dict(s.timings))
            result = h.check()
        finally:
            h.stop()
    return {"gib": gib, "mode": mode, "runs": runs, "rss": rss, "fds": fds,
            "device": device, "rss0": rss0,
            "result": result, "checksum_before": h.ready["checksum"], "startup": startup}


def render(card: str, host, cuinit: float, results: list[dict], argv: list[str],
           persistence: str) -> str:
    lines = [
        f"# CUDA checkpoint API timings: {card}",
        "",
        f"- measured: {datetime.date.today().isoformat()}, by `python3 benchmarks/cuda_api.py "
        f"{' '.join(argv)}`",
        f"- GPU: {card}; driver {host.driver_version}; CUDA driver API "
        f"{host.cuda_driver_version // 1000}.{host.cuda_driver_version % 1000 // 10}; "
        f"kernel {platform.release()}",
        f"- cuInit(0) in gpusnap's process, once before the first restore: {cuinit * 1000:.0f} ms",
        f"- persistence mode: {persistence}",
        "- workload: tests/workloads/torch_holder.py; each run is lock -> checkpoint -> "
        "restore -> unlock through CudaSession; stage times in ms as min / median / max",
        "",
        "| data GiB | mode | device memory (NVML) | runs | lock | checkpoint | restore | unlock "
        "| RSS running -> checkpointed | /dev/nvidia* fds when checkpointed | data intact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = []
        for stage in STAGES:
            xs = [run[stage] for run in r["runs"]]
            cells.append(" / ".join(f"{x * 1000:.1f}" for x in
                                    (min(xs), statistics.median(xs), max(xs))))
        ok = (r["result"]["intact"] and r["result"]["checksum"] == r["checksum_before"]
              and r["result"]["graphs_ok"])
        device = f"{r['device'] / GIB:.2f} GiB" if r["device"] else "n/a"
        lines.append(f"| {r['gib']:g} | {r['mode']} | {device} | {len(r['runs'])} | "
                     + " | ".join(cells) + f" | {r['rss0'] / GIB:.2f} -> "
                     f"{max(r['rss']) / GIB:.2f} GiB | {max(r['fds'])} | "
                     f"{'yes' if ok else 'NO'} |")
    lines += ["", "Rates over the process's device memory (NVML; the data size where NVML "
              "cannot see it), medians:", ""]
    for r in results:
        size = (r["device"] or r["gib"] * GIB) / GIB
        ck = statistics.median(run["checkpoint"] for run in r["runs"])
        rs = statistics.median(run["restore"] for run in r["runs"])
        lines.append(f"- {r['gib']:g} GiB of data ({size:.2f} GiB on the device): checkpoint "
                     f"{size / ck:.2f} GiB/s, restore {size / rs:.2f} GiB/s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, nargs="+", default=[2.0])
    ap.add_argument("--mode", choices=("idle", "graphs"), default="graphs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    holder_mod = load_holder()
    host = host_gpus()
    card = host.gpus[0].name
    driver = get_driver()
    t0 = time.monotonic()
    driver.init()
    cuinit = time.monotonic() - t0
    persistence = persistence_mode()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cuda_api_{card_slug(card)}.md")
    results = []
    for gib in args.gib:        # rewritten after each size: a run cut short keeps the rest
        results.append(measure(holder_mod, gib, args.mode, args.repeat))
        text = render(card, host, cuinit, results, argv, persistence)
        with open(path, "w") as f:
            f.write(text)
        print(f"{gib:g} GiB measured", flush=True)
    print(text)
    print(f"written to {path}")
    return 0 if all(r["result"]["intact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
