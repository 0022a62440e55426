#!/bin/bash
# Wheels for the GPU machine's Python (3.12, x86_64, no network) into .whl/, for
# scripts/gpu-session.sh to install: what gpusnap needs there beyond the machine's image.
#
#   scripts/gpu-wheels.sh [--check]        (make gpu-wheels)
#
# Fetched with their dependencies, then every package the image already holds is dropped
# (IMAGE below: the image's list, /work/.library/device/KINDS.md, as far as these wheels
# touch it), so nothing in the image is shadowed by another version:
#   zstandard                       the store's codec
#   boto3                           the s3 extra (s3:// stores)
#   moto[s3] flask flask-cors       moto's server mode, the S3 server of the tests and of
#                                   benchmarks/fleet.py; not moto[server]: its other
#                                   services' dependencies (cfn-lint, openapi validators,
#                                   aws-xray-sdk, ...) are unused by S3 and IAM and would
#                                   push the working tree that travels past its 64 MiB
# The daemon extra (aiohttp, prometheus-client) is in the image. python-dateutil is in
# the image too but travels anyway: botocore wants < 3 and this registry's newest is 4.
# --check: a python3.12 virtual environment holding the image's packages that these
# wheels rely on gets the wheels with --no-deps (as gpu-session.sh installs them), then
# `pip check` and a smoke run (moto's server with IAM, an s3:// store round trip, the
# daemon's imports). Needs network and python3.12 here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WANT=(zstandard boto3 'moto[s3]' flask flask-cors)
IMAGE=(aiohttp aiosignal attrs certifi charset-normalizer click frozenlist idna jinja2 markupsafe
       multidict packaging prometheus-client propcache psutil pytest pyyaml
       requests six typing-extensions urllib3 werkzeug yarl nvidia-ml-py tqdm setuptools)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

norm() { tr 'A-Z_.' 'a-z--' <<<"$1"; }

rm -rf .whl.new
mkdir -p .whl.new
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" -d .whl.new "${WANT[@]}"
for f in .whl.new/*.whl; do
    name=$(norm "$(basename "$f" | cut -d- -f1)")
    for skip in "${IMAGE[@]}"; do
        [ "$name" = "$(norm "$skip")" ] && { rm "$f"; break; }
    done
done
# kvikio wheels (optional, fetched by hand) stay where they are
[ -d .whl/kvikio ] && mv .whl/kvikio .whl.new/
rm -rf .whl && mv .whl.new .whl
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/:"
ls .whl/*.whl | sed 's,^.whl/,  ,'

[ "${1:-}" = "--check" ] || exit 0
PY312=${PY312:-}
for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    [ -z "$PY312" ] && "$cand" -c '' 2>/dev/null && PY312=$cand
done
[ -n "$PY312" ] || { echo "--check: no python3.12 here (set PY312)" >&2; exit 1; }
VENV=$(mktemp -d /tmp/gpu-wheels-check.XXXXXX)
trap 'rm -rf "$VENV"' EXIT
"$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q "${IMAGE[@]}"
"$VENV/bin/pip" install -q --no-index --no-deps .whl/*.whl
"$VENV/bin/pip" check
PYTHONPATH=$PWD:$PWD/tests timeout 120 "$VENV/bin/python" scripts/gpu_wheels_smoke.py
