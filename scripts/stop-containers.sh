#!/usr/bin/env bash
# Stop what scripts/setup-containers.sh started (for CI cleanup). Tolerant: anything
# already gone is skipped, and it always exits 0 unless given a bad argument.
#
#   --remove-containers  first remove (force, no grace period) every docker and podman
#                        container made from the localhost/gpusnap-* images
#
# Only daemons whose pid files setup wrote (/run/gpusnap/*.pid) are stopped; a dockerd
# or containerd started some other way is left running. Afterwards it deletes the
# checkpoint copies containerd leaves in its TMPDIR (ctrd-checkpoint*). Packages, config
# files and images stay (re-running setup is then quick).
set -uo pipefail

REMOVE=0
for arg in "$@"; do
    case "$arg" in
        --remove-containers) REMOVE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) echo "stop-containers: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

STATE_DIR=/run/gpusnap
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
log() { echo "stop-containers: $*"; }

if [ "$REMOVE" = 1 ]; then
    for img in localhost/gpusnap-busybox:latest localhost/gpusnap-python:latest; do
        if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
            ids=$(docker ps -aq --filter "ancestor=$img" 2>/dev/null)
            # shellcheck disable=SC2086
            [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1 && log "docker: removed containers of $img"
        fi
        if command -v podman >/dev/null; then
            ids=$(podman ps -aq --filter "ancestor=$img" 2>/dev/null)
            # shellcheck disable=SC2086
            [ -n "$ids" ] && podman rm -f -t 0 $ids >/dev/null 2>&1 && log "podman: removed containers of $img"
        fi
    done
fi

alive() {  # running and not a zombie (PID 1 here may not reap our detached daemons)
    kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE COMM TIMEOUT_S
    local name=$1 pidfile=$2 comm=$3 timeout=$4 pid i
    if [ ! -f "$pidfile" ]; then
        log "$name: not started by setup-containers.sh (no $pidfile)"
        return
    fi
    pid=$(cat "$pidfile")
    # only signal the pid if it is still the process we started (pid reuse)
    if ! alive "$pid" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]; then
        log "$name: already stopped"
        rm -f "$pidfile"
        return
    fi
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < timeout * 4; i++)); do
        alive "$pid" || break
        sleep 0.25
    done
    if alive "$pid"; then
        log "$name (pid $pid) still running after ${timeout}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
    fi
    rm -f "$pidfile"
    log "$name stopped (pid $pid)"
}

if [ "$(cat "$STATE_DIR/started-by" 2>/dev/null)" = systemd ]; then
    systemctl stop docker docker.socket containerd 2>/dev/null && log "systemctl stop docker containerd"
    rm -f "$STATE_DIR/started-by"
else
    # dockerd stops its running containers on SIGTERM (each gets up to 10 s of grace)
    stop_pidfile dockerd "$STATE_DIR/dockerd.pid" dockerd 60
    stop_pidfile containerd "$STATE_DIR/containerd.pid" containerd 20
fi
# containerd 1.6 leaves one copy of the images behind per `docker start --checkpoint`
# (ctrd-checkpoint*); remove them, and any dump staging dirs, once the daemons are down
# (setup points containerd's TMPDIR at /var/lib/containerd/tmp; /tmp is the default).
containerd_running=0
for pid in $(pgrep -x containerd 2>/dev/null); do
    alive "$pid" && containerd_running=1
done
if [ "$containerd_running" = 0 ]; then
    n=0
    for d in /var/lib/containerd/tmp/ctrd-checkpoint* /var/lib/containerd/tmp/ctd-checkpoint* \
             /tmp/ctrd-checkpoint* /tmp/ctd-checkpoint*; do
        [ -d "$d" ] && rm -rf "$d" && n=$((n + 1))
    done
    [ "$n" -gt 0 ] && log "removed $n leftover containerd checkpoint staging dirs"
fi
exit 0
