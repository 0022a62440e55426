"""Why does (or doesn't) a second snapshot of a GPU process dedup against the first?

    python benchmarks/dedup_probe.py [--gib 1] [--restore]

Dumps a torch_holder twice (--leave-running; with --restore, the second dump is of a
restored copy), then compares the two snapshots' page images at 4 KiB granularity: the
share of the second's pages found anywhere in the first (what ideal chunking could
dedup) next to the share of bytes the store actually found (bytes_new). Prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def cli(store, *args):
    res = subprocess.run([sys.executable, "-m", "gpusnap", "--json", "--store", store, *args],
                         cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"gpusnap {args}: {res.stderr}")
    return json.loads(res.stdout)


def page_hashes(repo, snap_id, work):
    from gpusnap.store import Repository
    r = Repository.open(repo)
    m = r.load(snap_id)
    dest = os.path.join(work, snap_id)
    r.materialise(m, dest)
    out = {}
    for entry in m.files:
        if entry.path.startswith("pages-"):
            with open(os.path.join(dest, entry.path), "rb") as f:
                while True:
                    page = f.read(4096)
                    if not page:
                        break
                    h = hashlib.blake2b(page, digest_size=12).digest()
                    out[h] = out.get(h, 0) + 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--restore", action="store_true")
    args = ap.parse_args()
    from gpusnap.workloads.torch_holder import Holder
    work = tempfile.mkdtemp(prefix="dedup-probe-", dir="/dev/shm")
    store = os.path.join(work, "store")
    h = Holder(work, gib=args.gib, mode="idle").start()
    first = cli(store, "dump", "--pid", str(h.pid), "--leave-running")
    if args.restore:
        h.stop()
        h.pid = cli(store, "restore", first["id"])["pid"]
    h.check()
    second = cli(store, "dump", "--pid", str(h.pid), "--leave-running")
    a = page_hashes(store, first["id"], work)
    b = page_hashes(store, second["id"], work)
    pages_b = sum(b.values())
    zero = hashlib.blake2b(bytes(4096), digest_size=12).digest()
    shared = sum(n for k, n in b.items() if k in a and k != zero)
    print("| probe | images GB | new GB (store) | new share | 4K pages of 2nd found in 1st |")
    print("|---|---|---|---|---|")
    print(f"| {'after restore' if args.restore else 'same process'} | {second['bytes_logical'] / 1e9:.2f} | "
          f"{second['bytes_new'] / 1e9:.3f} | {second['bytes_new'] / max(1, second['bytes_logical']):.1%} | "
          f"{shared / max(1, pages_b - b.get(zero, 0)):.1%} |")
    h.stop()


if __name__ == "__main__":
    main()
