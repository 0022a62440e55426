"""A server's first dump into an empty store against one into a store seeded with its
weights file (`gpusnap seed add`), same run, alternating: wall seconds and bytes written.

    python benchmarks/seed_dump.py cpu --mib 1024 --runs 3 [--out DIR]
    python benchmarks/seed_dump.py server --size 8b --runs 3 [--out DIR]     (GPU machine)

cpu: tests/workloads/weightholder.py (a synthetic safetensors file's tensors read into anonymous
memory, each from a page start) stands in for the server. server: the LLM server of
tests/workloads (cold_start.py's). Each run then also dumps it by hand (the naive
baseline of issue 13, as cold_start.py's, but leaving it running like the rows beside it:
the driver's lock + checkpoint, `criu dump --leave-running` into /dev/shm, the driver's
restore + unlock; nothing stored, nothing durable). Each run dumps the same live process with
--leave-running into a fresh empty store, then once more into that store (the second dump
of a server, little changed: the chunks of the first are there), and into a fresh store
seeded just before (the seeding timed apart: it is done when the model lands on the node,
not at the dump). Before each timed dump the disk's writeback of what came before is
waited for (sync, not timed): a dump is measured against a quiet disk, as on a node
that did not just write gigabytes, and not against the last run's writeback.
Prints a table; writes DIR/seed_dump_<what>.md and .json, again after each run (a step cut
off at its time limit leaves the runs it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cold_start import gpusnap  # noqa: E402


def _holder(work: str, mib: int):
    import seed_probe
    weights = os.path.join(work, "model.safetensors")
    seed_probe.make_safetensors(weights, mib)
    state = os.path.join(work, "holder", "ready")
    if os.path.exists(state):       # an earlier run's: the new holder is not ready yet
        os.unlink(state)
    proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.weightholder", weights,
                             "--state", os.path.dirname(state)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(state):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the holder did not start")
        time.sleep(0.05)
    return proc, weights, lambda: (proc.kill(), proc.wait())


def _server(work: str, size: str):
    import cold_start
    model_dir = os.path.join(work, "models", size)
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        r = cold_start.sh([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size",
                           size, "--out", model_dir], cwd=REPO)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    proc, _t, _tokens, _info = cold_start.start_server(model_dir, os.path.join(work, "state"))
    return proc, os.path.join(model_dir, "model.safetensors"), \
        lambda: (cold_start.kill_tree(cold_start.tree(proc.pid)), proc.wait())


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["cpu", "server"])
    ap.add_argument("--mib", type=int, default=1024, help="cpu: the weights file's size")
    ap.add_argument("--size", default="1b", help="server: the LLM server's size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fsync", default="auto",
                    help="GPUSNAP_FSYNC of gpusnap's dumps, a comma list: each mode's rows in turn "
                         "(auto: one journal commit a batch of chunks on ext4/XFS; each: an fsync a chunk); "
                         "MODE:sN also sets GPUSNAP_STREAM_SLOTS=N (auto,auto:s128: the page stream's "
                         "default slots against 128), MODE:cLEVEL GPUSNAP_COMPRESS=LEVEL "
                         "(auto,auto:cbf16: `--compress bf16` beside the default), MODE:p "
                         "GPUSNAP_STREAM_PREFAULT=1 (the page stream's slots touched during the "
                         "driver's checkpoint), MODE:p0 GPUSNAP_STREAM_PREFAULT=0, MODE:tN "
                         "GPUSNAP_THREADS=N (the page stream's workers), MODE:wN GPUSNAP_SEED_WORKERS=N (a --seed's), MODE:pv "
                         "GPUSNAP_STREAM_PRIVATE=1 (the slots in private huge pages, read by the workers: "
                         "the default where they may), MODE:sh GPUSNAP_STREAM_PRIVATE=0 (shared slots), "
                         "MODE:nN GPUSNAP_STREAM_NICE=N (the page stream's workers niced)")
    ap.add_argument("--kinds", default="empty,seeded",
                    help="gpusnap's rows: empty (an empty store, then the second dump), "
                         "seeded (a store seeded with the weights file ahead), inline (an empty "
                         "store, `dump --seed` the weights file, then again), auto (the same "
                         "with `--seed auto`: the weights the server names)")
    ap.add_argument("--no-naive", dest="naive", action="store_false",
                    help="leave out the dump by hand and the floor")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the dump by hand and the floor (no gpusnap dumps)")
    ap.add_argument("--work", default="/tmp/gpusnap-seed-dump")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS") or
                    os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the server stopped (finally) at a step's limit
    os.makedirs(args.work, exist_ok=True)
    proc, weights, stop = (_holder(args.work, args.mib) if args.what == "cpu"
                           else _server(args.work, args.size))
    modes = [m.strip() for m in args.fsync.split(",") if m.strip()]
    rows: dict[str, list[dict]] = {_key(k, m): [] for m in modes for k in KINDS}
    rows["naive"], rows["floor"] = [], []
    seeds: list[dict] = []
    card = "CPU host" if args.what == "cpu" else _card()
    what = f"cpu_{args.mib}mib" if args.what == "cpu" else f"{_tag(card)}_{args.size}"
    base = os.path.join(args.out, f"seed_dump_{what}")
    os.makedirs(args.out, exist_ok=True)

    def write(runs: int) -> str:
        """The table and the JSON of the runs so far: a step cut off at its time limit
        leaves the runs it finished."""
        text = "\n".join(_table(runs, argv, card, rows, modes, seeds, os.path.getsize(weights))) + "\n"
        with open(base + ".json", "w") as f:
            json.dump({"card": card, "rows": rows, "seeds": seeds, "runs": runs}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(text)
        return text
    kinds = [k for k in ("empty", "seeded", "inline", "auto") if k in args.kinds.split(",")]
    text = ""
    try:
        for run in range(args.runs):
            for mode, kind in [(m, k) for m in modes for k in kinds if not args.baselines_only]:
                store = os.path.join(args.work, f"store-{kind}")
                shutil.rmtree(store, ignore_errors=True)
                if kind == "seeded":
                    t = time.perf_counter()
                    seed = gpusnap("seed", "add", weights, store=store)
                    seed["wall_s"] = time.perf_counter() - t
                    seeds.append(seed)
                for row in FOLLOWED.get(kind, (kind,)):
                    seed = ("--seed", weights) if kind == "inline" else \
                        ("--seed", "auto") if kind == "auto" else ()
                    rows[_key(row, mode)].append(_dump(proc.pid, store, mode, *seed))
                    print(json.dumps({"run": run, "kind": row, "fsync": mode,
                                      **rows[_key(row, mode)][-1]}), flush=True)
                shutil.rmtree(store, ignore_errors=True)
            if args.naive:
                os.sync()
                rows["naive"].append(_naive(proc.pid))
                rows["floor"].append(_floor(proc.pid))
                for kind in ("naive", "floor"):
                    print(json.dumps({"run": run, "kind": kind, **rows[kind][-1]}), flush=True)
            text = write(run + 1)
    finally:
        stop()
    print(text)
    return base + ".md"


def _table(runs: int, argv, card: str, rows: dict, modes: list[str], seeds: list[dict],
           weights_bytes: int) -> list[str]:
    med = statistics.median
    tag = (lambda m: f" (GPUSNAP_FSYNC={m})") if len(modes) > 1 else (lambda m: "")
    ours = [(k, m) for m in modes for k in KINDS if rows[_key(k, m)]]
    names = {"empty": "empty", "second": "the same store again (second dump)",
             "seeded": "seeded with the weights file",
             "inline": "empty, `dump --seed` the weights file (seeded as it dumps; GB written: both)",
             "inline_again": "the same store again, `--seed` again (the seed found, not read)",
             "auto": "empty, `dump --seed auto` (the weights the server's command line names, "
                     "seeded as it dumps; GB written: both)",
             "auto_again": "the same store again, `--seed auto` again (the seed found, not read)"}
    e, again, s, i, i2, a, a2 = (rows[_key(k, modes[0])] for k in KINDS)
    naive = rows["naive"]
    wall = lambda runs: med([r["s"] for r in runs])     # noqa: E731
    ratios = ([f"Second dump / first: {wall(again) / wall(e):.2f}"] if e else []) \
        + ([f"seeded / naive: {wall(s) / wall(naive):.2f}"] if s and naive else []) \
        + ([f"`--seed` / naive: {wall(i) / wall(naive):.2f}"] if i and naive else []) \
        + ([f"`--seed` again / `--seed` first: {wall(i2) / wall(i):.2f}"] if i and i2 else []) \
        + ([f"`--seed auto` / naive: {wall(a) / wall(naive):.2f}"] if a and naive else []) \
        + ([f"`--seed auto` again / first: {wall(a2) / wall(a):.2f}"] if a and a2 else [])
    return [f"# First dump into an empty store vs a seeded one — {card}", "",
            f"`benchmarks/seed_dump.py {' '.join(argv or sys.argv[1:])}`, "
            f"{time.strftime('%Y-%m-%d %H:%M')}; the same live process dumped with "
            f"--leave-running, medians of {runs}; weights {weights_bytes / 1e9:.2f} GB.", "",
            "| store | dump s | GB written (bytes_new) | image GB | image GB/s | image GB/s past the driver | downtime s |",
            "|---|---|---|---|---|---|---|",
            *[_row(names[k] + tag(m), rows[_key(k, m)]) for k, m in ours],
            *([f"| by hand (naive: driver + `criu dump --leave-running` into /dev/shm) | "
               f"{med([r['s'] for r in naive]):.2f} | - | "
               f"{med([r['bytes'] for r in naive]) / 1e9:.2f} | - | - | - |",
               _row("floor: the driver (huge-page window) + `criu dump --leave-running`, "
                    "its pages spliced to /dev/null; nothing stored", rows["floor"])]
              if naive else []),
            "",
            "Image GB/s past the driver: the image's bytes over the stages that move them into "
            "the store (criu_dump with the page stream, pages_finish, commit; for the floor, "
            "criu_dump), the driver's checkpoint and restore of the original left out.",
            "; ".join(ratios) + ("." if ratios else ""),
            "Stages, medians (s): " + "; ".join(
                [f"{k}{tag(m)}: {_stages(rows[_key(k, m)])}" for k, m in ours]
                + ([f"floor: {_stages(rows['floor'])}"] if rows["floor"] else [])),
            *_landing_lines([(f"{k}{tag(m)}", rows[_key(k, m)]) for k, m in ours]),
            "",
            *([f"`gpusnap seed add` (before the dump, apart): {med([x['wall_s'] for x in seeds]):.2f} s, "
               f"{seeds[0]['bytes_seeded'] / 1e9:.2f} GB of tensors in {seeds[0]['chunks']} chunks."]
              if seeds else []),
            "Runs (s): " + "; ".join(
                [f"{k}{tag(m)} " + ", ".join(f"{r['s']:.2f}" for r in rows[_key(k, m)]) for k, m in ours]
                + [f"{k} " + ", ".join(f"{r['s']:.2f}" for r in rows[k])
                   for k in ("naive", "floor") if rows[k]])]


KINDS = ("empty", "second", "seeded", "inline", "inline_again", "auto", "auto_again")   # gpusnap's rows
FOLLOWED = {"empty": ("empty", "second"), "inline": ("inline", "inline_again"),
            "auto": ("auto", "auto_again")}     # one store each


def _key(kind: str, mode: str) -> str:
    """rows' key: the kind alone for the default mode (auto), else kind@mode."""
    return kind if mode == "auto" else f"{kind}@{mode}"


def _dump(pid: int, store: str, fsync: str = "auto", *extra: str) -> dict:
    """`gpusnap dump --leave-running` of pid into store, after a sync (not timed). With
    `--seed` (extra), bytes_new counts what the seed wrote too."""
    os.sync()
    t = time.perf_counter()
    snap = gpusnap("dump", "--pid", str(pid), "--leave-running", *extra, store=store,
                   env=mode_env(fsync))
    seed = snap.get("seed") or {}
    return {"s": time.perf_counter() - t, "bytes_new": snap["bytes_new"] + seed.get("bytes_new", 0),
            "bytes_logical": snap["bytes_logical"], "downtime": snap.get("downtime"),
            "timings": snap.get("timings", {}), "seed": seed or None}


def mode_env(mode: str) -> dict:
    """The environment of a --fsync mode: MODE[:sSLOTS][:cLEVEL][:tTHREADS][:wSEEDERS][:pv|:sh][:p|:p0][:nNICE] (p: the
    page stream's slots touched during the driver's checkpoint, GPUSNAP_STREAM_PREFAULT=1;
    p0: =0; tN: GPUSNAP_THREADS=N, the page stream's workers; nN: GPUSNAP_STREAM_NICE=N,
    their niceness). Pure."""
    fsync, *more = mode.split(":")
    env = {"GPUSNAP_FSYNC": fsync}
    for part in more:
        if part[:1] == "s" and part[1:].isdigit():
            env["GPUSNAP_STREAM_SLOTS"] = part[1:]
        elif part[:1] == "c" and part[1:]:
            env["GPUSNAP_COMPRESS"] = part[1:]
        elif part[:1] == "t" and part[1:].isdigit():
            env["GPUSNAP_THREADS"] = part[1:]
        elif part[:1] == "w" and part[1:].isdigit():
            env["GPUSNAP_SEED_WORKERS"] = part[1:]
        elif part in ("pv", "sh"):
            env["GPUSNAP_STREAM_PRIVATE"] = "1" if part == "pv" else "0"
        elif part in ("p", "p0"):
            env["GPUSNAP_STREAM_PREFAULT"] = "1" if part == "p" else "0"
        elif part[:1] == "n" and part[1:].isdigit():
            env["GPUSNAP_STREAM_NICE"] = part[1:]
        else:
            raise SystemExit(f"--fsync: {mode!r}: {part!r} is none of sN, cLEVEL, tN, wN, pv, sh, p, p0, nN")
    return env


STAGES = ("cuda_checkpoint", "criu_dump", "cuda_restore", "pages_finish", "commit")
STORE_STAGES = ("criu_dump", "pages_finish", "commit")    # the image's bytes into the store


def _stages(runs: list[dict]) -> str:
    """The larger stages' medians, as `gpusnap dump --json` timed them."""
    return ", ".join(f"{k} {statistics.median([r['timings'].get(k, 0.0) for r in runs]):.2f}"
                     for k in STAGES)


def _landing_lines(named: list[tuple[str, list[dict]]]) -> list[str]:
    """Where the stream's disk time went (the dump's stream_close_s, stream_new_gb_at_close,
    stream_end_s, medians): new GB stored while CRIU sent pages, and the pace of the rest
    once it was done. Nothing for runs without them (an older gpusnap)."""
    med = statistics.median
    parts = []
    for name, runs in named:
        got = [r["timings"] for r in runs if "stream_end_s" in r.get("timings", {})]
        if not got:
            continue
        close, end = med([t["stream_close_s"] for t in got]), med([t["stream_end_s"] for t in got])
        at_close = med([t["stream_new_gb_at_close"] for t in got])
        new = med([r["bytes_new"] for r in runs]) / 1e9
        rest = (new - at_close) / (end - close) if end > close else float("nan")
        parts.append(f"{name}: {at_close:.2f} of {new:.2f} GB new stored in CRIU's {close:.2f} s "
                     f"({at_close / close if close else float('nan'):.2f} GB/s), the rest at "
                     f"{rest:.2f} GB/s in {max(0.0, end - close):.2f} s")
    return ["Stored while CRIU sent pages and after (from the first slot sent, medians): "
            + "; ".join(parts) + "."] if parts else []


def _row(name: str, runs: list[dict]) -> str:
    med = statistics.median
    wall = med([r["s"] for r in runs])
    down = [r["downtime"] for r in runs if r.get("downtime") is not None]
    store_s = med([sum(r["timings"].get(k, 0.0) for k in STORE_STAGES) for r in runs])
    logical = runs[0]["bytes_logical"] / 1e9
    return (f"| {name} | {wall:.2f} | {med([r['bytes_new'] for r in runs]) / 1e9:.2f} | "
            f"{logical:.2f} | {logical / wall:.2f} | "
            f"{logical / store_s if store_s else float('nan'):.2f} | "
            f"{med(down) if down else float('nan'):.2f} |")


def _naive(pid: int) -> dict:
    """pid's tree dumped by hand and left running (benchmarks/cold_start.py's naive dump,
    less the kill): {"s": wall seconds, "bytes": images written}."""
    from cold_start import NAIVE_IMAGES, naive_dump
    t = time.perf_counter()
    naive_dump(pid, NAIVE_IMAGES, leave="running")
    wall = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(NAIVE_IMAGES, n)) for n in os.listdir(NAIVE_IMAGES))
    shutil.rmtree(NAIVE_IMAGES, ignore_errors=True)
    return {"s": wall, "bytes": size}


def _floor(pid: int) -> dict:
    """What no dump that keeps pid's tree running goes under, the store left out: the
    driver's lock + checkpoint (in gpusnap's huge-page window, as gpusnap's own dump),
    `criu dump --leave-running` sending its pages over the page-server socket to a sink
    that splices them to /dev/null (CRIU's own pace: nothing copied into a process,
    nothing stored), the driver's restore + unlock. A row as _dump's (bytes_logical: the
    pages alone)."""
    from cold_start import holding_gpu, tree
    from dump_probe import SpliceSink, by_hand
    pids = holding_gpu(tree(pid))
    os.sync()
    r = by_hand(pid, bool(pids), FLOOR_IMAGES, SpliceSink(), leave="running", huge_pages=True,
                cuda_pids=pids)
    return {"s": r["s"], "bytes_new": 0, "bytes_logical": r["bytes"], "downtime": r["s"],
            "timings": {k: r[k] for k in ("cuda_checkpoint", "criu_dump", "cuda_restore")}}


FLOOR_IMAGES = "/dev/shm/gpusnap-bench-floor"


def _card() -> str:
    import torch
    return torch.cuda.get_device_name(0)


def _tag(card: str) -> str:
    return "h200" if "H200" in card else card.replace(" ", "_").lower()


if __name__ == "__main__":
    main()
