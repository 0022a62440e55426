"""Cold start vs. naive CRIU+CUDA restore vs. gpusnap restore, side by side on one card.

    python benchmarks/cold_start.py --sizes 1b,8b --runs 3 --out DIR
    gpusnap bench [--size tiny]          # the same, small, from a source checkout

For each model size: cold start to first token (process start, imports, safetensors
load, warm-up); gpusnap dump (time, stored and new bytes, a second snapshot's new bytes);
gpusnap restore to first token (per stage); the naive baseline (CRIU + CUDA checkpoint API
into a plain images dir, `criu restore` + CUDA restore); and the floors of this machine
(pinned host-to-device, parallel memcpy, disk read). Medians of --runs. Writes
DIR/cold_start_<card>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

# The checkout: the children run `python -m gpusnap ...` and `python -m tests.workloads...`.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.workloads.llm_server import PROMPT  # noqa: E402

PORT = 18090


def sh(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def gpusnap(*args, store, env=None):
    res = sh([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args], cwd=REPO,
             env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise RuntimeError(f"gpusnap {args}: {res.returncode} {res.stderr[-2000:]}")
    return json.loads(res.stdout)


def http(path, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def first_token():
    return http("/generate", {"ids": PROMPT, "max_new_tokens": 1})["ids"]


def wait_gone(pids, timeout=60):
    import psutil
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.01)


def tree(pid):
    import psutil
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [pid]


def kill_tree(pids):
    """SIGKILL the pids and wait until they are gone; those that are this process's
    children are reaped (a server started here: unreaped, its zombie would hold the wait
    for its whole minute)."""
    for p in pids:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.waitpid(p, 0)
        except ChildProcessError:
            pass
    wait_gone(pids)


def start_server(model_dir, state, extra=()):
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    log = open(os.path.join(state, "log"), "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tests.workloads.llm_server", "serve",
                             "--model", model_dir, "--port", str(PORT), "--state", state, *extra],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    ready = os.path.join(state, "ready")
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise RuntimeError(open(os.path.join(state, "log")).read()[-3000:])
        time.sleep(0.01)
    tokens = first_token()
    t = time.perf_counter() - t0
    info = json.load(open(ready))
    return proc, t, tokens, info


# ---- floors -----------------------------------------------------------------------
def floor_pinned_h2d(gib=4):
    import torch
    n = gib << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * n / (time.perf_counter() - t) / 1e9


def floor_memcpy(gib=4, threads=8):
    n = gib << 30
    src = ctypes.create_string_buffer(n)
    dst = ctypes.create_string_buffer(n)
    ctypes.memset(src, 1, n)
    ctypes.memset(dst, 2, n)
    part = n // threads

    def one(i):
        ctypes.memmove(ctypes.addressof(dst) + i * part, ctypes.addressof(src) + i * part, part)

    out = {}
    for k in (1, threads):
        t = time.perf_counter()
        if k == 1:
            ctypes.memmove(dst, src, n)
        else:
            ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
            [x.start() for x in ts]
            [x.join() for x in ts]
        out[k] = n / (time.perf_counter() - t) / 1e9
    return out


def floor_disk_write(directory, gib=4, writers=8, sync=True, direct=False):
    """GB/s of writing gib GiB of incompressible data, split over writers files written
    at once, each fsynced (sync): what a durable store on this disk can take at most.
    direct: through O_DIRECT (no page cache; whether the disk takes more that way)."""
    import concurrent.futures
    import mmap
    block = mmap.mmap(-1, 16 << 20)         # page-aligned, as O_DIRECT wants
    block.write(os.urandom(16 << 20))
    per = int(gib * (1 << 30)) // writers

    def one(i):
        path = os.path.join(directory, f"floor-write-{i}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags, 0o600)
        try:
            for _ in range(per // len(block)):
                os.write(fd, block)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
    os.makedirs(directory, exist_ok=True)
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        list(pool.map(one, range(writers)))
    return per * writers / (time.perf_counter() - t) / 1e9


def floor_disk(path):
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        cold = True
    except OSError:
        cold = False
    n, t = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(64 << 20)
            if not b:
                break
            n += len(b)
    return n / (time.perf_counter() - t) / 1e9, cold


# ---- dumps ---------------------------------------------------------------------------
def more_dumps(row, size, snap_id, pid, store, work, runs, staged=True, compress=None):
    """First dumps of the (restored) server into fresh stores until there are `runs` of
    them, then one with --pages staged (unless not staged), then `runs` with --compress
    compress (where given); each time the server comes back from snap_id. Leaves the last
    restored server's pid in row["_pid"]."""
    row["dump_runs"] = [{"s": row["dump_s"], "stages": row["dump_stages"]}]
    fresh = os.path.join(work, "fresh-store")
    for pages in (["stream"] * (runs - 1) + (["staged"] if staged else [])
                  + ([f"compress:{compress}"] * runs if compress else [])):
        shutil.rmtree(fresh, ignore_errors=True)
        pids = tree(pid)
        opts = ["--compress", compress] if pages.startswith("compress:") else ["--pages", pages]
        t = time.perf_counter()
        out = gpusnap("dump", "--pid", str(pid), *opts, store=fresh)
        took = time.perf_counter() - t
        wait_gone(pids)
        run = {"s": took, "stages": out["timings"], "pages": pages, "downtime": out.get("downtime")}
        key = {"stream": "dump_runs", "staged": "dump_staged"}.get(pages, "dump_compress")
        row.setdefault(key, []).append(run)
        note(size=size, step=f"dump_{pages}", **run)
        shutil.rmtree(fresh, ignore_errors=True)
        pid = gpusnap("restore", snap_id, store=store)["pid"]
        first_token()
    row["_pid"] = pid


def restore_to_first_token(snap_id, store, env, expected):
    """`gpusnap restore` of snap_id, then the first answer (checked against expected).
    Returns (the restored pid, the run's times: total, the CLI, the first token, the
    restore's stages, its fill and materialise figures)."""
    t0 = time.perf_counter()
    res = gpusnap("restore", snap_id, store=store, env=env)
    t1 = time.perf_counter()
    tokens = first_token()
    t2 = time.perf_counter()
    assert tokens == expected, (tokens, expected)
    return res["pid"], {"total": t2 - t0, "restore_cli": t1 - t0, "first_token": t2 - t1,
                        **res["timings"], "page_path": res.get("page_path"),
                        **{f"fill_{k}": v for k, v in (res.get("fill") or {}).items()
                           if isinstance(v, (int, float))},
                        **{f"mat_{k}": v for k, v in (res.get("materialise") or {}).items()
                           if isinstance(v, (int, float))}}


def compressed_restores(row, size, pid, work, runs, codec, expected):
    """The restore's price of a codec: the running server (pid) dumped with `--compress
    codec` into a store of its own (chunk ids are of the plain bytes: in the main store
    every chunk would be found, none encoded), then `runs` restores from it to the first
    token, as the default's rows (row["gpusnap_restore_compress_CODEC"]). The store is
    removed after; returns the last restored server's pid."""
    coded = os.path.join(work, f"store-{codec}")
    shutil.rmtree(coded, ignore_errors=True)
    pids = tree(pid)
    snap = gpusnap("dump", "--pid", str(pid), "--compress", codec, store=coded)
    wait_gone(pids)
    row[f"dump_compress_{codec}_bytes_stored"] = snap["bytes_stored"]
    out = []
    for i in range(runs):
        if i:
            kill_tree(tree(pid))
        pid, run = restore_to_first_token(snap["id"], coded, {}, expected)
        out.append(run)
        note(size=size, step=f"gpusnap_restore_compress_{codec}", **out[-1])
    row[f"gpusnap_restore_compress_{codec}"] = out
    shutil.rmtree(coded, ignore_errors=True)
    return pid


# ---- naive baseline ------------------------------------------------------------------
# What one gets by hand, no gpusnap: the driver's lock + checkpoint of every CUDA process
# of the tree, a plain `criu dump` into a directory (on /dev/shm: nothing stored, nothing
# hashed), then a plain `criu restore`, the driver's restore + unlock, the first answer.
# benchmarks/breadth.py puts the same beside its rows.
NAIVE_IMAGES = "/dev/shm/gpusnap-bench-naive"


def holding_gpu(pids):
    """Those of pids with a /dev/nvidia* open (the CUDA processes of a tree)."""
    from gpusnap.cuda.discover import holds_nvidia_fd
    return [p for p in pids if holds_nvidia_fd(p)]


def naive_dump(pid, images, timeout=None, leave="killed"):
    """The tree of pid dumped by hand into images (emptied first) and killed (leave=
    "running": left running, its CUDA restored and unlocked after CRIU): (its pids, those
    holding /dev/nvidia*). timeout: seconds CRIU may take."""
    from gpusnap.criu import runner
    from gpusnap.criu.argv import CriuOptions
    from gpusnap.cuda.session import CudaSession
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    pids = tree(pid)
    cuda_pids = holding_gpu(pids)
    s = CudaSession(cuda_pids, huge_pages=False)    # by hand: the host's THP mode as it is
    s.lock_all(10_000)
    s.checkpoint_all()
    runner.dump(pid, images, CriuOptions(), leave=leave, timeout=timeout)
    if leave == "running":
        s.restore_all()
        s.unlock_all()
    return pids, cuda_pids


def naive_restore(images, cuda_pids, probe=first_token, between=None, timeout=None):
    """`criu restore` from images, then the driver's restore + unlock of cuda_pids, then
    probe() (the first answer): (root pid, answer, seconds of each and their total).
    between(pid): called while CUDA is still checkpointed (what a standby is), its dict
    joins the stages and its time counts in none of them."""
    from gpusnap.criu import runner
    from gpusnap.criu.argv import CriuOptions
    from gpusnap.cuda.session import CudaSession
    t0 = time.perf_counter()
    pid = runner.restore(images, CriuOptions(), timeout=timeout)
    t1 = time.perf_counter()
    extra = between(pid) if between else {}
    t2 = time.perf_counter()
    s = CudaSession(cuda_pids)
    s.restore_all(None)
    s.unlock_all()
    t3 = time.perf_counter()
    answer = probe()
    t4 = time.perf_counter()
    return pid, answer, {"criu_restore": t1 - t0, "cuda_restore+unlock": t3 - t2, "first_token": t4 - t3,
                         "total": (t1 - t0) + (t4 - t2), **extra}


def note(**kw):
    """One JSON line per finished step, so a run cut short still says what it measured."""
    print(json.dumps(kw, default=str), flush=True)


def med(xs):
    return statistics.median(xs) if xs else None


THP = "/sys/kernel/mm/transparent_hugepage/enabled"


@contextlib.contextmanager
def env_set(name: str, value: str):
    """The environment variable name set to value for the block, as it was after (the
    processes the block starts inherit it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def thp_mode(mode):
    """Transparent huge pages for anonymous memory set to mode (None: leave as is)."""
    if mode is None:
        yield
        return
    old = open(THP).read().split("[")[1].split("]")[0]
    with open(THP, "w") as f:
        f.write(mode)
    try:
        yield
    finally:
        with open(THP, "w") as f:
            f.write(old)


def bench_size(size, runs, work, store, args_variants=("warm",), sdk=False, staged=True,
               compress=None, restore_compress=None):
    model_dir = os.path.join(work, "models", size)
    state = os.path.join(work, "state")
    row = {"size": size}
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        t = time.perf_counter()
        r = sh([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size", size,
                "--out", model_dir], cwd=REPO)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        row["make_s"] = time.perf_counter() - t
    row["weights_bytes"] = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    row["disk_read_gbs"], row["disk_read_cold"] = floor_disk(os.path.join(model_dir, "model.safetensors"))

    cold, expected = [], None
    for i in range(runs):
        proc, t, tokens, info = start_server(model_dir, state)
        cold.append(t)
        expected = expected or tokens
        assert tokens == expected
        if i < runs - 1:
            kill_tree(tree(proc.pid))
            proc.wait()
    row["cold_start_s"] = cold
    row["server_load_s"] = info["load_s"]
    note(size=size, step="cold", cold_start_s=cold, load_s=info["load_s"], warm_s=info["warm_s"],
         disk_read_gbs=row["disk_read_gbs"])

    # gpusnap dump (the server from the last cold run) and a second snapshot after a restore
    pid = proc.pid
    pids = tree(pid)
    t = time.perf_counter()
    snap = gpusnap("dump", "--pid", str(pid), "--name", f"llm-{size}", store=store)
    row["dump_s"] = time.perf_counter() - t
    proc.wait()
    wait_gone(pids)
    row["dump_stages"] = snap["timings"]
    row["dump_downtime_s"] = snap.get("downtime")   # locked or frozen, until committed
    row["bytes_logical"], row["bytes_stored"], row["bytes_new"] = (
        snap["bytes_logical"], snap["bytes_stored"], snap["bytes_new"])
    note(size=size, step="dump", dump_s=row["dump_s"], stages=snap["timings"],
         downtime_s=row["dump_downtime_s"],
         bytes_logical=snap["bytes_logical"], bytes_new=snap["bytes_new"])

    # "": the default (the uffd page path where the host has userfaultfd); criu: CRIU
    # writes the pages (--pages criu); warm: criu pages from `gpusnap warm`'s image cache;
    # shm: criu pages, images on /dev/shm (4 KiB pages) instead of gpusnap's huge-page
    # tmpfs; thp: the default with THP=always during restore; overlap: the default with
    # the driver's staging memory placed while its CUDA restore reads it; stagingthp: the
    # default with the staging memory written in huge pages (GPUSNAP_STAGING_THP);
    # nostagingthp: with it off
    criu = {"GPUSNAP_PAGES": "criu"}
    known = {"criu": (criu, None), "warm": (criu, None),
             "overlap": ({"GPUSNAP_UFFD_OVERLAP": "1"}, None),
             "stagingthp": ({"GPUSNAP_STAGING_THP": "1"}, None),
             "nostagingthp": ({"GPUSNAP_STAGING_THP": "0"}, None),
             "shm": ({**criu, "GPUSNAP_WORKDIR": "/dev/shm/gpusnap-bench"}, None),
             "thp": ({}, "always")}
    variants = {"": ({}, None), **{v: known[v] for v in args_variants}}
    restores, last_pid = {}, None
    for label, (env, thp) in variants.items():
        if label == "warm":
            t = time.perf_counter()
            gpusnap("warm", snap["id"], "--pages", "criu", store=store)
            row["warm_s"] = time.perf_counter() - t
        elif "warm" in restores:
            gpusnap("warm", "--drop", store=store)
        with thp_mode(thp):
            out = []
            for i in range(runs):
                if last_pid:
                    kill_tree(tree(last_pid))
                last_pid, run = restore_to_first_token(snap["id"], store, env, expected)
                out.append(run)
                note(size=size, step=f"gpusnap_restore{'_' + label if label else ''}", **out[-1])
        restores[label] = out
    if restore_compress:
        last_pid = compressed_restores(row, size, last_pid, work, runs, restore_compress, expected)
    more_dumps(row, size, snap["id"], last_pid, store, work, runs, staged, compress)
    t = time.perf_counter()
    second = gpusnap("dump", "--pid", str(row.pop("_pid")), "--name", f"llm-{size}-2", store=store)
    row["second_dump_s"] = time.perf_counter() - t
    row["second_dump_stages"] = second["timings"]
    note(size=size, step="second_dump", dump_s=row["second_dump_s"], bytes_new=second["bytes_new"],
         stages=second["timings"])
    wait_gone(pids)
    row["second_bytes_new"] = second["bytes_new"]
    row["second_bytes_logical"] = second["bytes_logical"]
    # only its new bytes were wanted: give the disk back (an 8B server's snapshot is ~17 GB)
    gpusnap("rm", second["id"], store=store)
    gpusnap("gc", store=store)
    row["gpusnap_restore"] = restores.pop("")
    for label, out in restores.items():
        row[f"gpusnap_restore_{label}"] = out

    # naive baseline: restart a server, plain CRIU + CUDA API
    proc, _, _, _ = start_server(model_dir, state)
    images = NAIVE_IMAGES                   # the naive dump's images live in /dev/shm
    t = time.perf_counter()
    pids, cuda_pids = naive_dump(proc.pid, images)
    row["naive_dump_s"] = [time.perf_counter() - t]
    proc.wait()
    wait_gone(pids)
    for label, thp in ([("", None), ("thp", "always")] if "thp" in args_variants else [("", None)]):
        naive = []
        with thp_mode(thp):
            for i in range(runs):
                pid, tokens, stages = naive_restore(images, cuda_pids)
                assert tokens == expected
                naive.append(stages)
                note(size=size, step=f"naive_restore{'_' + label if label else ''}", **stages)
                if not label and i < runs - 1:     # again: the naive dump, timed, same server
                    t = time.perf_counter()
                    pids, cuda_pids = naive_dump(pid, images)
                    row["naive_dump_s"].append(time.perf_counter() - t)
                    note(size=size, step="naive_dump", dump_s=row["naive_dump_s"][-1])
                    wait_gone(pids)
                else:
                    kill_tree(tree(pid))
        row["naive_restore" + ("_" + label if label else "")] = naive
    shutil.rmtree(images, ignore_errors=True)
    if sdk:
        try:
            row["sdk"] = bench_sdk(size, runs, model_dir, state, store, expected)
        except Exception as e:  # noqa: BLE001 - the other rows stand; say what broke
            row["sdk"] = {"error": f"{type(e).__name__}: {e}"}
            note(size=size, step="sdk", error=row["sdk"]["error"])
    return row


# ---- gpusnap + SDK (issue 7) ------------------------------------------------------------
def bench_sdk(size, runs, model_dir, state, store, expected):
    """The same server with --sdk: dump drops the weights (prepare), restore reads them back
    from model.safetensors (resume) before the first token."""
    out, alive = {}, []
    try:
        return _bench_sdk(size, runs, model_dir, state, store, expected, out, alive)
    finally:
        for pid in alive:
            kill_tree(tree(pid))


def _bench_sdk(size, runs, model_dir, state, store, expected, out, alive):
    proc, t, tokens, info = start_server(model_dir, state, extra=["--sdk"])
    alive.append(proc.pid)
    assert tokens == expected, (tokens, expected)
    out["cold_start_s"], out["enable_s"] = t, info.get("sdk_enable_s")
    out["backend"] = (info.get("sdk") or {}).get("backend")
    pids = tree(proc.pid)
    t = time.perf_counter()
    snap = gpusnap("dump", "--pid", str(proc.pid), "--name", f"llm-{size}-sdk", store=store)
    out["dump_s"] = time.perf_counter() - t
    proc.wait()
    wait_gone(pids)
    out["dump_stages"] = snap["timings"]
    out["bytes_logical"], out["bytes_stored"] = snap["bytes_logical"], snap["bytes_stored"]
    out["bytes_out_of_image"] = (snap.get("sdk") or {}).get("bytes_out_of_image")
    out["notes"] = snap.get("notes")
    note(size=size, step="sdk_dump", dump_s=out["dump_s"], stages=snap["timings"],
         bytes_logical=snap["bytes_logical"], bytes_out_of_image=out["bytes_out_of_image"])
    last = None
    for key, env in (("restore", {}), ("restore_criu", {"GPUSNAP_PAGES": "criu"})):
        restores = []
        for i in range(runs):
            if last:
                kill_tree(tree(last))
            t0 = time.perf_counter()
            res = gpusnap("restore", snap["id"], store=store, env=env)
            t1 = time.perf_counter()
            alive.append(res["pid"])
            tokens = first_token()
            t2 = time.perf_counter()
            assert tokens == expected, (tokens, expected)
            last = res["pid"]
            restores.append({"total": t2 - t0, "restore_cli": t1 - t0, "first_token": t2 - t1,
                             **res["timings"], "sdk_gbps": (res.get("sdk") or {}).get("gbps")})
            out["readers"] = (res.get("sdk") or {}).get("readers")
            note(size=size, step=f"sdk_{key}", page_path=res.get("page_path"), **restores[-1])
        out[key] = restores
    kill_tree(tree(last))
    return out


def summarise_sdk(rows):
    rows = [r for r in rows if r.get("sdk")]
    if not rows:
        return []
    lines = ["", "gpusnap + SDK (the server runs `llm_server serve --sdk`: dump drops its weights, "
             "restore reads them back from model.safetensors before the first token):", "",
             "| size | gpusnap + SDK restore s | x cold | x naive | x gpusnap | dump s | images GB | "
             "weights out of image GB | reader | resume GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["sdk"]
        if "error" in x:
            lines.append(f"| {r['size']} | failed: {x['error'][:200]} |")
            continue
        cold = med(r["cold_start_s"])
        naive = med([y["total"] for y in r["naive_restore"]])
        gs = med([y["total"] for y in r["gpusnap_restore"]])
        sd = med([y["total"] for y in x["restore"]])
        if x.get("restore_criu"):
            sc = med([y["total"] for y in x["restore_criu"]])
            lines.append(f"| {r['size']} (--pages criu) | {sc:.2f} | {cold/sc:.1f} | {naive/sc:.2f} | "
                         f"{gs/sc:.2f} | | | | | |")
        lines.append(f"| {r['size']} | {sd:.2f} | {cold/sd:.1f} | {naive/sd:.2f} | {gs/sd:.2f} | "
                     f"{x['dump_s']:.2f} | {x['bytes_logical']/1e9:.2f} | "
                     f"{(x['bytes_out_of_image'] or 0)/1e9:.2f} | {', '.join(x.get('readers') or [])} | "
                     f"{med([y['sdk_gbps'] for y in x['restore'] if y.get('sdk_gbps')]) or 0:.1f} |")
    lines += ["", "gpusnap + SDK stages (median s):", ""]
    for r in rows:
        x = r["sdk"]
        if "error" in x:
            continue
        keys = [k for k in _numbers(x["restore"][0]) if k != "sdk_gbps"]
        lines.append(f"- {r['size']} restore: " + ", ".join(
            f"{k} {med([y[k] for y in x['restore']]):.3f}" for k in keys))
        lines.append(f"- {r['size']} dump: " + ", ".join(f"{k} {v:.3f}" for k, v in x["dump_stages"].items()))
        lines.append(f"- {r['size']} cold start with --sdk: {x['cold_start_s']:.2f} s "
                     f"(enable {x['enable_s'] or 0:.2f} s); reader: {(x.get('backend') or {}).get('reason')}")
    return lines


def summarise(rows, floors, card):
    lines = [f"# Cold start vs restore — {card}", "",
             f"Floors on this machine: pinned H2D {floors['pinned_h2d_gbs']:.1f} GB/s, "
             f"memcpy 1 thread {floors['memcpy_gbs']['1']:.1f} GB/s, 8 threads {floors['memcpy_gbs']['8']:.1f} GB/s; "
             f"writing to the store's disk with fsync {floors.get('disk_write_fsync_gbs', 0):.2f} GB/s; "
             "reading the weights file: " + ", ".join(
                 f"{r['size']} {r['disk_read_gbs']:.2f} GB/s ({'page cache dropped' if r.get('disk_read_cold') else 'cache not dropped'})"
                 for r in rows) + ".",
             "", "| size | weights GB | cold start s | naive restore s | gpusnap restore s | x cold | x naive | "
             "dump s | images GB | stored GB | 2nd snapshot new GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cold = med(r["cold_start_s"])
        naive = med([x["total"] for x in r["naive_restore"]])
        gs = med([x["total"] for x in r["gpusnap_restore"]])
        lines.append(f"| {r['size']} | {r['weights_bytes']/1e9:.2f} | {cold:.2f} | {naive:.2f} | {gs:.2f} | "
                     f"{cold/gs:.1f} | {naive/gs:.2f} | {r['dump_s']:.2f} | {r['bytes_logical']/1e9:.2f} | "
                     f"{r['bytes_stored']/1e9:.2f} | {r['second_bytes_new']/1e9:.3f} |")
    for r in rows:
        if r.get("gpusnap_restore_warm"):
            lines.append(f"\n{r['size']}: gpusnap restore from a warm image cache (`gpusnap warm`, "
                         f"{r.get('warm_s', 0):.2f} s once): "
                         f"{med([x['total'] for x in r['gpusnap_restore_warm']]):.2f} s to first token")
    lines += ["", "gpusnap restore stages (median s):", ""]
    for r in rows:
        keys = _numbers(r["gpusnap_restore"][0])
        lines.append(f"- {r['size']}: " + ", ".join(f"{k} {med([x[k] for x in r['gpusnap_restore']]):.3f}"
                                                    for k in keys))
        keys = _numbers(r["naive_restore"][0])
        lines.append(f"- {r['size']} naive: " + ", ".join(f"{k} {med([x[k] for x in r['naive_restore']]):.3f}"
                                                          for k in keys))
        lines.append(f"- {r['size']} dump: downtime {r.get('dump_downtime_s') or 0:.3f}, "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r["dump_stages"].items()))
        for key in sorted(k for k in r if k.startswith(("gpusnap_restore_", "naive_restore_"))):
            lines.append(f"- {r['size']} {key}: total {med([x['total'] for x in r[key]]):.3f} s, " + ", ".join(
                f"{k} {med([x[k] for x in r[key]]):.3f}" for k in _numbers(r[key][0])))
    lines += summarise_dumps(rows)
    lines += summarise_sdk(rows)
    return "\n".join(lines) + "\n"


def summarise_dumps(rows) -> list[str]:
    """Dump beside the naive dump (driver lock + checkpoint, criu dump into /dev/shm)."""
    lines = ["", "Dump, same run (wall s, medians; first dumps into an empty store; images GB/s = "
             "image bytes / gpusnap dump wall):", "",
             "| size | naive dump s | gpusnap dump s (streamed) | --pages staged s | gpusnap / naive | "
             "images GB/s | downtime s | second dump s (same store) | second / first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "dump_runs" not in r:
            continue
        first = med([x["s"] for x in r["dump_runs"]])
        naive = med(r.get("naive_dump_s") or [])
        staged = med([x["s"] for x in r.get("dump_staged", [])])
        down = med([x["downtime"] for x in r["dump_runs"] if x.get("downtime") is not None])
        second = r.get("second_dump_s")
        f = lambda v, fmt="{:.2f}": fmt.format(v) if v is not None else "-"      # noqa: E731
        lines.append(f"| {r['size']} | {f(naive)} | {f(first)} | {f(staged)} | "
                     f"{f(first / naive if naive else None)} | {f(r['bytes_logical'] / 1e9 / first)} | "
                     f"{f(down)} | {f(second)} | {f(second / first if second else None)} |")
    for r in rows:
        comp = r.get("dump_compress")
        if comp:
            first, naive = med([x["s"] for x in comp]), med(r.get("naive_dump_s") or [])
            lines.append(f"- {r['size']} `dump --compress {comp[0]['pages'].split(':', 1)[1]}` "
                         f"into an empty store, median of {len(comp)}: {first:.2f} s"
                         + (f" ({first / naive:.2f} of the naive dump)" if naive else "")
                         + "; runs " + ", ".join(f"{x['s']:.2f}" for x in comp))
    for r in rows:
        for run in r.get("dump_runs", []) + r.get("dump_staged", []) + r.get("dump_compress", []):
            lines.append(f"- {r['size']} dump ({run.get('pages', 'stream')}, {run['s']:.2f} s): " +
                         ", ".join(f"{k} {v:.3f}" for k, v in run["stages"].items()
                                   if isinstance(v, (int, float))))
    return lines


def _numbers(row: dict) -> list[str]:
    """The keys of a row's numeric stage figures (not its total, not labels)."""
    return [k for k, v in row.items() if k != "total" and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="warm",
                    help="comma list of extra restore rows: warm (after `gpusnap warm`), shm "
                         "(images on /dev/shm, 4 KiB pages), thp (THP=always, naive too), "
                         "overlap (GPUSNAP_UFFD_OVERLAP=1: staging memory filled during the "
                         "CUDA restore), stagingthp (GPUSNAP_STAGING_THP=1: staging memory "
                         "written in huge pages), nostagingthp (GPUSNAP_STAGING_THP=0)")
    ap.add_argument("--sdk", action="store_true",
                    help="also the same server with gpusnap.sdk (weights out of the snapshot)")
    ap.add_argument("--no-staged", dest="staged", action="store_false",
                    help="leave out the `dump --pages staged` row (39 s for the 8b)")
    ap.add_argument("--dump-compress", default=None, metavar="CODEC",
                    help="also `runs` first dumps with `dump --compress CODEC` (e.g. bf16) "
                         "into empty stores, beside the default's")
    ap.add_argument("--restore-compress", default=None, metavar="CODEC",
                    help="also `runs` restores of the server dumped with `--compress CODEC` "
                         "into a store of its own (what a codec costs a restore)")
    ap.add_argument("--work", default="/tmp/gpusnap-bench")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    import torch
    card = torch.cuda.get_device_name(0)
    store = os.path.join(args.work, "store")
    os.makedirs(args.work, exist_ok=True)
    mc = floor_memcpy()
    floors = {"pinned_h2d_gbs": floor_pinned_h2d(), "memcpy_gbs": {str(k): v for k, v in mc.items()},
              "disk_write_fsync_gbs": floor_disk_write(args.work)}
    note(step="floors", **floors)
    rows = []
    for size in args.sizes.split(","):
        variants = [v for v in args.variants.split(",") if v]
        rows.append(bench_size(size, args.runs, args.work, store, variants, args.sdk,
                               args.staged, args.dump_compress, args.restore_compress))
        print(summarise(rows, floors, card), flush=True)
    tag = "h200" if "H200" in card else "h100" if "H100" in card else card.replace(" ", "_").lower()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cold_start_{tag}_{'_'.join(args.sizes.split(','))}")
    with open(base + ".json", "w") as f:
        json.dump({"card": card, "floors": floors, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(summarise(rows, floors, card))
    return base + ".md"


if __name__ == "__main__":
    main()
