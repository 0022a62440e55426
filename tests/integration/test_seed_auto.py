"""`dump --seed auto`'s discovery (targets/weights.py) against real processes: the files
a process names are found inside its own root, as its user may read them; a symlink of
the target never leads outside its root; a Hugging Face id finds its cache's snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpusnap.targets import weights

SLEEP = "import time; time.sleep(60)"


def _started(argv, env=None, **kw):
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kw)
    for _ in range(100):                    # its command line is the one asked for
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[-2:-1] == [os.fsencode(argv[-1])]:
                    break
        except OSError:
            pass
        time.sleep(0.02)
    return proc


def _write(path, data=b"x" * 64, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.root
def test_a_chrooted_targets_paths_stay_in_its_root_and_its_users_reach(tmp_path):
    root = tmp_path / "root"
    ok = _write(root / "m" / "ok.safetensors", b"ok" * 32)
    _write(root / "m" / "secret.safetensors", mode=0o600)        # root's: not the target's
    host = _write(tmp_path / "host.safetensors", b"host" * 16)   # outside its root
    os.symlink(host, root / "m" / "abs.safetensors")             # /tmp/.../host.safetensors
    os.symlink("../../host.safetensors", root / "m" / "dotdot.safetensors")
    os.chmod(root, 0o755)
    os.chmod(root / "m", 0o755)
    code = (f"import os, time; os.chroot({str(root)!r}); os.chdir('/'); os.setgroups([]); "
            f"os.setgid(65534); os.setuid(65534); time.sleep(60)")
    proc = _started([sys.executable, "-c", code, "/m"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/root") == "/" and time.monotonic() < deadline:
            time.sleep(0.02)
        while os.stat(f"/proc/{proc.pid}").st_uid != 65534 and time.monotonic() < deadline:
            time.sleep(0.02)
        found = weights.discover([proc.pid])
        try:
            assert found.sources == ["/m/ok.safetensors"], found
            with open(found.paths[0], "rb") as f:        # read through the descriptor held
                assert f.read() == open(ok, "rb").read()
        finally:
            found.close()
        assert found.fds == []
    finally:
        proc.kill()
        proc.wait()


def test_a_hugging_face_id_finds_the_snapshot_refs_main_names(tmp_path):
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--org--tiny"
    blob = _write(hub / "blobs" / "0123abcd", b"w" * 128)
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc1234\n")
    snap = hub / "snapshots" / "abc1234"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/0123abcd", snap / "model.safetensors")
    _write(hub / "snapshots" / "fff9999" / "model.safetensors")     # another revision: not main
    env = {"HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")}
    proc = _started([sys.executable, "-c", SLEEP, "serve", "--model=org/tiny"], env=env,
                    cwd=str(tmp_path))
    try:
        found = weights.discover([proc.pid])
        try:
            assert found.sources == [str(snap / "model.safetensors")], found
            with open(found.paths[0], "rb") as f:
                assert f.read() == open(blob, "rb").read()
        finally:
            found.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_directory_stands_for_its_safetensors_and_a_relative_path_for_its_cwd(tmp_path):
    model = tmp_path / "model"
    a = _write(model / "model-00001-of-00002.safetensors")
    b = _write(model / "sub" / "model-00002-of-00002.safetensors")
    _write(model / "config.json", b"{}")
    fifo = model / "pipe.safetensors"
    os.mkfifo(fifo)                             # never opened for a read that would wait
    proc = _started([sys.executable, "-c", SLEEP, "model", str(model / "sub")], cwd=str(tmp_path))
    try:
        found = weights.discover([proc.pid, proc.pid])      # twice: each file once
        try:
            assert found.sources == ["model/model-00001-of-00002.safetensors",
                                     "model/sub/model-00002-of-00002.safetensors"], found
            assert os.path.samefile(found.paths[0], a) and os.path.samefile(found.paths[1], b)
        finally:
            found.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_process_gone_or_naming_nothing_finds_nothing(tmp_path):
    proc = _started([sys.executable, "-c", SLEEP, "--port", "8080"])
    try:
        assert weights.discover([proc.pid]).sources == []
    finally:
        proc.kill()
        proc.wait()
    assert weights.discover([proc.pid]).sources == []
