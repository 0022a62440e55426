"""A CUDA process in a runc container, checkpointed and restored by runc itself, with
gpusnap's CRIU action script doing the CUDA part (gpusnap/criu/hook.py).

Run on the GPU machine as root: python3 -m pytest -m gpu tests/gpu/test_runc_gpu.py

What it builds is what the NVIDIA container toolkit does, by hand: a bundle whose rootfs
bind-mounts the host's /usr, /lib*, /etc (read-only; the driver's libcuda comes with
them), the Python environment and this repository, and whose spec gives the container
the /dev/nvidia* nodes (linux.devices) and allows them in its device cgroup. The CRIU
config comes from the container's org.criu.config annotation: a temp file made by
`gpusnap hooks install --config`, so nothing global on the host changes.

runc: GPU machines usually lack it. Carry Debian 12's into .deps/runc/ from a host that
has it (it links libseccomp.so.2, which the GPU machine may lack too):

    mkdir -p .deps/runc && cp /usr/sbin/runc /lib/x86_64-linux-gnu/libseccomp.so.2 .deps/runc/

The test takes $GPUSNAP_RUNC, else .deps/runc/runc (run with LD_LIBRARY_PATH=.deps/runc),
else runc on PATH, and skips when there is none. CRIU >= 4.1 must be what `criu`
resolves to on PATH (runc looks it up there): the test puts gpusnap's CRIU dir first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu]

HOOK_LOG = "/var/log/gpusnap-hook.log"


def _runc() -> tuple[str, dict] | None:
    """(runc path, extra env) or None."""
    explicit = os.environ.get("GPUSNAP_RUNC")
    carried = ROOT / ".deps" / "runc" / "runc"
    if explicit:
        return explicit, {}
    if carried.exists():
        return str(carried), {"LD_LIBRARY_PATH": str(carried.parent)}
    found = shutil.which("runc")
    return (found, {}) if found else None


class Runc:
    def __init__(self, path: str, env: dict):
        self.path, self.env = path, env

    def __call__(self, *args, check=True, timeout=300, stdout=None):
        res = subprocess.run([self.path, *args], env=self.env, stdin=subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else subprocess.PIPE,
                             stderr=stdout if stdout is not None else subprocess.PIPE,
                             text=stdout is None, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"runc {' '.join(args)}: exit {res.returncode}: {res.stderr}"
                                 + _logs(args))
        return res


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def _logs(args) -> str:
    """The CRIU log of a failed runc checkpoint/restore and the hook's log: what a
    failure on the GPU machine needs (its /var/log is gone with the machine)."""
    work = args[args.index("--work-path") + 1] if "--work-path" in args else None
    out = ""
    for name in ("dump.log", "restore.log"):
        if work and os.path.exists(os.path.join(work, name)):
            out += f"\n--- {name} (tail)\n" + _tail(os.path.join(work, name))
    return out + "\n--- hook log (tail)\n" + _tail(HOOK_LOG)


@pytest.fixture
def runc():
    if os.geteuid() != 0:
        pytest.skip("runc checkpoint needs root")
    found = _runc()
    if found is None:
        pytest.skip("no runc: carry it into .deps/runc/ (see this file's docstring)")
    path, extra = found
    from gpusnap.criu.locate import find_criu
    criu = find_criu()[0]
    if os.path.basename(criu) != "criu":
        pytest.skip(f"runc looks up `criu` on PATH; gpusnap's CRIU is {criu}")
    return Runc(path, {"PATH": f"{os.path.dirname(criu)}:/usr/local/sbin:/usr/local/bin:"
                               f"/usr/sbin:/usr/bin:/sbin:/bin", **extra})


def _device_entries() -> tuple[list[dict], list[dict]]:
    """linux.devices and the cgroup allow rules for every /dev/nvidia* node."""
    devices, rules = [], []
    for name in sorted(os.listdir("/dev")):
        if not name.startswith("nvidia"):
            continue
        path = os.path.join("/dev", name)
        st = os.stat(path)
        if not (st.st_mode & 0o020000):        # character devices only
            continue
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        devices.append({"path": path, "type": "c", "major": major, "minor": minor,
                        "fileMode": 0o666, "uid": 0, "gid": 0})
        rules.append({"allow": True, "type": "c", "major": major, "minor": minor,
                      "access": "rwm"})
    caps = "/dev/nvidia-caps"
    if os.path.isdir(caps):
        for name in sorted(os.listdir(caps)):
            st = os.stat(os.path.join(caps, name))
            devices.append({"path": os.path.join(caps, name), "type": "c",
                            "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                            "fileMode": 0o666, "uid": 0, "gid": 0})
            rules.append({"allow": True, "type": "c", "major": os.major(st.st_rdev),
                          "minor": os.minor(st.st_rdev), "access": "rwm"})
    return devices, rules


def _submounts(tops: list[str]) -> list[tuple[str, bool]]:
    """Host mount points strictly below any of tops, parents first, as read-only binds."""
    below = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if any(point.startswith(t.rstrip("/") + "/") for t in tops) and os.path.exists(point):
                below.append(point)
    return [(p, True) for p in sorted(set(below), key=lambda p: (p.count("/"), p))]


def _bundle(path, run, workdir: str, criu_conf: str, args: list[str]) -> None:
    """A runc bundle over the host's own filesystem (read-only binds), with the GPUs."""
    rootfs = path / "rootfs"
    rootfs.mkdir(parents=True)
    run("spec", "--bundle", str(path))        # runc's default spec, then ours on top
    spec = json.loads((path / "config.json").read_text())
    mounts = spec["mounts"]
    binds = []
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt"):
        host = f"/{top}"
        if os.path.islink(host):                   # merged /usr: bin -> usr/bin
            os.symlink(os.readlink(host), rootfs / top)
        elif os.path.isdir(host):
            binds.append((host, True))
    # the Python running the workload (a venv, pyenv...), and gpusnap's own source
    for extra in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), str(ROOT)}:
        if not any(extra == b or extra.startswith(b + "/") for b, _ in binds):
            binds.append((extra, True))
    binds.append((workdir, False))                 # state/result/log files, same path
    # /tmp first: mounts apply in order, and a tmpfs on /tmp after the binds would hide
    # the work dir bound under it (the holder's state file would never reach the test).
    mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=1777"]})
    # Each host mount under a bound dir gets a spec entry of its own (no rbind): runc
    # tells CRIU that spec bind mounts are external, and CRIU refuses to dump a mount it
    # was not told about whose filesystem it does not know (the GPU machines bring the
    # driver in as a separate mount on /usr/local/nvidia).
    for host, ro in binds + _submounts([b for b, _ in binds]):
        target = rootfs / host.lstrip("/")
        if os.path.isdir(host):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        mounts.append({"destination": host, "type": "bind", "source": host,
                       "options": ["bind", "ro" if ro else "rw", "rprivate"]})
    devices, rules = _device_entries()
    spec["linux"]["devices"] = devices
    spec["linux"].setdefault("resources", {}).setdefault("devices", []).extend(rules)
    spec["process"].update(terminal=False, args=args, cwd=workdir)
    spec["process"]["env"] = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONUNBUFFERED=1", "CUBLAS_WORKSPACE_CONFIG=:4096:8", "HOME=/tmp",
        *(f"{k}={os.environ[k]}" for k in ("LD_LIBRARY_PATH", "CUDA_HOME") if k in os.environ)]
    spec["root"]["readonly"] = False
    spec.setdefault("annotations", {})["org.criu.config"] = criu_conf
    (path / "config.json").write_text(json.dumps(spec, indent=1))


def _log_since(offset: int) -> list[str]:
    try:
        with open(HOOK_LOG) as f:
            f.seek(offset)
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _ended(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def runc_holder(tmp_path, runc, gpusnap):
    """A torch_holder (1 GiB of known data on the GPU) as the init of a runc container
    whose CRIU config runs gpusnap's hook. Yields a dict; killed and deleted after."""
    from gpusnap.workloads import torch_holder

    conf, script = tmp_path / "criu.conf", tmp_path / "hook" / "gpusnap-criu-hook"
    rc, out, err = gpusnap("hooks", "install", "--config", str(conf), "--script", str(script))
    assert rc == 0, err
    if not (shutil.which("iptables-restore") or shutil.which("nft")):
        # CRIU locks a container's network with iptables by default; the GPU machines
        # have neither it nor nftables (the container has no network to lock anyway)
        with open(conf, "a") as f:
            f.write("network-lock skip\n")
    work = tmp_path / "w"
    work.mkdir()
    holder = torch_holder.Holder(str(work), gib=1.0, mode="idle")
    # The workload's stdio goes to files inside the container, not to descriptors
    # passed in from the host: CRIU cannot dump a descriptor of a host mount the
    # container does not have ("Can't lookup mount").
    args = ["/bin/sh", "-c", f'exec "$0" "$@" >>{holder.log_path} 2>&1 </dev/null',
            sys.executable, os.path.abspath(torch_holder.__file__), "--gib", "1",
            "--mode", "idle", "--state", holder.state_path, "--result", holder.result_path]
    bundle = tmp_path / "bundle"
    _bundle(bundle, runc, str(work), str(conf), args)
    cid = f"gs-gpu-{uuid.uuid4().hex[:8]}"
    log = open(holder.log_path, "ab")        # runc's own output
    res = runc("run", "-d", "--bundle", str(bundle), cid, check=False, stdout=log)
    assert res.returncode == 0, holder.log_tail()
    box = {"cid": cid, "bundle": bundle, "holder": holder, "runc": runc, "images": tmp_path / "img",
           "workpath": tmp_path / "criu-work", "log": log}
    try:
        holder.ready = _wait(lambda: torch_holder._read_json(holder.state_path), 120,
                             "the holder in the container")
        holder.pid = json.loads(runc("state", cid).stdout)["pid"]
        yield box
    finally:
        if holder.pid:
            try:
                os.kill(holder.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        runc("kill", cid, "KILL", check=False)
        time.sleep(0.3)
        runc("delete", "-f", cid, check=False)
        log.close()
        gpusnap("hooks", "uninstall", "--config", str(conf), "--script", str(script))


def _restore(box) -> int:
    res = box["runc"]("restore", "-d", "--bundle", str(box["bundle"]), "--image-path",
                      str(box["images"]), "--work-path", str(box["workpath"]), box["cid"],
                      check=False, timeout=600, stdout=box["log"])
    assert res.returncode == 0, _criu_log(box, "restore.log")
    return json.loads(box["runc"]("state", box["cid"]).stdout)["pid"]


def _criu_log(box, name: str) -> str:
    try:
        return (box["workpath"] / name).read_text()[-4000:]
    except OSError:
        return f"(no {name})"


def test_runc_checkpoint_and_restore_with_the_hook_keep_gpu_data(runc_holder, driver):
    box, holder = runc_holder, runc_holder["holder"]
    before = holder.check()
    assert before["intact"]
    offset = os.path.getsize(HOOK_LOG) if os.path.exists(HOOK_LOG) else 0

    box["runc"]("checkpoint", "--image-path", str(box["images"]), "--work-path",
                str(box["workpath"]), box["cid"])
    lines = _log_since(offset)
    assert any("action=pre-dump" in ln and "locked and checkpointed" in ln for ln in lines), lines
    # runc checkpoint ends the container: its init is gone, or a zombie until whoever
    # adopted it (runc run -d detaches it) reaps it
    _wait(lambda: _ended(holder.pid), 30, "the checkpointed container to stop")

    new_pid = _restore(box)
    holder.pid = new_pid
    lines = _log_since(offset)
    assert any("action=post-resume" in ln and "restored" in ln and "unlocked" in ln
               for ln in lines), lines
    assert driver.get_state(new_pid).name == "RUNNING"
    after = holder.check()
    assert after["intact"] and after["checksum"] == holder.checksum, holder.log_tail()
    assert after["iterations"] >= before["iterations"]


def test_runc_leave_running_checkpoint_gives_the_gpu_back(runc_holder, driver):
    """--leave-running: pre-dump checkpoints CUDA; the guard it starts restores and
    unlocks once CRIU has exited, so the original keeps its GPU data and goes on."""
    box, holder = runc_holder, runc_holder["holder"]
    before = holder.check()
    offset = os.path.getsize(HOOK_LOG) if os.path.exists(HOOK_LOG) else 0
    box["runc"]("checkpoint", "--leave-running", "--image-path", str(box["images"]),
                "--work-path", str(box["workpath"]), box["cid"])
    _wait(lambda: driver.get_state(holder.pid).name == "RUNNING", 120, "the guard's CUDA restore")
    lines = _log_since(offset)
    assert any("guard:" in ln and "CUDA restored and unlocked" in ln for ln in lines), lines
    after = holder.check()
    assert after["intact"] and after["iterations"] > before["iterations"]

    # the images restore as a second container too (the original still runs)
    box["runc"]("kill", box["cid"], "KILL", check=False)
    _wait(lambda: not os.path.exists(f"/proc/{holder.pid}") or
          open(f"/proc/{holder.pid}/stat").read().split()[2] == "Z", 30, "the original to die")
    box["runc"]("delete", "-f", box["cid"], check=False)
    holder.pid = _restore(box)
    _wait(lambda: driver.get_state(holder.pid).name == "RUNNING", 120, "post-resume's restore")
    assert holder.check()["intact"]
