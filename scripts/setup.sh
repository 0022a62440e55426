#!/usr/bin/env bash
# `make setup`: idempotent. CRIU >= 4.1 (private prefix when the host's is missing or old),
# then .venv/ with gpusnap installed editable. Run as root on Debian 12 (or Ubuntu 24.04).
set -euo pipefail
cd "$(dirname "$0")/.."
CRIU_PREFIX=${CRIU_PREFIX:-/opt/gpusnap/criu}

criu_ok() {
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 4 ] || { [ "$1" -eq 4 ] && [ "$2" -ge 1 ]; }
}

if command -v criu >/dev/null && criu_ok "$(command -v criu)"; then
    echo "setup: criu ok: $(command -v criu) ($(criu --version | head -1))"
else
    if [ "$(id -u)" != 0 ]; then echo "setup: CRIU >= 4.1 missing and not root: run as root" >&2; exit 1; fi
    bash scripts/install-criu.sh "$CRIU_PREFIX"
    ln -sf "$CRIU_PREFIX/bin/criu" /usr/local/sbin/criu
    echo "setup: criu linked at /usr/local/sbin/criu"
fi

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
    fi
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
# Also when an existing .venv predates a dependency (hypothesis, the daemon's, boto3 and moto's S3 server, numpy, joined later).
if ! .venv/bin/python -c 'import gpusnap, click, zstandard, hypothesis, aiohttp, prometheus_client, kubernetes_validate, boto3, moto.server, numpy' 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test,crypto,daemon,s3]'
fi
# The console scripts of an older checkout's install (gpusnap-criu-hook came later).
if [ ! -x .venv/bin/gpusnap-criu-hook ]; then
    .venv/bin/pip install -q --no-deps -e .
fi
# tests/integration/test_hook_from_wheel.py builds a wheel offline: setuptools with bdist_wheel.
if ! .venv/bin/python -c 'import setuptools.command.bdist_wheel' 2>/dev/null; then
    .venv/bin/pip install -q 'setuptools>=70.1'
fi
# The SDK's tests need PyTorch. Only a CPU build that already lies on this host is taken
# (a plain `pip install torch` would fetch a CUDA build of several GB); elsewhere those
# tests skip with the reason.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    wheel=$(ls /opt/wheels/torch-*+cpu-cp3*-manylinux*_x86_64.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ] && .venv/bin/pip install -q "$wheel" 2>/dev/null; then
        echo "setup: CPU PyTorch installed from $wheel (SDK tests)"
    else
        echo "setup: no local CPU PyTorch wheel: the SDK tests will skip"
    fi
fi
# gpusnap's bytecode, as installing a wheel writes it: an editable install compiles
# nothing, and where PYTHONDONTWRITEBYTECODE is set every command would compile its ~270
# modules again (0.1 s a command on the 2-core CPU host; benchmarks/results/cpu_paths_cpu_s22.md).
.venv/bin/python -m compileall -q gpusnap >/dev/null
echo "setup: .venv ready ($(.venv/bin/gpusnap --version))"
