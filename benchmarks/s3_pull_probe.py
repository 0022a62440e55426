"""Where an empty-cache restore from object storage spends its pull: a snapshot's packs
fetched from a real S3 server on 127.0.0.1 (moto's server mode, tests/s3server.py), by
plain GETs (the server's and the network's pace, the client's parsing only) and by the
restore's prefetch helpers (the GET, the pack's hash, every chunk written into the
node's cache), with 1, 2, 4 and 8 helper processes sharing the requests in flight.

    python benchmarks/s3_pull_probe.py --mib 2048 --runs 2 --out DIR

The snapshot is random bytes committed through the store's own ingest (no CRIU, no GPU):
what is measured is the pull alone. Rows (GB/s of packs, medians):
  get_1p_16t     one process, 16 GETs in flight, bodies read and dropped
  get_4p_4t      4 processes x 4 GETs            (what one process's GIL costs)
  get_8p_4t      8 processes x 4 GETs
  prefetch_pN    `repo.prefetch(manifest, finish=True)` with GPUSNAP_S3_PREFETCH_PROCS=N,
                 16 requests in flight (GPUSNAP_S3_CONCURRENCY), into an empty cache
  prefetch_p8_c32  the same, 8 processes, 32 in flight
and open_s: opening the store on an empty cache, loading the manifest and the pack index
(what a restore's plan pays before the first pack).
Prints a table; writes DIR/s3_pull_<tag>_<mib>mib.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _card() -> tuple[str, str]:
    try:
        import torch
        if torch.cuda.is_available():
            card = torch.cuda.get_device_name(0)
            return card, "h200" if "H200" in card else card.replace(" ", "_").lower()
    except ImportError:
        pass
    return f"CPU host ({os.cpu_count()} CPUs)", "cpu"


def _gets(server, bucket: str, keys: list[str], threads: int) -> int:
    client = server.client()
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda k: len(client.get_object(Bucket=bucket, Key=k)["Body"].read()),
                            keys))


def raw_get(server, bucket: str, keys: list[str], procs: int, threads: int) -> float:
    """Seconds to GET every key: procs forked processes, threads each."""
    t = time.perf_counter()
    if procs == 1:
        _gets(server, bucket, keys, threads)
        return time.perf_counter() - t
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _gets(server, bucket, keys[i::procs], threads)
            except BaseException:  # noqa: BLE001 - the exit code says it
                code = 1
            os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} GET processes failed")
    return time.perf_counter() - t


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gpusnap-s3pull")
    ap.add_argument("--out", default=os.environ.get("GPUSNAP_RESULTS") or
                    os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    from conftest import commit_snapshot, write_images
    from s3server import S3Server

    from gpusnap.store import Repository
    card, tag = _card()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    results: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, args.work, True)
        server = S3Server()
        stack.callback(server.stop)
        bucket = server.bucket()
        url = f"s3://{bucket}/probe"
        os.environ.update(server.env())
        src = os.path.join(args.work, "img")
        pages = os.path.join(src, "pages-1.img")
        os.makedirs(src)
        with open(pages, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        write_images(src, {"core-1.img": os.urandom(5000)})
        repo = Repository.open(url, cache=os.path.join(args.work, "cache-dump"))
        with repo.shared_lock():
            snap = commit_snapshot(repo, src)
        shutil.rmtree(src)
        shutil.rmtree(os.path.join(args.work, "cache-dump"))
        listed = [o for page in server.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="probe/packs/") for o in page.get("Contents", [])]
        keys, nbytes = [o["Key"] for o in listed], sum(o["Size"] for o in listed)
        print(f"{len(keys)} packs, {nbytes / 1e9:.2f} GB", flush=True)
        rows = [("get_1p_16t", lambda: raw_get(server, bucket, keys, 1, 16)),
                ("get_4p_4t", lambda: raw_get(server, bucket, keys, 4, 4)),
                ("get_8p_4t", lambda: raw_get(server, bucket, keys, 8, 4))]
        rows.append(("prefetch_p4_split", lambda: _prefetch(url, snap.id, args.work, 4, 16,
                                                            results, split=args.work)))
        for procs, conc in ((1, 16), (2, 16), (4, 16), (8, 16), (8, 32)):
            name = f"prefetch_p{procs}" + (f"_c{conc}" if conc != 16 else "")
            rows.append((name, lambda procs=procs, conc=conc: _prefetch(url, snap.id, args.work,
                                                                       procs, conc, results)))
        for run in range(args.runs):
            for name, fn in rows:
                s = fn()
                results.setdefault(name, []).append(s)
                print(f"run {run} {name}: {s:.2f} s, {nbytes / 1e9 / s:.2f} GB/s", flush=True)
    lines = [f"# Pulling a snapshot's packs from object storage — {card}", "",
             f"`benchmarks/s3_pull_probe.py {' '.join(argv or sys.argv[1:])}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; moto's server on 127.0.0.1, {len(keys)} packs, "
             f"{nbytes / 1e9:.2f} GB (random bytes), medians of {args.runs}. "
             f"{os.cpu_count()} CPUs.", "",
             "| row | s | GB/s |", "|---|---|---|"]
    for name, xs in results.items():
        if name.startswith("split_"):
            continue
        s = statistics.median(xs)
        unit = "-" if name == "open_s" else f"{nbytes / 1e9 / s:.2f}"
        lines.append(f"| {name} | {s:.3f} | {unit} |")
    split = {k[len("split_"):]: statistics.median(v) for k, v in results.items()
             if k.startswith("split_")}
    if split:
        lines += ["", "prefetch_p4_split: where the helpers' threads spent their time "
                  "(thread-seconds, all helpers, median run): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in split.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"s3_pull_{tag}_{args.mib}mib.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def _timed(counts: dict, key: str, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            counts[key] = counts.get(key, 0.0) + time.perf_counter() - t
    return wrapper


def _split_main(out_dir: str):
    """prefetch._main that counts, in each helper, the thread-seconds of the GET (body
    read), the pack's hash and the cache's writes, into out_dir/split-PID."""
    import hashlib
    import json

    from gpusnap.store import cache as chunk_cache
    from gpusnap.store.backends import prefetch, s3
    main = prefetch._main

    def run(fetch, packs, workers, parent):
        counts: dict = {}
        s3.S3Backend._body = _timed(counts, "get", s3.S3Backend._body)
        chunk_cache.ChunkCache.put = _timed(counts, "cache_put", chunk_cache.ChunkCache.put)
        real = hashlib.sha256
        s3.hashlib = type("H", (), {"sha256": staticmethod(_timed(counts, "sha256", real))})
        t = time.perf_counter()
        try:
            main(fetch, packs, workers, parent)
        finally:
            counts["wall"] = time.perf_counter() - t
            with open(os.path.join(out_dir, f"split-{os.getpid()}"), "w") as f:
                json.dump(counts, f)
    return run


def _prefetch(url: str, snap_id: str, work: str, procs: int, conc: int,
              results: dict, split: str | None = None) -> float:
    from gpusnap.store import Repository
    from gpusnap.store.backends import prefetch
    os.environ["GPUSNAP_S3_PREFETCH_PROCS"] = str(procs)
    os.environ["GPUSNAP_S3_CONCURRENCY"] = str(conc)
    cache = os.path.join(work, "cache-pull")
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    repo = Repository.open(url, create=False, cache=cache)
    m = repo.load(snap_id)
    repo.prepare_reads()
    t1 = time.perf_counter()
    results.setdefault("open_s", []).append(t1 - t0)
    real_main = prefetch._main
    if split:
        for name in os.listdir(split):
            if name.startswith("split-"):
                os.unlink(os.path.join(split, name))
        prefetch._main = _split_main(split)
    try:
        with repo.prefetch(m, finish=True) as ahead:
            assert ahead is not None and len(ahead.pids) == min(procs, ahead.packs)
    finally:
        prefetch._main = real_main
    took = time.perf_counter() - t1
    if split:
        import json
        total: dict = {}
        for name in os.listdir(split):
            if name.startswith("split-"):
                with open(os.path.join(split, name)) as f:
                    for k, v in json.load(f).items():
                        total[k] = total.get(k, 0.0) + v
        for k, v in total.items():
            results.setdefault(f"split_{k}", []).append(v)
    return took


if __name__ == "__main__":
    main()
