#!/bin/bash
# The device machine returns at most 8 files from $OUT (16 MiB each). Past 7 (the 8th is
# the caller's session.txt), every file but session.txt goes into $OUT/all-files.tgz, and
# the tables (*.md) stay beside it where there are at most 6 of them; else they are in the
# tarball only.  Usage: scripts/pack-out.sh DIR
set -u
out=${1:?usage: pack-out.sh DIR}
n=$(find "$out" -type f ! -name session.txt ! -name all-files.tgz | wc -l)
[ "$n" -le 7 ] && exit 0
tmp=$(mktemp /tmp/gpusnap-pack.XXXXXX.tgz)
tar czf "$tmp" -C "$out" --exclude=./session.txt --exclude=./all-files.tgz . || { rm -f "$tmp"; exit 1; }
md=$(find "$out" -type f -name '*.md' | wc -l)
if [ "$md" -le 6 ]; then
    find "$out" -type f ! -name session.txt ! -name '*.md' -delete
else
    find "$out" -type f ! -name session.txt -delete
fi
find "$out" -mindepth 1 -type d -empty -delete
mv "$tmp" "$out/all-files.tgz"
echo "pack-out: $n files into $out/all-files.tgz ($(du -h "$out/all-files.tgz" | cut -f1))"
