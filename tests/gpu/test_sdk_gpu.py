"""gpusnap.sdk on a real GPU: the transformers server (tests/workloads/llm_server.py)
with --sdk dumps with its weights out of the image, restores, reads them back into GPU
memory and generates the same tokens as before; the image is smaller by about the weights.

GPUSNAP_TEST_OUT=DIR makes the tests write what they measured to DIR/sdk_gpu.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.gpu, pytest.mark.root]

PORT = 18131
SIZE = os.environ.get("GPUSNAP_SDK_TEST_SIZE", "tiny")
MEASURED: dict = {}


def _record(**kw) -> None:
    MEASURED.update(kw)
    out = os.environ.get("GPUSNAP_TEST_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sdk_gpu.json"), "w") as f:
            json.dump(MEASURED, f, indent=1)


_MODEL: dict = {}


@pytest.fixture
def model_dir(_needs_gpu, tmp_path_factory):
    """Made once for the module, after the GPU check (conftest's _needs_gpu)."""
    if "dir" in _MODEL:
        return _MODEL["dir"]
    d = str(tmp_path_factory.mktemp("model"))
    res = subprocess.run([sys.executable, "-m", "tests.workloads.llm_server", "make", "--size", SIZE,
                          "--out", d], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _MODEL["dir"] = d
    return d


def _http(path, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _tokens(n: int = 16) -> list[int]:
    return _http("/generate", {"max_new_tokens": n})["ids"]


class Server:
    def __init__(self, model_dir: str, state: str, sdk: bool):
        shutil.rmtree(state, ignore_errors=True)
        os.makedirs(state)
        self.state = state
        log = open(os.path.join(state, "log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workloads.llm_server", "serve", "--model", model_dir,
             "--port", str(PORT), "--state", state, *(["--sdk"] if sdk else [])],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        ready = os.path.join(state, "ready")
        deadline = time.monotonic() + 300
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(open(os.path.join(state, "log")).read()[-3000:])
            time.sleep(0.05)
        self.info = json.load(open(ready))
        self.pid = self.info["pid"]

    def gone(self) -> None:
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 30
        while psutil.pid_exists(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self) -> None:
        for p in [self.pid]:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        self.gone()


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(model_dir, sdk):
        s = Server(model_dir, str(tmp_path / f"state{len(started)}"), sdk)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def test_llm_server_weights_out_of_the_image_and_back(model_dir, servers, gpusnap):
    weights = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    plain = servers(model_dir, sdk=False)
    expected = _tokens()
    rc, snap_plain, err = gpusnap("dump", "--pid", str(plain.pid))
    assert rc == 0, err
    assert snap_plain["sdk"] is None
    plain.gone()

    srv = servers(model_dir, sdk=True)
    assert srv.info["sdk"]["tensors"] > 0 and srv.info["sdk"]["bytes"] > 0.95 * weights
    assert _tokens() == expected
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 0, err
    sdk = snap["sdk"]
    assert sdk and sdk["agents"][0]["pid"] == srv.pid
    assert sdk["agents"][0]["gpu_bytes_released"] >= 0.95 * srv.info["sdk"]["bytes"], sdk
    srv.gone()
    saved = snap_plain["bytes_logical"] - snap["bytes_logical"]
    _record(size=SIZE, weights_bytes=weights, registered_bytes=srv.info["sdk"]["bytes"],
            kept=srv.info["sdk"]["kept"], backend=srv.info["sdk"]["backend"],
            images_plain=snap_plain["bytes_logical"], images_sdk=snap["bytes_logical"],
            saved=saved, dump_plain_timings=snap_plain["timings"], dump_sdk_timings=snap["timings"])
    assert saved >= 0.9 * srv.info["sdk"]["bytes"], (snap_plain["bytes_logical"], snap["bytes_logical"])

    rc, res, err = gpusnap("restore", snap["id"])
    assert rc == 0, err
    assert res["pid"] == srv.pid and "sdk_resume" in res["timings"]
    assert res["sdk"]["bytes"] == srv.info["sdk"]["bytes"]
    got = _tokens()
    _record(restore_timings=res["timings"], restore_sdk=res["sdk"], tokens_equal=got == expected)
    assert got == expected
    from gpusnap.sdk import request
    status = request(srv.info["sdk"]["socket"], "status")
    assert status["state"] == "resident" and status["last"]["resume"]["verified"]


def test_leave_running_dump_gives_the_original_its_weights_back(model_dir, servers, gpusnap):
    srv = servers(model_dir, sdk=True)
    expected = _tokens()
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid), "--leave-running")
    assert rc == 0, err
    assert snap["sdk"] and "sdk_resume" in snap["timings"]
    assert _tokens() == expected
    _record(leave_running_timings=snap["timings"])


@pytest.mark.parametrize("reader,chunk", [("pinned", 1 << 20), ("mapped", 1 << 20), ("mapped", None)])
def test_each_reader_puts_the_files_bytes_into_gpu_tensors(_needs_gpu, tmp_path, reader, chunk):
    """The pinned reader and the mapped one (page-cache pages registered read-only, or,
    where the device cannot, the pinned reader again, saying why) read tensors whose
    ranges cross their windows, from an odd header length, byte for byte."""
    import torch
    from gpusnap.sdk import loader
    from tests.workloads.sdk_server import write_safetensors
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randint(-2**62, 2**62, (n,), dtype=torch.int64, generator=g)
               for i, n in enumerate([1, 3 << 17, 5 << 15, 7, 1 << 18, 999])}
    path = str(tmp_path / "w.safetensors")
    write_safetensors(tensors, path)
    from gpusnap.sdk import read_header
    h = read_header(path)
    jobs = [loader.Job(path, e.offset, e.length, torch.empty(e.shape, dtype=torch.int64, device="cuda"))
            for e in h.entries.values()]
    stats = loader.load(jobs, reader=reader, chunk=chunk)
    torch.cuda.synchronize()
    for name, j in zip(h.entries, jobs):
        assert torch.equal(j.dst.cpu(), tensors[name]), name
    if reader == "mapped":
        want = "mapped" if loader.read_only_register_supported() else "pinned (mapped failed"
        assert stats["reader"].startswith(want), stats
    _record(**{f"reader_{reader}_{chunk}": stats["reader"]})
