#!/bin/bash
# Wheels the breadth rows need on the GPU machine, which has torch and transformers but
# not diffusers (benchmarks/breadth.py diffusion, tests/workloads/diffusion_server.py).
# Pure-Python wheels for the machine's Python 3.12, into .whl/ (gitignored: name it in the
# device tool's carry); gpu-session.sh installs every wheel there with --no-deps.
#
#   scripts/gpu-wheels-breadth.sh [DIR]        (default .whl)
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
# diffusers' own dependencies the machine already has (huggingface-hub, numpy, pillow,
# regex, requests, safetensors, filelock); importlib-metadata it lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d "$DIR" \
    "diffusers==0.42.1" "importlib-metadata"
ls -1 "$DIR" | grep -Ei '^(diffusers|importlib_metadata)-'
