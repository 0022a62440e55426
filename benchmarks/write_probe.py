"""How fast many writers put 1 MiB files into a chunk directory tree, by where each
file is written before its rename: all through one shared tmp/ directory (what the
chunk cache did), beside its final name (a temp name in the same chunk directory), or
straight under the final name (no rename: the floor). 16 threads, 512 files, best of 2,
then one thread through tmp/.

    python benchmarks/write_probe.py DIR          # e.g. /tmp (the disk) or /dev/shm

Prints a line a mode (GiB/s). On the H200 host's ext4 /tmp (write_probe_h200.md) the
shared tmp/ was the bottleneck: 1.69 GiB/s against 2.67 beside the final name.
"""
import os, sys, time, threading, shutil
from concurrent.futures import ThreadPoolExecutor
base = sys.argv[1]; n = 512; blob = os.urandom(1 << 20)
def run(mode, threads=16):
    root = os.path.join(base, f"wp-{mode}"); shutil.rmtree(root, ignore_errors=True)
    tmp = os.path.join(root, "tmp"); os.makedirs(tmp)
    for i in range(256): os.makedirs(os.path.join(root, "c", f"{i:02x}"))
    def one(i):
        d = os.path.join(root, "c", f"{i % 256:02x}"); final = os.path.join(d, f"{i:08d}")
        t = os.path.join(tmp if mode == "sharedtmp" else d, f"x{i}.{threading.get_ident()}")
        if mode == "direct": t = final
        with open(t, "wb") as f: f.write(blob)
        if t != final: os.rename(t, final)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex: list(ex.map(one, range(n)))
    dt = time.perf_counter() - t0; shutil.rmtree(root)
    return dt
for b in [base]:
    for mode in ("sharedtmp", "localtmp", "direct"):
        xs = [run(mode) for _ in range(2)]
        print(f"{base} {mode}: {n/1024/min(xs):.2f} GiB/s (16 threads, 1 MiB files)", flush=True)
    print(f"{base} sharedtmp 1 thread: {n/1024/run('sharedtmp',1):.2f} GiB/s", flush=True)
