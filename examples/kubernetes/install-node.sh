#!/usr/bin/env bash
# Prepare a GPU node for gpusnap, from inside the gpusnapd DaemonSet pod (the host's root
# mounted at $ROOT), or against a scratch directory (ROOT=/tmp/x, as CI does):
#   - CRIU: the image's relocatable CRIU copied to $ROOT/opt/gpusnap/criu, linked as
#     $ROOT/usr/local/sbin/criu, unless the node has CRIU >= 4.1 already;
#   - gpusnap's source to $ROOT/opt/gpusnap/src, and its CRIU action script to
#     $ROOT/usr/local/lib/gpusnap/gpusnap-criu-hook (run by the node's $HOST_PYTHON),
#     named in $ROOT/etc/criu/runc.conf (runc, and crun without a crun.conf) and in
#     $ROOT/etc/criu/crun.conf where that exists (FILE.bak kept; idempotent);
#   - $ROOT/run/gpusnap (the socket's directory) and $ROOT/var/lib/gpusnap (the store).
# With --run-daemon it then runs `gpusnap daemon` in the foreground.
set -euo pipefail
ROOT=${ROOT:?set ROOT to the node root (/host in the pod, a scratch dir in CI)}
HERE=$(cd "$(dirname "$0")/../.." && pwd)              # this gpusnap checkout
HOST_PYTHON=${HOST_PYTHON:-/usr/bin/python3}           # a path on the node
PYTHON=${PYTHON:-$HERE/.venv/bin/python}               # runs gpusnap here (the pod)
CRIU_SRC=${CRIU_SRC:-/opt/gpusnap/criu}                # the image's relocatable CRIU
HOOK=/usr/local/lib/gpusnap/gpusnap-criu-hook
SRC=/opt/gpusnap/src

say() { echo "install-node: $*"; }

install_criu() {
    local v
    if [ -x "$ROOT/usr/local/sbin/criu" ] || [ -x "$ROOT/usr/sbin/criu" ]; then
        v=$(chroot "$ROOT" criu --version 2>/dev/null | sed -n 's/^Version: *//p' || true)
        if [ -n "$v" ]; then say "criu $v already on the node"; return; fi
    fi
    if [ ! -x "$CRIU_SRC/bin/criu" ]; then
        say "no CRIU in $CRIU_SRC (build one with scripts/install-criu.sh); skipped"
        return
    fi
    mkdir -p "$ROOT/opt/gpusnap" "$ROOT/usr/local/sbin"
    rm -rf "$ROOT/opt/gpusnap/criu.new"
    cp -a "$CRIU_SRC" "$ROOT/opt/gpusnap/criu.new"
    rm -rf "$ROOT/opt/gpusnap/criu"
    mv "$ROOT/opt/gpusnap/criu.new" "$ROOT/opt/gpusnap/criu"
    ln -sfn /opt/gpusnap/criu/bin/criu "$ROOT/usr/local/sbin/criu"
    say "criu installed at /opt/gpusnap/criu"
}

install_source() {
    mkdir -p "$ROOT/opt/gpusnap"
    rm -rf "$ROOT$SRC.new"
    mkdir -p "$ROOT$SRC.new"
    cp -a "$HERE/gpusnap" "$ROOT$SRC.new/"
    find "$ROOT$SRC.new" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$ROOT$SRC"
    mv "$ROOT$SRC.new" "$ROOT$SRC"
    chmod -R go-w "$ROOT/opt/gpusnap"
}

install_hook() {
    # gpusnap's own pure functions render the hook and edit the config: the same text
    # `gpusnap hooks install` writes, with the node's paths (not this pod's).
    "$PYTHON" - "$ROOT" "$HOOK" "$HOST_PYTHON" "$SRC" <<'PY'
import os, shutil, sys
from gpusnap.criu.hook_install import add_line, render_script
root, hook, python, src = sys.argv[1:]

def write(path, text, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)

write(root + hook, render_script(python, src), 0o755)
configs = [root + "/etc/criu/runc.conf"]
if os.path.exists(root + "/etc/criu/crun.conf"):
    configs.append(root + "/etc/criu/crun.conf")
for conf in configs:
    old = open(conf).read() if os.path.exists(conf) else None
    new = add_line(old, hook)
    if new is None:
        print(f"install-node: {conf[len(root):]} names the hook already")
        continue
    if old is not None:
        shutil.copy2(conf, conf + ".bak")
    write(conf, new, 0o644)
    print(f"install-node: hook added to {conf[len(root):]}")
PY
}

install_criu
install_source
install_hook
mkdir -p "$ROOT/run/gpusnap" "$ROOT/var/lib/gpusnap"
chmod 0755 "$ROOT/run/gpusnap"
chmod 0700 "$ROOT/var/lib/gpusnap"
say "node prepared under $ROOT"

if [ "${1:-}" = "--run-daemon" ]; then
    exec "$PYTHON" -m gpusnap --store "${GPUSNAP_STORE:-/var/lib/gpusnap}" daemon \
        --socket /run/gpusnap/gpusnapd.sock ${GPUSNAPD_ARGS:-}
fi
