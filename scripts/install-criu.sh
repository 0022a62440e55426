#!/usr/bin/env bash
# Install CRIU >= 4.1 into a private prefix, runnable on Debian 12 and Ubuntu 24.04.
#
# Debian 12 ships CRIU 3.17, which fails on 6.x kernels ("vdso: Unexpected rt vDSO
# area bounds"). We take Debian unstable's binary criu and every library it needs,
# unpack them with dpkg -x into PREFIX (nothing touches the system's package state),
# and start criu through the prefix's own dynamic loader. The Debian mirror is read
# from this host's own apt configuration; only the suite changes.
#
# usage: install-criu.sh PREFIX        (idempotent: exits early when PREFIX/bin/criu works)
set -euo pipefail
PREFIX=${1:?usage: install-criu.sh PREFIX}
PKGS="criu libcompel1 libnet9 libgnutls30t64 libnl-3-200 libc6 libnftables1 libnftnl11
libmnl0 libjansson4 libxtables12 libedit2 libbsd0 libmd0 libuuid1 libprotobuf-c1
libnettle8t64 libhogweed6t64 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libgmp10
libffi8 libtinfo6"

if [ -x "$PREFIX/bin/criu" ] && "$PREFIX/bin/criu" --version >/dev/null 2>&1; then
    echo "criu already in $PREFIX: $("$PREFIX/bin/criu" --version | head -1)"
    exit 0
fi

mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
if [ -z "$mirror" ]; then
    mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | grep -v security | awk '{print $2}' | head -1 || true)
fi
[ -n "$mirror" ] || { echo "install-criu: no Debian mirror found in /etc/apt" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o "APT::Architecture=amd64" -o "APT::Architectures=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update
# shellcheck disable=SC2086
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download $PKGS)

rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new/root" "$PREFIX.new/bin"
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$PREFIX.new/root"; done
cat >"$PREFIX.new/bin/criu" <<'WRAP'
#!/bin/sh
# Runs the private CRIU through its own loader and libraries (see scripts/install-criu.sh).
here=$(dirname "$(readlink -f "$0")")
root="$here/../root"
exec "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
    --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    "$root/usr/sbin/criu" "$@"
WRAP
chmod 755 "$PREFIX.new/bin/criu"
rm -rf "$PREFIX.new/root/usr/share/doc" "$PREFIX.new/root/usr/share/man" "$PREFIX.new/root/usr/share/locale" "$PREFIX.new/root/usr/share/i18n"
"$PREFIX.new/bin/criu" --version >/dev/null
rm -rf "$PREFIX"
mv "$PREFIX.new" "$PREFIX"
echo "criu installed in $PREFIX: $("$PREFIX/bin/criu" --version | head -1)"
