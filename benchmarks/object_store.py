"""Object storage: client libraries, object per chunk vs pack files, and gpusnap's push,
pull and restore of an image tree through an s3:// store vs a local store, same run.

    .venv/bin/python benchmarks/object_store.py [--mib 256] [--out FILE]

Everything runs against one S3 server process on 127.0.0.1 (moto's server mode, as the
tests use: tests/s3server.py), so the server's own speed caps every number; on the same
machine, the ratios are what carries over. Sections:

1. boto3 vs obstore: PUT then GET of 128 objects of 1 MiB, 16 requests in flight.
2. one object per 256 KiB or 1 MiB chunk vs 16 MiB pack files (restic's design), same
   bytes, boto3: what a request costs.
3. gpusnap: ingest (push) and materialise (pull) of a MIB tree (half random, half text, as
   benchmarks/encryption.py) into and from a local store and an s3:// store (chunks in
   pack files); the s3 restore from an empty cache and again from a warm
   one. Every output is compared.
4. the page stream's pattern on the s3 backend itself: forked workers, each handing
   put_many one slot of 80 chunks of 200 KB at a time (size() and claim() first, as the
   stream does), then as many forked readers get_many-ing a slot each into an empty cache.

5. packs ahead (store/backends/prefetch.py): a snapshot of MIB random bytes pulled from
   the s3:// store into an empty cache by the prefetch helper alone, by a materialise
   alone (its workers' own reads), and by both at once, as a restore does.

6. the server's own floor: GETs of 16 MiB objects (a pack's size) by 1, 4 and 16 readers
   at once, each a forked process with its own client, and the server process's CPU
   seconds per GB sent (moto serves on threads of one Python process: that bounds what
   a restore from it can pull on any host).

7. a restore's planning against the store, in a fresh process as the CLI's: open the
   store, load the snapshot by id (the "plan" stage, less the local checks), then the
   shared lock, the prefetch helper's start and stop, the unlock; milliseconds and S3
   requests (through tests/s3server.py's proxy, which counts them), beside a local store.

    --sections clients,layouts,gpusnap,stream,ahead,server,plan   which to run (default: all)
    --repo DIR    take gpusnap from DIR, an older checkout (the "before" rows of 3 and 4)
Prints markdown (and writes it to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.abspath(sys.argv[sys.argv.index("--repo") + 1]) if "--repo" in sys.argv[:-1] else REPO
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, CODE)

from s3server import S3Server  # noqa: E402

from gpusnap.model import Manifest, Target  # noqa: E402
from gpusnap.store import Repository  # noqa: E402

MIB = 1 << 20


def make_data(mib: int) -> bytes:
    rnd = random.Random(11)
    text = (b"the quick brown fox jumps over the lazy dog; " * 12000)[: MIB // 2]
    return b"".join(rnd.randbytes(MIB // 2) + text for _ in range(mib))


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.3f} GB/s ({seconds:.2f} s)"


def boto3_put_get(server, bucket: str, objects: list[bytes], prefix: str) -> tuple[float, float]:
    c = server.client()
    with ThreadPoolExecutor(16) as pool:
        t = time.perf_counter()
        list(pool.map(lambda i: c.put_object(Bucket=bucket, Key=f"{prefix}{i}", Body=objects[i]),
                      range(len(objects))))
        put = time.perf_counter() - t
        t = time.perf_counter()
        got = list(pool.map(lambda i: c.get_object(Bucket=bucket, Key=f"{prefix}{i}")["Body"].read(),
                            range(len(objects))))
        get = time.perf_counter() - t
    assert got == objects
    return put, get


def obstore_put_get(server, bucket: str, objects: list[bytes], prefix: str) -> tuple[float, float]:
    import obstore
    from obstore.store import S3Store
    store = S3Store(bucket, endpoint=server.endpoint, access_key_id=server.key_id,
                    secret_access_key=server.secret, region="us-east-1",
                    client_options={"allow_http": True})

    async def run():
        sem = asyncio.Semaphore(16)

        async def put(i):
            async with sem:
                await obstore.put_async(store, f"{prefix}{i}", objects[i])

        async def get(i):
            async with sem:
                return bytes(await (await obstore.get_async(store, f"{prefix}{i}")).bytes_async())
        t = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(len(objects))))
        p = time.perf_counter() - t
        t = time.perf_counter()
        got = await asyncio.gather(*(get(i) for i in range(len(objects))))
        g = time.perf_counter() - t
        assert got == objects
        return p, g
    return asyncio.run(run())


def clients(server, bucket: str) -> list[str]:
    objects = [os.urandom(MIB) for _ in range(128)]
    n = len(objects) * MIB
    rows = ["| client | PUT 128 x 1 MiB | GET 128 x 1 MiB |", "|---|---|---|"]
    for name, fn in (("boto3", boto3_put_get), ("obstore", obstore_put_get)):
        try:
            __import__(name)
        except ImportError:
            rows.append(f"| {name} | not installed | - |")
            continue
        best = min((fn(server, bucket, objects, f"{name}-{k}/") for k in range(3)), key=sum)
        rows.append(f"| {name} | {rate(n, best[0])} | {rate(n, best[1])} |")
    return rows


def packs(server, bucket: str) -> list[str]:
    rows = ["| layout | objects | PUT | GET |", "|---|---|---|---|"]
    total = 128 * MIB
    for label, size in (("one object per 256 KiB chunk (page-stream chunks)", MIB // 4),
                        ("one object per 1 MiB chunk", MIB), ("16 MiB pack files", 16 * MIB)):
        objects = [os.urandom(size) for _ in range(total // size)]
        best = min((boto3_put_get(server, bucket, objects, f"pack{size}-{k}/") for k in range(3)),
                   key=sum)
        rows.append(f"| {label} | {len(objects)} | {rate(total, best[0])} | {rate(total, best[1])} |")
    return rows


def same(a: str, b: str) -> bool:
    def digest(d):
        return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
                for n in sorted(os.listdir(d))}
    return digest(a) == digest(b)


def store_round(location: str, src: str, work: str, cache: str) -> dict:
    repo = Repository.open(location, cache=cache)
    with repo.shared_lock():
        t = time.perf_counter()
        files, counts = repo.ingest_dir(src)
        sid = repo.commit(Manifest(target=Target("process", 1, [1]), pids=[1], files=files, **counts))
        push = time.perf_counter() - t
    out = {"push": push, "stored": counts["bytes_stored"]}
    for label, cache_dir in (("pull", cache + "-empty"), ("pull_warm", cache + "-empty")):
        node = Repository.open(location, cache=cache_dir, create=False)
        dest = os.path.join(work, f"out-{label}-{secrets.token_hex(3)}")
        with node.shared_lock():
            t = time.perf_counter()
            node.materialise(node.load(sid), dest)
            out[label] = time.perf_counter() - t
        assert same(src, dest), f"{label}: restored bytes differ"
        shutil.rmtree(dest)
        if not location.startswith("s3://"):
            break
    return out


def gpusnap_rows(server, bucket: str, mib: int, base: str) -> list[str]:
    work = tempfile.mkdtemp(dir=base)
    try:
        src = os.path.join(work, "src")
        os.makedirs(src)
        with open(os.path.join(src, "pages-1.img"), "wb") as f:
            f.write(make_data(mib))
        logical = mib * MIB
        local = store_round(os.path.join(work, "local"), src, work, os.path.join(work, "c0"))
        remote = store_round(f"s3://{bucket}/bench", src, work, os.path.join(work, "cache"))
        rows = ["| store | push (dump ingest) | pull (restore materialise), empty cache | pull, warm cache |",
                "|---|---|---|---|",
                f"| local directory | {rate(logical, local['push'])} | {rate(logical, local['pull'])} | - |",
                f"| s3:// (moto, 127.0.0.1) | {rate(logical, remote['push'])} | "
                f"{rate(logical, remote['pull'])} | {rate(logical, remote['pull_warm'])} |"]
        rows.append(f"\nlogical {logical / MIB:.0f} MiB, stored {remote['stored'] / MIB:.0f} MiB "
                    f"(zstd level 1); rates are logical bytes per second.")
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fork_each(parts: list, fn) -> float:
    """fn(part) in a forked process per part, all at once; seconds until all are done."""
    t = time.perf_counter()
    pids = []
    for part in parts:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn(part)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids), "a worker failed"
    return time.perf_counter() - t


def _push_slots(backend, slots: int, out: str) -> None:
    """One page-stream worker: slots of 80 new 200 KB chunks; their names into out."""
    names = []
    for _ in range(slots):
        items = []
        for _ in range(80):
            data = os.urandom(200_000)
            name = Repository.chunk_name(hashlib.sha256(data).hexdigest())
            if backend.size(name) is None and backend.claim(name, len(data)) is None:
                items.append((name, data))
        backend.put_many(items)
        names.append([n for n, _d in items])
    with open(out, "w") as f:
        f.write("\n".join(" ".join(slot) for slot in names))


def stream_rows(bucket: str, workers: int, slots: int, base: str) -> list[str]:
    from gpusnap.store.backends.s3 import S3Backend
    from gpusnap.store.cache import ChunkCache
    work = tempfile.mkdtemp(dir=base)
    try:
        url = f"s3://{bucket}/stream-{secrets.token_hex(3)}"
        writer = S3Backend(url, ChunkCache(os.path.join(work, "c0")).open())
        writer.refresh("chunks/")
        outs = [os.path.join(work, f"names-{w}") for w in range(workers)]
        push = _fork_each(outs, lambda out: _push_slots(writer, slots, out))
        groups = [[line.split() for line in open(out).read().splitlines()] for out in outs]
        reader = S3Backend(url, ChunkCache(os.path.join(work, "c1")).open())
        t = time.perf_counter()
        reader.refresh("chunks/")
        pull = time.perf_counter() - t + _fork_each(
            groups, lambda g: [len(list(reader.get_many(slot))) for slot in g])
        n = workers * slots * 80 * 200_000
        return ["| code | workers | push (put_many a slot) | pull, empty cache (get_many a slot) |",
                "|---|---|---|---|",
                f"| {CODE} | {workers} | {rate(n, push)} | {rate(n, pull)} |", "",
                f"{workers * slots * 80} chunks of 200 KB, random; rates are bytes per second."]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ahead_rows(bucket: str, mib: int, base: str) -> list[str]:
    """Empty-cache pulls of one snapshot: the helper alone, the reads alone, both."""
    from conftest import commit_snapshot, write_images
    work = tempfile.mkdtemp(dir=base)
    try:
        src = write_images(os.path.join(work, "img"), {"pages-1.img": os.urandom(mib * MIB)})
        url = f"s3://{bucket}/ahead-{secrets.token_hex(3)}"
        repo = Repository.open(url, cache=os.path.join(work, "c0"))
        with repo.shared_lock():
            snap = commit_snapshot(repo, src)
        shutil.rmtree(src)
        out = {}
        for label in ("helper alone", "materialise alone", "both (a restore)"):
            node = Repository.open(url, cache=os.path.join(work, f"c-{len(out)}"), create=False)
            m = node.load(snap.id)
            t = time.perf_counter()
            if label == "helper alone":
                with node.prefetch(m, finish=True):
                    pass
            else:
                with contextlib.ExitStack() as stack:
                    if label.startswith("both"):
                        stack.enter_context(node.prefetch(m))
                    node.materialise(m, os.path.join(work, f"out-{len(out)}"))
            out[label] = time.perf_counter() - t
        return ["| pull into an empty cache | s | GB/s |", "|---|---|---|",
                *(f"| {k} | {v:.2f} | {mib * MIB / v / 1e9:.2f} |" for k, v in out.items()), "",
                f"{mib} MiB of random bytes (stored as they are); 16 requests in flight for the "
                f"helper, each reader's batch for the reads."]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _get_loop(client, bucket: str, keys: list[str]) -> None:
    """In a forked reader: each key's whole body read and dropped."""
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        while body.read(1 << 20):
            pass


def server_rows(server, bucket: str, readers: list[int], gets: int = 64, objects: int = 8) -> list[str]:
    """GETs of 16 MiB objects, `gets` a trial split among the readers, best of 3; the
    server's CPU seconds (user + system of its process) per GB sent, of the best trial.
    Each reader's client is made before the fork (and used only after it), so a trial
    times the transfers, not client creation."""
    import psutil
    size = 16 * MIB
    c = server.client()
    keys = [f"floor/{i}" for i in range(objects)]
    for key in keys:
        c.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
    proc = psutil.Process(server.proc.pid)
    rows = ["| readers at once | GETs of 16 MiB | GB/s | s a GET (each reader) | server CPU s a GB |",
            "|---|---|---|---|---|"]
    for n in readers:
        best = None
        for _ in range(3):
            parts = [(server.client(), [keys[(r + k * n) % objects] for k in range(gets // n)])
                     for r in range(n)]
            cpu = sum(proc.cpu_times()[:2])
            wall = _fork_each(parts, lambda part: _get_loop(part[0], bucket, part[1]))
            used = sum(proc.cpu_times()[:2]) - cpu
            if best is None or wall < best[0]:
                best = (wall, used)
        wall, used = best
        sent = n * (gets // n) * size
        rows.append(f"| {n} | {n * (gets // n)} | {sent / wall / 1e9:.2f} | "
                    f"{wall / (gets // n):.3f} | {used / (sent / 1e9):.2f} |")
    c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    return rows


_PLAN_CHILD = """if True:
    import os, sys, time
    t0 = time.perf_counter()
    sys.path.insert(0, sys.argv[1])
    from gpusnap.store import Repository
    repo = Repository.open(sys.argv[2], create=False, cache=sys.argv[3])
    m = repo.load_ref(sys.argv[4]) if hasattr(repo, "load_ref") else repo.load(repo.resolve(sys.argv[4]))
    t1 = time.perf_counter()
    with repo.shared_lock(), repo.prefetch(m):
        pass
    print((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)
"""


def plan_rows(server, bucket: str, base: str, runs: int = 7) -> list[str]:
    """Medians of runs, each a fresh process (imports included, as in the CLI's plan)."""
    import statistics
    import subprocess
    from conftest import commit_snapshot, write_images
    from s3server import FaultProxy
    work = tempfile.mkdtemp(dir=base)
    proxy = FaultProxy(server.port)
    try:
        src = write_images(os.path.join(work, "img"), {
            **{f"core-{i}.img": os.urandom(20000) for i in range(30)},
            "pages-1.img": os.urandom(64 * MIB)})
        url = f"s3://{bucket}/plan-{secrets.token_hex(3)}"
        local = os.path.join(work, "local")
        ids = {}
        for location in (local, url):
            repo = Repository.open(location, cache=os.path.join(work, "c0"))
            with repo.shared_lock():
                ids[location] = commit_snapshot(repo, src).id
        proxied = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
        rows = ["| store, cache | plan ms (open + load) | lock, prefetch start/stop, unlock ms | "
                "S3 requests |", "|---|---|---|---|"]
        for label, location, cache in (("local directory", local, None),
                                       ("s3://, empty cache", url, "empty"),
                                       ("s3://, warm cache", url, "warm")):
            times = []
            for run in range(runs + 1):     # the last one through the proxy, counted
                folder = os.path.join(work, f"{cache}-{run}" if cache == "empty" else str(cache))
                before = len(proxy.lines)
                out = subprocess.run([sys.executable, "-c", _PLAN_CHILD, CODE, location, folder,
                                      ids[location]], env=proxied if run == runs else os.environ,
                                     capture_output=True, text=True, check=True)
                times.append([float(x) for x in out.stdout.split()])
            rows.append(f"| {label} | {statistics.median(t[0] for t in times[:-1]):.0f} | "
                        f"{statistics.median(t[1] for t in times[:-1]):.0f} | "
                        f"{len(proxy.lines) - before} |")
        return rows + ["", f"medians of {runs} processes (then one more through a proxy that "
                       "counts the requests); a snapshot of 30 small images and 64 MiB of pages."]
    finally:
        proxy.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--sections", default="clients,layouts,gpusnap,stream,ahead,server,plan")
    ap.add_argument("--readers", default="1,4,16", help="server: readers at once, comma list")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    ap.add_argument("--repo", help="take gpusnap from this checkout")
    ap.add_argument("--out")
    args = ap.parse_args()
    sections = args.sections.split(",")
    server = S3Server()
    try:
        bucket = server.bucket()
        os.environ.update(server.env())
        lines = [f"# Object storage benchmark ({platform.node()}: CPU host, {os.cpu_count()} cores)",
                 "", f"`benchmarks/object_store.py --mib {args.mib}`; S3 server: moto "
                 "(server mode, one process, 127.0.0.1); scratch on " + args.dir + ".", ""]
        for key, title, rows in (
                ("clients", "Client libraries (16 in flight, best of 3)", lambda: clients(server, bucket)),
                ("layouts", "One object per chunk vs pack files (boto3, 16 in flight, best of 3)",
                 lambda: packs(server, bucket)),
                ("gpusnap", "gpusnap push and pull, local store vs s3:// store, same run",
                 lambda: gpusnap_rows(server, bucket, args.mib, args.dir)),
                ("stream", "The page stream's pattern on the s3 backend",
                 lambda: stream_rows(bucket, args.workers, max(1, args.mib // 16 // args.workers),
                                     args.dir)),
                ("ahead", "Packs ahead of the reads", lambda: ahead_rows(bucket, args.mib, args.dir)),
                ("server", "The server's own GET floor (16 MiB objects, forked readers, best of 3)",
                 lambda: server_rows(server, bucket, [int(n) for n in args.readers.split(",")])),
                ("plan", "A restore's planning, and the lock and prefetch start around it",
                 lambda: plan_rows(server, bucket, args.dir))):
            if key in sections:
                lines += [f"## {title}", "", *rows(), ""]
    finally:
        server.stop()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
