#!/usr/bin/env bash
# Prepare a Debian 12 host (as root) for gpusnap's container checkpoint tests:
#   * apt: docker.io containerd runc podman busybox-static (--no-install-recommends, so
#     Debian's criu 3.17, a Recommends of runc, is NOT pulled in; it fails on 6.x kernels)
#   * criu on PATH: /usr/local/sbin/criu -> $GPUSNAP_CRIU_PREFIX/bin/criu (CRIU >= 4.1),
#     only when the criu already on PATH is missing or older than 4.1
#   * /etc/containers/containers.conf (runc, cgroupfs, file events, ulimits),
#     /etc/containers/storage.conf (only when overlayfs cannot be mounted: vfs),
#     /etc/docker/daemon.json (experimental: true, needed for `docker checkpoint`)
#   * containerd + dockerd started in the background when there is no systemd
#     (logs: /var/log/gpusnap-containerd.log, /var/log/gpusnap-dockerd.log;
#      pid files: /run/gpusnap/*.pid, used by scripts/stop-containers.sh;
#      containerd's TMPDIR, where docker checkpoints are staged: /var/lib/containerd/tmp)
#   * local images, imported into both docker and podman (there is no registry):
#       localhost/gpusnap-busybox:latest  busybox-static + applet links (~2 MB)
#       localhost/gpusnap-python:latest   debootstrap minbase + python3 (~125 MB, ~30 s
#                                         to build once; cached in /var/cache/gpusnap)
#
# Idempotent: a second run on a prepared host only checks things and takes about a second.
#
# usage: setup-containers.sh [--no-python-image] [--no-start]
# env:   GPUSNAP_CRIU_PREFIX (default: $CRIU_PREFIX as scripts/setup.sh uses it, else
#        /opt/gpusnap/criu). Run scripts/setup.sh (make setup) first: `make containers`
#        and `make test` do.
#        GPUSNAP_PYTHON_IMAGE=0 same as --no-python-image
set -euo pipefail

# the prefix scripts/setup.sh (make setup) installs CRIU into, so that its CRIU is found
CRIU_PREFIX=${GPUSNAP_CRIU_PREFIX:-${CRIU_PREFIX:-/opt/gpusnap/criu}}
WITH_PYTHON=${GPUSNAP_PYTHON_IMAGE:-1}
START_DAEMONS=1
for arg in "$@"; do
    case "$arg" in
        --no-python-image) WITH_PYTHON=0 ;;
        --no-start) START_DAEMONS=0 ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) echo "setup-containers: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
BUSYBOX_IMAGE=localhost/gpusnap-busybox:latest
PYTHON_IMAGE=localhost/gpusnap-python:latest
STATE_DIR=/run/gpusnap
CACHE_DIR=/var/cache/gpusnap
CONTAINERD_SOCK=/run/containerd/containerd.sock
CONTAINERD_TMP=/var/lib/containerd/tmp
# The daemons (and through them containerd-shim -> runc -> criu) look criu up on PATH:
# /usr/local/sbin must come before /usr/sbin.
DAEMON_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH="$DAEMON_PATH:$PATH"
MARK="# managed by gpusnap scripts/setup-containers.sh"

log() { echo "setup-containers: $*"; }
die() { echo "setup-containers: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian 12 expected)"
mkdir -p "$STATE_DIR" "$CACHE_DIR"

# ---------------------------------------------------------------- packages
PKGS=(docker.io containerd runc podman busybox-static iptables tini conmon
      containernetworking-plugins golang-github-containers-common)
[ "$WITH_PYTHON" = 1 ] && PKGS+=(debootstrap)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    # No init system here to start services from maintainer scripts: forbid it while
    # installing (dockerd/containerd are started below, with our PATH and logs).
    tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/var/log/gpusnap-apt.log 2>&1 || rc=$?
    [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || { tail -20 /var/log/gpusnap-apt.log >&2; die "apt-get install failed (log: /var/log/gpusnap-apt.log)"; }
else
    log "packages already installed"
fi
if dpkg-query -W -f='${Status}' criu 2>/dev/null | grep -q 'ok installed'; then
    log "WARNING: Debian's criu package is installed ($(dpkg-query -W -f='${Version}' criu));" \
        "it is shadowed by /usr/local/sbin/criu, consider: apt-get remove criu"
fi

# ---------------------------------------------------------------- criu on PATH
criu_version() {  # prints MAJOR.MINOR[.PATCH] of the given criu binary, or nothing
    { "$1" --version 2>/dev/null || true; } | awk '/^Version:/ {print $2; exit}'
}
version_ge() {  # version_ge A B  ->  A >= B
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]
}
cur=$(PATH=$DAEMON_PATH command -v criu || true)
cur_ver=""
[ -n "$cur" ] && cur_ver=$(criu_version "$cur")
if [ -n "$cur_ver" ] && version_ge "$cur_ver" 4.1; then
    log "criu on PATH: $cur ($cur_ver)"
else
    if ! [ -x "$CRIU_PREFIX/bin/criu" ] || [ -z "$(criu_version "$CRIU_PREFIX/bin/criu")" ]; then
        log "no working CRIU in $CRIU_PREFIX; running scripts/install-criu.sh"
        "$HERE/install-criu.sh" "$CRIU_PREFIX"
    fi
    ln -sfn "$CRIU_PREFIX/bin/criu" /usr/local/sbin/criu
    new_ver=$(criu_version /usr/local/sbin/criu)
    version_ge "${new_ver:-0}" 4.1 || die "/usr/local/sbin/criu reports version '${new_ver}', need >= 4.1"
    log "criu on PATH: /usr/local/sbin/criu -> $CRIU_PREFIX/bin/criu ($new_ver)${cur:+ (was $cur ${cur_ver:-unknown})}"
fi
resolved=$(PATH=$DAEMON_PATH command -v criu)
version_ge "$(criu_version "$resolved")" 4.1 || die "criu resolved on the daemons' PATH ($resolved) is older than 4.1"

# ---------------------------------------------------------------- storage driver probe
overlay_ok() {  # can we mount overlayfs on /var/lib (where docker/podman keep layers)?
    local d
    d=$(mktemp -d /var/lib/gpusnap-ovl-probe.XXXXXX)
    mkdir -p "$d/l" "$d/u" "$d/w" "$d/m"
    local ok=1
    if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
        umount "$d/m"; ok=0
    fi
    rm -rf "$d"
    return $ok
}

write_if_changed() {  # write_if_changed FILE  (content on stdin); returns 0 if changed
    local f=$1 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
    if [ -f "$f" ] && ! grep -qF "$MARK" "$f" && [ ! -e "$f.gpusnap-orig" ]; then
        cp -a "$f" "$f.gpusnap-orig"
        log "saved original $f as $f.gpusnap-orig"
    fi
    mkdir -p "$(dirname "$f")"
    install -m 644 "$tmp" "$f"
    rm -f "$tmp"
    log "wrote $f"
    return 0
}

# ---------------------------------------------------------------- podman config
# runc, not crun: crun's checkpoint breaks on this hybrid cgroup v1 host.
# cgroupfs + file events: no systemd/journald here. The explicit default_ulimits are
# what podman checkpoint/restore was established to work with on this host.
write_if_changed /etc/containers/containers.conf <<EOF || true
$MARK
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

# podman's built-in default driver is overlay; only when overlayfs cannot be mounted
# here (e.g. /var/lib itself on overlayfs) do we pin vfs. An existing storage.conf not
# written by us is left alone (switching drivers orphans stored images).
if [ -f /etc/containers/storage.conf ] && ! grep -qF "$MARK" /etc/containers/storage.conf; then
    log "keeping existing /etc/containers/storage.conf"
elif [ -f /etc/containers/storage.conf ]; then
    log "podman storage: $(awk -F'"' '/^driver *=/ {print $2; exit}' /etc/containers/storage.conf) (our storage.conf)"
elif overlay_ok; then
    log "podman storage: overlay (built-in default, no storage.conf needed)"
else
    write_if_changed /etc/containers/storage.conf <<EOF || true
$MARK
# overlayfs cannot be mounted on /var/lib on this host
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
fi

# ---------------------------------------------------------------- docker config
if [ -f /etc/docker/daemon.json ] && grep -q '"storage-driver"' /etc/docker/daemon.json; then
    docker_driver=""   # keep whatever is configured
elif overlay_ok; then docker_driver=overlay2
else docker_driver=vfs
fi
# merge into an existing daemon.json (needs python3); rewrite it only when settings change
if [ ! -s /etc/docker/daemon.json ]; then
    mkdir -p /etc/docker
    if [ -n "$docker_driver" ]; then
        printf '{\n  "experimental": true,\n  "storage-driver": "%s"\n}\n' "$docker_driver"
    else
        printf '{\n  "experimental": true\n}\n'
    fi >/etc/docker/daemon.json
    daemon_json_changed=1
else
    command -v python3 >/dev/null || die "python3 is needed to merge into /etc/docker/daemon.json"
    daemon_json_changed=$(python3 - "$docker_driver" "$MARK" <<'PY'
import json, os, shutil, sys
path = "/etc/docker/daemon.json"
cfg = {}
if os.path.exists(path):
    with open(path) as f:
        text = f.read().strip()
    cfg = json.loads(text) if text else {}
new = dict(cfg, experimental=True)
if sys.argv[1]:
    new.setdefault("storage-driver", sys.argv[1])
if os.path.exists(path) and new == cfg:
    print(0)
    sys.exit()
if os.path.exists(path) and not os.path.exists(path + ".gpusnap-orig"):
    shutil.copy2(path, path + ".gpusnap-orig")
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)
    f.write("\n")
print(1)
PY
)
fi
[ "$daemon_json_changed" = 1 ] && log "wrote /etc/docker/daemon.json"

# ---------------------------------------------------------------- daemons
pid_alive() {  # pid file names a live (not zombie) process
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}
containerd_up() {
    [ -S "$CONTAINERD_SOCK" ] \
        && ctr --address "$CONTAINERD_SOCK" --connect-timeout 2s version >/dev/null 2>&1
}
docker_up() { docker info >/dev/null 2>&1; }

start_bg() {  # start_bg NAME PIDFILE LOG CMD...  (detached, clean environment)
    local name=$1 pidfile=$2 logf=$3; shift 3
    log "starting $name (log: $logf)"
    echo "=== $(date -u +%FT%TZ) setup-containers.sh starts: $*" >>"$logf"
    setsid env -i PATH="$DAEMON_PATH" HOME=/root LANG=C.UTF-8 "$@" \
        </dev/null >>"$logf" 2>&1 &
    echo $! >"$pidfile"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CHECK-FUNCTION
    local secs=$1 what=$2 fn=$3 i
    for ((i = 0; i < secs * 4; i++)); do
        "$fn" && return 0
        sleep 0.25
    done
    die "$what did not come up within ${secs}s"
}

if [ "$START_DAEMONS" = 1 ]; then
    init=$(cat /proc/1/comm 2>/dev/null || true)
    if [ "$init" = systemd ]; then
        log "systemd is PID 1: using systemctl"
        [ "$daemon_json_changed" = 1 ] && docker_up && systemctl restart docker
        systemctl start containerd docker
        echo systemd >"$STATE_DIR/started-by"
        wait_for 60 dockerd docker_up
    else
        if [ "$daemon_json_changed" = 1 ] && docker_up; then
            if pid_alive "$STATE_DIR/dockerd.pid"; then
                log "daemon.json changed: restarting our dockerd"
                kill "$(cat "$STATE_DIR/dockerd.pid")"
                for _ in $(seq 60); do pid_alive "$STATE_DIR/dockerd.pid" || break; sleep 0.5; done
            else
                log "WARNING: daemon.json changed but dockerd was not started by this script; restart it yourself"
            fi
        fi
        if containerd_up; then
            log "containerd already running"
        else
            # containerd and its shims stage checkpoint images in TMPDIR (ctd-checkpoint*
            # while dumping, ctrd-checkpoint* while restoring; containerd 1.6 never deletes
            # the restore copies): keep them on disk, out of /tmp, in one place to clean.
            mkdir -p "$CONTAINERD_TMP"
            start_bg containerd "$STATE_DIR/containerd.pid" /var/log/gpusnap-containerd.log \
                env TMPDIR="$CONTAINERD_TMP" containerd
            wait_for 30 containerd containerd_up
        fi
        if docker_up; then
            log "dockerd already running"
        else
            rm -f /var/run/docker.pid   # stale pid file from a killed dockerd blocks the start
            start_bg dockerd "$STATE_DIR/dockerd.pid" /var/log/gpusnap-dockerd.log \
                dockerd --containerd="$CONTAINERD_SOCK"
            wait_for 60 "dockerd (see /var/log/gpusnap-dockerd.log)" docker_up
        fi
    fi
    docker info --format '{{.ExperimentalBuild}}' | grep -qx true \
        || die "dockerd is not in experimental mode (docker checkpoint needs it)"
fi

# ---------------------------------------------------------------- images
build_busybox_tar() {  # $1 = output tar
    local root
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,etc,tmp,root,proc,sys,dev,run,var/tmp,usr}
    cp /bin/busybox "$root/bin/busybox"
    local a
    for a in $("$root/bin/busybox" --list); do
        [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
    done
    ln -s bin "$root/sbin"
    ln -s ../bin "$root/usr/bin"
    ln -s ../bin "$root/usr/sbin"
    chmod 1777 "$root/tmp" "$root/var/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    tar -C "$root" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$1.tmp" .
    mv "$1.tmp" "$1"
    rm -rf "$root"
}

build_python_tar() {  # $1 = output tar; debootstrap minbase + python3 (~30 s)
    local mirror root
    mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | awk '{print $2}' | grep -v security | head -1 || true)
    [ -n "$mirror" ] || mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null \
             | grep -v security | awk '{print $2}' | head -1 || true)
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt for debootstrap"
    root=$(mktemp -d /var/tmp/gpusnap-pyroot.XXXXXX)
    log "debootstrap bookworm minbase + python3 (about 30 s)"
    if ! debootstrap --variant=minbase --include=python3 bookworm "$root" "$mirror" \
            >/var/log/gpusnap-debootstrap.log 2>&1; then
        rm -rf "$root"
        die "debootstrap failed (log: /var/log/gpusnap-debootstrap.log)"
    fi
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
           "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
    tar -C "$root" --numeric-owner -cf "$1.tmp" .
    mv "$1.tmp" "$1"
    rm -rf "$root"
}

have_docker_image() { [ "$START_DAEMONS" = 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
have_podman_image() { podman image exists "$1" 2>/dev/null; }

import_image() {  # import_image NAME TAR CMD-JSON
    local name=$1 tar=$2 cmd=$3
    local changes=(-c "CMD $cmd" -c "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if [ "$START_DAEMONS" = 1 ] && ! have_docker_image "$name"; then
        docker import "${changes[@]}" "$tar" "$name" >/dev/null
        log "docker: imported $name"
    fi
    if ! have_podman_image "$name"; then
        podman import -q "${changes[@]}" "$tar" "$name" >/dev/null
        log "podman: imported $name"
    fi
}

ensure_image() {  # ensure_image NAME TAR BUILDER CMD-JSON
    local name=$1 tar=$2 builder=$3 cmd=$4
    if { [ "$START_DAEMONS" = 0 ] || have_docker_image "$name"; } && have_podman_image "$name"; then
        log "image $name present in docker and podman"
        return
    fi
    [ -s "$tar" ] || "$builder" "$tar"
    import_image "$name" "$tar" "$cmd"
}

ensure_image "$BUSYBOX_IMAGE" "$CACHE_DIR/busybox-rootfs.tar" build_busybox_tar '["/bin/sh"]'
if [ "$WITH_PYTHON" = 1 ]; then
    ensure_image "$PYTHON_IMAGE" "$CACHE_DIR/python-rootfs.tar" build_python_tar '["/usr/bin/python3"]'
fi

versions="criu $(criu_version "$(PATH=$DAEMON_PATH command -v criu)"), runc $(runc --version | awk 'NR==1 {print $3}')"
versions+=", podman $(podman version --format '{{.Client.Version}}')"
[ "$START_DAEMONS" = 1 ] && versions+=", dockerd $(docker version --format '{{.Server.Version}}')"
log "ready: $versions"
