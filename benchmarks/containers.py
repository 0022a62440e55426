"""gpusnap container dump/restore vs. the engines' own checkpoint/restore, wall clock.

    python benchmarks/containers.py [--runs 5] [--engines docker,podman] [--mib 64] [--out DIR]

Workloads: the busybox counter of the tests (~0.2 MB of images) and, when the image
localhost/gpusnap-python exists (scripts/setup-containers.sh without --no-python-image),
a python3 holding a --mib bytearray of random data. Each row is the median of --runs,
in ms, CLI start included (what a user waits for):

    gpusnap dump            gpusnap dump NAME (the container stops)
    gpusnap restore         gpusnap restore SNAP (into the stopped container)
    gpusnap restore --name  as a new container
    gpusnap dump -R         gpusnap dump --leave-running
    native dump / restore   docker checkpoint create + start --checkpoint, or
                            podman checkpoint --export (none) + restore --import --name
                            (a docker start that fails with moby#42900's "content ...
                            already exists" is retried; the successful try is timed)

Needs root and scripts/setup-containers.sh. Prints a markdown table (and writes it to
DIR/containers.md with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
COUNTER = "i=0; while :; do i=$((i+1)); echo $i >/tmp/c.t; mv /tmp/c.t /tmp/c; sleep 0.1; done"
HOLDER = ("import os, time; b = bytearray(os.urandom({n})); "
          "open('/tmp/ready', 'w').write('1')\nwhile True: time.sleep(0.1)")


def sh(*argv, check=True):
    res = subprocess.run(list(argv), capture_output=True, text=True, env=ENV)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()[-500:]}")
    return res


def timed(*argv) -> float:
    start = time.perf_counter()
    sh(*argv)
    return (time.perf_counter() - start) * 1000


def gpusnap(store, *args) -> tuple[float, dict]:
    start = time.perf_counter()
    res = sh(sys.executable, "-m", "gpusnap", "--json", "--store", store, *args)
    return (time.perf_counter() - start) * 1000, json.loads(res.stdout)


def start(engine, workload, mib) -> str:
    name = f"gsb-{uuid.uuid4().hex[:8]}"
    if workload == "busybox":
        sh(engine, "run", "-d", "--name", name, "localhost/gpusnap-busybox", "sh", "-c", COUNTER)
        probe = ["cat", "/tmp/c"]
    else:
        code = HOLDER.format(n=mib << 20)
        sh(engine, "run", "-d", "--name", name, "localhost/gpusnap-python", "python3", "-c", code)
        probe = ["cat", "/tmp/ready"]
    for _ in range(400):
        if sh(engine, "exec", name, *probe, check=False).returncode == 0:
            return name
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not get ready")


def rm(engine, *names):
    if engine == "docker":
        sh("docker", "rm", "-f", *names, check=False)
    else:
        sh("podman", "rm", "-f", "-t", "0", *names, check=False)
    for base in ("/var/lib/containerd/tmp", "/tmp"):
        for n in os.listdir(base) if os.path.isdir(base) else []:
            if n.startswith("ctrd-checkpoint"):
                shutil.rmtree(os.path.join(base, n), ignore_errors=True)


def wait_stopped(engine, name):
    for _ in range(400):
        info = json.loads(sh(engine, "inspect", name).stdout)[0]
        if not info["State"]["Running"]:
            return
        time.sleep(0.02)


def one_run(engine, workload, mib, store, work) -> dict:
    row = {}
    name = start(engine, workload, mib)
    copy = f"{name}-copy"
    try:
        row["gpusnap dump -R"], _ = gpusnap(store, "dump", name, "--leave-running")
        row["gpusnap dump"], snap = gpusnap(store, "dump", name)
        wait_stopped(engine, name)
        row["gpusnap restore"], _ = gpusnap(store, "restore", snap["id"])
        row["gpusnap restore --name"], _ = gpusnap(store, "restore", snap["id"], "--name", copy)
        rm(engine, copy)
        if engine == "docker":
            ck = "ck" + uuid.uuid4().hex[:6]
            row["native dump"] = timed("docker", "checkpoint", "create", name, ck)
            wait_stopped(engine, name)
            for attempt in range(5):        # moby#42900, "content ... already exists"
                try:
                    row["native restore"] = timed("docker", "start", "--checkpoint", ck, name)
                    break
                except RuntimeError as e:
                    if "already exists" not in str(e) or attempt == 4:
                        raise
                    time.sleep(0.5)
        else:
            tar = os.path.join(work, f"{name}.tar")
            row["native dump"] = timed("podman", "container", "checkpoint", "--export", tar,
                                       "--compress", "none", name)
            row["native restore"] = timed("podman", "container", "restore", "--import", tar,
                                          "--name", copy)
            os.unlink(tar)
        row["images MiB"] = snap["bytes_logical"] / (1 << 20)
    finally:
        rm(engine, name, copy)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--engines", default="docker,podman")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    workloads = ["busybox"]
    if sh("docker", "image", "inspect", "localhost/gpusnap-python", check=False).returncode == 0:
        workloads.append("python")
    cols = ["gpusnap dump", "gpusnap restore", "gpusnap restore --name", "gpusnap dump -R",
            "native dump", "native restore"]
    lines = [f"| engine | workload | images MiB | {' | '.join(cols)} |",
             "|" + "---|" * (len(cols) + 3)]
    for engine in args.engines.split(","):
        for workload in workloads:
            with tempfile.TemporaryDirectory() as work:
                store = os.path.join(work, "store")
                rows = [one_run(engine, workload, args.mib, store, work) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            label = workload if workload == "busybox" else f"python {args.mib} MiB"
            lines.append(f"| {engine} | {label} | {med['images MiB']:.1f} | "
                         + " | ".join(f"{med[c]:.0f}" for c in cols) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nmedians of {args.runs} runs, ms, CLI included\n\n{table}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "containers.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
