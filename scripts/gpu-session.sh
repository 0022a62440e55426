#!/bin/bash
# Run GPU-machine steps in one go, each under its own time limit, results in $OUT.
#
#   OUT=/some/dir scripts/gpu-session.sh STEP[:SECONDS] ...
#
# Steps: gputests (pytest -m gpu tests/gpu; GPU_TEST_ARGS replaces its paths and options), tp2t (the transparent TP=2 GPU test alone), parkgpu (the one-GPU suspend/resume/standby
# GPU tests), tp2diag (the TP=2 GPU tests alone: the
# transparent dump/restore/swap test and tests/gpu/test_tp_sdk_gpu.py, ~240 s on two GPUs),
# runc (the runc + hook test alone), matbench
# (benchmarks/materialise.py), cold1b / cold8b / cold (benchmarks/cold_start.py; COLD_ARGS
# replaces its options, COLD_SIZES names cold's sizes), dedup (benchmarks/dedup_probe.py --restore), gds (benchmarks/gds.py),
# dumprace (the parallel CUDA stages and the CUDA-child-mid-dump tests alone),
# levels (benchmarks/compress_levels.py: `dump --compress` levels on bf16 weights, one core, 16 MiB),
# fsyncprobe (benchmarks/fsync_probe.py: durable chunk writes by mode; FSYNC_ARGS adds options),
# commitcost (benchmarks/commit_cost.py: fsync in the workers vs one syncfs, 4 GiB, store on /tmp),
# dumpprobe (benchmarks/dump_probe.py: where a dump's time goes, 8 GiB on the GPU; PROBE_ARGS
# replaces its options: --rows twice,twice_thp,naive,naive_thp asks whether a first
# checkpoint pays for first-touching the driver's staging memory, and what huge pages do;
# --rows naive,stream,stream_bf16,second puts `--compress bf16` beside the default; a row
# name ending in _direct (stream_direct, stream_bf16_direct) writes the chunk files with
# O_DIRECT, GPUSNAP_DIRECT_IO=1; the floors then include disk_write_direct),
# seedprobe (benchmarks/seed_probe.py server: how much of an LLM server's first snapshot
# a store seeded with its weights file would already hold; SEED_SIZE picks the size, 1b
# by default; ~1-2 min for the 1b),
# seeddump (benchmarks/seed_dump.py server: the LLM server's first dump into an empty store
# against one into a store seeded with its weights file by `gpusnap seed add`, same run,
# alternating; SEED_SIZE (8b by default), SEED_RUNS (3); ~5 min for the 8b; SEED_ARGS adds options:
# --kinds empty,inline puts `dump --seed` beside the empty store; seeddump2 is a second one in
# the same call, SEED2_SIZE (1b by default) and SEED2_ARGS in place of SEED_SIZE and SEED_ARGS),
# sdkread (benchmarks/sdk_read_probe.py: the SDK's weight read in a fresh process against the
# same process parked and resumed, and the zero-copy read of page-cache pages registered
# read-only; 16 GiB, SDKREAD_ARGS adds options; ~1.5 min),
# hostpark (benchmarks/host_park_probe.py: what keeping an SDK server's weights in pinned
# host memory while parked would cost: pinning, device<->host copies, the file registered
# read-only once; 16 GiB; ~1.5 min),
# overhead (benchmarks/daemon_overhead_probe.py: the time a command through gpusnapd spends
# around its operation: the interpreter, the client's imports, the daemon's child; ~1 min),
# slotprobe (benchmarks/slot_fault_probe.py: the copy into a page stream's fresh slots against
# touched ones, shared and private, 4 KiB and huge pages; SLOT_GIB (8); ~30 s),
# thpfill (benchmarks/thp_fill_probe.py: the ways to put a restore's bytes into another
# process in huge pages, 8 GiB, 16 workers).
# The experimental overlap of the fill with the CUDA restore (GPUSNAP_UFFD_OVERLAP=1):
# COLD_ARGS='--runs 3 --variants overlap' on cold1b / cold8b puts it beside the default
# (--variants stagingthp: the staging memory written in huge pages, GPUSNAP_STAGING_THP);
# gputests runs its GPU test (test_staging_memory_filled_during_the_cuda_restore).
# Breadth rows (benchmarks/breadth.py; each ends itself 30 s before its limit, BREADTH_ARGS
# adds options): switch, standby, diffusion (one GPU); tp2sdk (tests/gpu/test_tp_sdk_gpu.py),
# tp2 (the TP=2 row, the rehearsal of TP=4/8), tp120plan (what TP=8 120B would need), estimate
# (120B on paper from tp2's numbers), b30make / b30 / b30sdk (30B-class, 61 GB of weights;
# on the one-GPU kind's 64 GiB disk: b30sdk with BREADTH_ARGS="--store /dev/shm/gpusnap-b30",
# then b30, which removes the weights file after its cold start to make room for the store;
# run them last, b30make first).
# The 30B SDK restore through each front door, images prepared ahead (issue 18's <= 3 s: the
# CLI's 3.60 s had 1.47 s around the 2.13 s weight read, of which gpusnapd's API and `warm`
# leave out about 0.7 s: the CLI's start and exit, NVML's start in plan, materialise):
# b30make, then b30sdk with BREADTH_ARGS="--store /dev/shm/gpusnap-b30 --daemon --api --warm".
# The 70B-class TP=2 row (issue 18) on the two-GPU kind (256 GiB RAM, 128 GiB disk): its
# 145 GB of weights fit neither that disk nor /dev/shm's default half of RAM, and a
# transparent snapshot would need them twice. So SDK only, on a grown tmpfs: a command
# `mount -o remount,size=200G /dev/shm` before, then tp2 with BREADTH_ARGS="--size 70b
# --modes sdk --work /dev/shm/gpusnap-bench --runs 1" (`python3 benchmarks/breadth.py tp
# --size 70b --modes sdk --work DIR --dry-run` says what it needs and whether it fits).
# standby, diffusion and b30 (transparent) end with the naive baseline (cold_start.py's: the
# driver by hand, plain `criu dump`/`criu restore`), one round trip (--naive-runs N for more;
# BREADTH_ARGS=--no-naive leaves it out; `breadth.py ROW --dry-run` says where its images go):
# about +30 s for standby (a 1.3B server's cold start and 3.9 GB through /dev/shm), +60 s for
# diffusion (sdxl: a cold start and ~12 GB through /dev/shm), +2.5 min for b30 (~62 GB of
# images on the disk once the store is gone: 128 GiB of RAM does not hold them beside the
# checkpointed server; the whole step ~4 min: give it b30:420, in a call of its own). A row
# whose budget lacks room for its naive step records why and keeps its other numbers.
# s3row / daemonrow (benchmarks/fleet.py: the 1.3B server restored from an s3:// store on a
# moto server on 127.0.0.1 vs a local store; through gpusnapd vs the plain CLI; FLEET_SIZE
# picks the size, 1b by default, FLEET_RUNS the s3 row's runs (3; 5 took 192 s); each ~2-3
# min, give them 280 s; FLEET_ARGS adds options:
# --server rclone: `rclone serve s3` instead of moto, carried by scripts/gpu-rclone-wheels.sh;
# --s3-variants c4,c8,overlap adds empty-cache rows with 4 / 8 requests in flight and with
# the overlap, p1,p8 with one / eight prefetch helper processes, ~15 s a row and run);
# s3pull (benchmarks/s3_pull_probe.py: a snapshot's packs pulled from moto by plain GETs
# and by the prefetch helpers, 1-8 processes; PULL_MIB, 2048 by default; ~1 min). daemonrow: per run the
# CLI with no warm cache, then `gpusnap warm` through the daemon and a restore through it,
# then the CLI finding that cache; stages of each in $OUT/fleet_<card>_1b_daemon.md; it
# starts no run that would not end 40 s before its limit (240 s: ~100 s of it is building
# the model, starting the server and the dump).
#
# The GPU machine has no network and no package installs: what gpusnap needs beyond its
# Python travels in the working tree (gitignored, so name them in the device tool's carry):
#   .deps/criu   make criu-bundle          (CRIU 4.2.1 and its libraries, private prefix)
#   .deps/runc   runc + libseccomp.so.2    (tests/gpu/test_runc_gpu.py says how)
#   .whl/        wheels for the machine's Python: make gpu-wheels (scripts/gpu-wheels.sh:
#                zstandard, boto3, moto's S3 server; kvikio/ optional, by hand)
# A step that runs past its limit is stopped (SIGTERM, SIGINT for pytest steps; SIGKILL 30 s
# later) and the next one runs. Pytest steps leave $OUT/STEP.log (-rA), $OUT/STEP.xml and
# $OUT/progress.txt (each test's outcome as it ends, failures in full); GPU_TEST_TIMEOUT
# sets their per-test limit.
set -u
OUT=${OUT:-/tmp/gpusnap-out}
mkdir -p "$OUT"
# The device returns at most 8 files: at exit, more than 7 go into $OUT/all-files.tgz
# (scripts/pack-out.sh). A caller that runs this several times into subfolders of one
# $OUT runs `scripts/pack-out.sh $OUT` itself at the end.
trap '"$(dirname "$0")"/pack-out.sh "$OUT"' EXIT
SITE=/tmp/gpusnap-site
# Every wheel carried in .whl (the image has click, tqdm, pyyaml, psutil, pytest, aiohttp,
# prometheus-client: zstandard, boto3 and moto's server are what it lacks), and kvikio's
# where carried.
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    $(ls .whl/*.whl .whl/kvikio/*.whl 2>/dev/null) \
    >"$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/pip.log"; exit 1; }
# rclone for `benchmarks/fleet.py --server rclone`, where carried (scripts/gpu-rclone-wheels.sh)
if [ -f .whl/rclone.xz ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(".whl/rclone.xz"), open(sys.argv[1], "wb"))' \
        /tmp/gpusnap-rclone && chmod 755 /tmp/gpusnap-rclone && export GPUSNAP_RCLONE=/tmp/gpusnap-rclone
fi
# Byte-compiled as pip leaves an install (what the CLI imports from there: the S3 client;
# moto's server is left as it is): where the machine's environment says not to write
# bytecode, every gpusnap run against an s3:// store would compile botocore first.
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-}" >>"$OUT/pip.log"
python3 -m compileall -q -j 0 "$SITE"/botocore "$SITE"/boto3 "$SITE"/s3transfer "$SITE"/jmespath \
    "$SITE"/dateutil "$SITE"/zstandard "$PWD"/gpusnap >>"$OUT/pip.log" 2>&1 || true
# The machine's Python (itself a venv holding torch) finds gpusnap (this tree) and the
# wheels above through a .pth file in its own site-packages: the CRIU hook runs isolated
# (python -I), so PYTHONPATH would not reach it. The machine is thrown away afterwards.
printf '%s\n%s\n' "$SITE" "$PWD" >"$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/gpusnap-dev.pth"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 GPUSNAP_RESULTS=$OUT
# NVLink multicast stays off in every process (it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"

step() {
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local t0=$SECONDS
    timeout -s "${STEP_SIGNAL:-TERM}" -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}

# pytest as a step: every outcome in the log (-rA) and in $OUT/NAME.xml (JUnit, with
# each test's output), each failure in $OUT/progress.txt the moment it happens
# (tests/gpu/conftest.py), each test stopped after PER_TEST seconds where pytest-timeout
# is installed (stacks of every thread in the log), and the step's time limit sent as
# SIGINT, so pytest still prints its summary and writes the XML.
pytests() {
    local name=$1 limit=$2 per_test=$3; shift 3
    local per=()
    python3 -c 'import pytest_timeout' 2>/dev/null && per=(--timeout "$per_test" --timeout-method signal)
    STEP_SIGNAL=INT step "$name" "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
        --junitxml="$OUT/$name.xml" -o junit_logging=all ${per[@]+"${per[@]}"} "$@"
    grep -E "^(FAILED|ERROR)|Timeout|^[0-9]+ (passed|failed)" "$OUT/$name.log" | tail -n 20
}

# benchmarks/breadth.py ROW ..., its budget 30 s short of the step's limit
breadth() {
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" python3 benchmarks/breadth.py "$@" --out "$OUT" \
        --budget $((limit > 60 ? limit - 30 : limit)) ${BREADTH_ARGS:-}
}

for spec in "$@"; do
    name=${spec%%:*}
    limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
    case $name in
        gputests) pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-300}" ${GPU_TEST_ARGS:-tests/gpu} ;;
        tp2diag)  # the TP=2 GPU tests alone, the transparent one first, none stopping the rest
                  pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-180}" \
                      tests/gpu/test_gpu_park.py::test_tp2_dump_and_restore_then_onto_the_gpus_swapped \
                      tests/gpu/test_tp_sdk_gpu.py ;;
        tp2t)     pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-180}" \
                      tests/gpu/test_gpu_park.py::test_tp2_dump_and_restore_then_onto_the_gpus_swapped ;;
        parkgpu)  pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-120}" tests/gpu/test_gpu_park.py -k "not tp2" ;;
        runc)     pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-300}" tests/gpu/test_runc_gpu.py ;;
        matbench) step "$name" "$limit" python3 benchmarks/materialise.py --gib 2 --runs 3 --threads 4,8,16 --out "$OUT" ;;
        cold1b)   step "$name" "$limit" python3 benchmarks/cold_start.py --sizes 1b --out "$OUT" ${COLD_ARGS:---runs 3 --variants warm,shm,thp --sdk} ;;
        cold)     step "$name" "$limit" python3 benchmarks/cold_start.py --sizes "${COLD_SIZES:-0.5b,1.5b}" --out "$OUT" ${COLD_ARGS:---runs 2} ;;
        cold8b)   step "$name" "$limit" python3 benchmarks/cold_start.py --sizes 8b --out "$OUT" ${COLD_ARGS:---runs 2 --sdk} ;;
        dedup)    step "$name" "$limit" python3 benchmarks/dedup_probe.py --gib 1 --restore ;;
        gds)      step "$name" "$limit" python3 benchmarks/gds.py --out "$OUT" ;;
        sdkread)  step "$name" "$limit" python3 benchmarks/sdk_read_probe.py --out "$OUT" ${SDKREAD_ARGS:-} ;;
        hostpark) step "$name" "$limit" python3 benchmarks/host_park_probe.py --out "$OUT" ${HOSTPARK_ARGS:-} ;;
        overhead) step "$name" "$limit" python3 benchmarks/daemon_overhead_probe.py --out "$OUT" ${OVERHEAD_ARGS:-} ;;
        dumprace) pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-300}" tests/gpu/test_gpu_dump_race.py ;;
        dumpprobe) step "$name" "$limit" python3 benchmarks/dump_probe.py --out "$OUT" ${PROBE_ARGS:---gib 8 --runs 2} ;;
        seeddump) step "$name" "$limit" python3 benchmarks/seed_dump.py server --size "${SEED_SIZE:-8b}" --runs "${SEED_RUNS:-3}" --out "$OUT" ${SEED_ARGS:-} ;;
        seeddump2) step "$name" "$limit" python3 benchmarks/seed_dump.py server --size "${SEED2_SIZE:-1b}" --runs "${SEED_RUNS:-3}" --out "$OUT" ${SEED2_ARGS:-} ;;
        levels)   step "$name" "$limit" python3 benchmarks/compress_levels.py --mib 16 --out "$OUT" ;;
        fsyncprobe) step "$name" "$limit" python3 benchmarks/fsync_probe.py --out "$OUT" \
                  --card "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" ${FSYNC_ARGS:-} ;;
        seedprobe) step "$name" "$limit" python3 benchmarks/seed_probe.py server --size "${SEED_SIZE:-1b}" --pages --out "$OUT" ;;
        thpfill)  step "$name" "$limit" python3 benchmarks/thp_fill_probe.py --gib 8 --workers 16 --runs 2 --out "$OUT" ;;
        slotprobe) step "$name" "$limit" python3 benchmarks/slot_fault_probe.py --gib "${SLOT_GIB:-8}" --threads 4 --runs 3 \
                      --out "$OUT" --card "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" ;;
        commitcost) step "$name" "$limit" python3 benchmarks/commit_cost.py --mib 4096 --runs 3 --dir /tmp --tag h200 --out "$OUT" ;;
        switch|standby|diffusion)
                  breadth "$name" "$limit" "$name" ;;
        tp2)      breadth "$name" "$limit" tp --world 2 --size 8b --runs 1 ;;
        tp120plan) step "$name" "$limit" python3 benchmarks/breadth.py tp --world 8 --size 120b --dry-run ;;
        estimate) step "$name" "$limit" python3 benchmarks/breadth.py estimate --world 8 --out "$OUT" ;;
        tp2sdk)   pytests "$name" "$limit" "${GPU_TEST_TIMEOUT:-300}" tests/gpu/test_tp_sdk_gpu.py ;;
        b30make)  # ~61 GB of weights and a store of about as much: the other rows' models
                  # and stores go first (run the 30B steps last)
                  rm -rf /tmp/gpusnap-bench/models/{8b,1b,1.5b,0.5b,tp-*,diffusion-*} /tmp/gpusnap-bench/store*
                  step "$name" "$limit" python3 -m tests.workloads.llm_server make --size 30b --out /tmp/gpusnap-bench/models/30b ;;
        b30)      breadth "$name" "$limit" b30 --mode transparent ;;
        b30sdk)   breadth "$name" "$limit" b30 --mode sdk ;;
        s3pull)   step "$name" "$limit" python3 benchmarks/s3_pull_probe.py --mib "${PULL_MIB:-2048}" --runs 2 --out "$OUT" ;;
        s3row)    step "$name" "$limit" python3 benchmarks/fleet.py --rows s3 --size "${FLEET_SIZE:-1b}" --runs "${FLEET_RUNS:-3}" --out "$OUT" ${FLEET_ARGS:-} ;;
        daemonrow) step "$name" "$limit" python3 benchmarks/fleet.py --rows daemon --size "${FLEET_SIZE:-1b}" --runs 3 \
                      --budget $((limit > 90 ? limit - 40 : limit)) --out "$OUT" ;;
        *) echo "unknown step $name"; exit 2 ;;
    esac
done
