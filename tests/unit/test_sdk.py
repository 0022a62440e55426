"""gpusnap.sdk without CRIU: the safetensors parser, file identity, the protocol, read
windows, and (with CPU PyTorch) the registry and the agent in one process."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from gpusnap.engine import agent_steps
from gpusnap.sdk import loader, protocol
from gpusnap.sdk import safetensors as st

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install torch)")


def _file(header: dict, data: bytes = b"", pad: int = 0, raw_len: int | None = None) -> bytes:
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h) if raw_len is None else raw_len) + h + data


# ---- safetensors headers ---------------------------------------------------------------

def test_header_parses_entries_with_absolute_offsets_and_metadata():
    hdr = {"__metadata__": {"format": "pt"},
           "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
           "b": {"dtype": "F32", "shape": [], "data_offsets": [12, 16]}}
    blob = _file(hdr, bytes(16), pad=5)
    h = st.parse_header(io.BytesIO(blob), len(blob), "x")
    n = len(blob) - 16 - 8
    assert h.header_len == n and h.data_start == 8 + n
    assert h.metadata == {"format": "pt"}
    assert h.entries["a"] == st.TensorEntry("a", "BF16", (2, 3), 8 + n, 12)
    assert h.entries["b"].offset == 8 + n + 12 and h.entries["b"].shape == ()
    assert len(h.sha256) == 64


@pytest.mark.parametrize("blob, words", [
    (b"\x01\x02", "shorter than 8"),
    (struct.pack("<Q", 200 << 20), "over"),
    (struct.pack("<Q", 50) + b"{}", "cut short"),
    (_file(None), "not a JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "not JSON"),
    (_file({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}), "unknown dtype"),
    (_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "bad shape"),
    (_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}), "bad shape"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}), "bad data_offsets"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), "4 bytes for shape"),
    (_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "past the file"),
    (_file({"__metadata__": [1]}), "__metadata__"),
])
def test_bad_headers_are_refused_with_a_reason(blob, words):
    with pytest.raises(st.HeaderError, match=words):
        st.parse_header(io.BytesIO(blob), len(blob), "f")


def _weights(path, nbytes: int = 1 << 16, seed: int = 1) -> None:
    data = bytes((i * seed + i // 251) % 256 for i in range(nbytes))
    with open(path, "wb") as f:
        f.write(_file({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}, data))


def test_sample_offsets_cover_first_and_last_block():
    size = 1 << 30
    offs = st._sample_offsets(size)
    assert len(offs) == st.SAMPLES and offs[0] == 0 and offs[-1] == size - st.SAMPLE_SIZE
    assert st._sample_offsets(1000) == [0]


def test_identity_notices_mtime_size_header_and_content(tmp_path):
    p = str(tmp_path / "w.safetensors")
    _weights(p)
    rec = st.file_identity(p)
    assert rec["content_hash"] == "sampled" and st.identity_changes(rec) == []
    # same size, same header, other bytes, mtime put back: the content hash sees it
    with open(p, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"X" * 10)
    os.utime(p, ns=(rec["mtime_ns"], rec["mtime_ns"]))
    assert any("content changed" in c for c in st.identity_changes(rec))
    assert st.identity_changes(rec, quick=True) == []
    os.utime(p)
    assert any("mtime_ns" in c for c in st.identity_changes(rec))
    _weights(p, 1 << 15)
    assert any("size" in c for c in st.identity_changes(rec))
    os.unlink(p)
    assert "No such file" in st.identity_changes(rec)[0]


def test_full_hash_mode(tmp_path, monkeypatch):
    p = str(tmp_path / "w.safetensors")
    _weights(p)
    monkeypatch.setenv("GPUSNAP_SDK_HASH", "full")
    rec = st.file_identity(p)
    assert rec["content_hash"] == "full" and st.identity_changes(rec) == []


# ---- protocol and discovery ------------------------------------------------------------------

def _one_shot_server(path, reply: bytes | None, delay: float = 0.0):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    got = {}

    def run():
        c, _ = srv.accept()
        with c:
            got["req"] = json.loads(protocol.recv_message(c))
            time.sleep(delay)
            if reply is not None:
                try:
                    c.sendall(reply)
                except OSError:
                    pass                    # the client gave up (the timeout case)
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return got, t


def test_request_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "a.sock")
    got, t = _one_shot_server(path, b'{"ok": true, "state": "resident"}\n')
    assert protocol.request(path, "status")["state"] == "resident"
    t.join()
    assert got["req"] == {"cmd": "status", "version": protocol.VERSION}
    os.unlink(path)
    _one_shot_server(path, b'{"ok": false, "error": "no"}')
    with pytest.raises(protocol.AgentError, match="status failed: no"):
        protocol.request(path, "status")
    os.unlink(path)
    _one_shot_server(path, b"[1]")
    with pytest.raises(protocol.AgentError, match="not a JSON object"):
        protocol.request(path, "status")
    os.unlink(path)
    _one_shot_server(path, b"{}", delay=2)
    with pytest.raises(protocol.AgentError, match="no answer"):
        protocol.request(path, "prepare", timeout=0.3)
    with pytest.raises(protocol.AgentError):
        protocol.request(str(tmp_path / "none.sock"), "status")


def test_socket_path_honours_environment(monkeypatch):
    assert protocol.socket_path(42) == "/run/gpusnap/agent-42.sock" or os.environ.get("GPUSNAP_AGENT_DIR")
    monkeypatch.setenv("GPUSNAP_AGENT_DIR", "/tmp/x")
    assert protocol.socket_path(42) == "/tmp/x/agent-42.sock"


def test_parse_net_unix():
    text = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 733174 /run/gpusnap/agent-7.sock\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 733175\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 9 @abstract name\n")
    rows = agent_steps.parse_net_unix(text)
    assert rows == [(733174, 0x10000, "/run/gpusnap/agent-7.sock"), (9, 0x10000, "@abstract name")]


def test_find_agents_takes_only_the_pids_own_listening_socket(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    code = ("import socket,os,sys,time; s=socket.socket(socket.AF_UNIX); "
            f"s.bind('{d}/agent-%d.sock' % os.getpid()); s.listen(1); "
            f"t=socket.socket(socket.AF_UNIX); t.bind('{d}/agent-1.sock'); t.listen(1); "
            "print(os.getpid(), flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        assert agent_steps.find_agents([pid]) == {pid: f"{d}/agent-{pid}.sock"}
        (d / "agent-999999.sock").touch()               # a stale file is nobody's agent
        assert agent_steps.find_agents([999999]) == {}
    finally:
        p.kill()
        p.wait()


# ---- read windows ----------------------------------------------------------------------

@needs_torch
def test_windows_merge_neighbours_and_split_large_ranges():
    import torch
    a, b, c = torch.empty(100, dtype=torch.uint8), torch.empty(50, dtype=torch.uint8), torch.empty(1000, dtype=torch.uint8)
    jobs = [loader.Job("f", 1000, 100, a), loader.Job("f", 1100, 50, b), loader.Job("f", 5000, 1000, c),
            loader.Job("g", 0, 50, b)]
    wins = loader.windows(jobs, chunk=400)
    f_wins = [(w.offset, w.length, [(d.numel(), do, bo, n) for d, do, bo, n in w.pieces])
              for w in wins if w.path == "f"]
    # a and b share one window (gap 0); c (3850 bytes past b: within GAP) continues it
    # until the window is full, then is split into 400-byte windows
    assert f_wins[0] == (1000, 150, [(100, 0, 0, 100), (50, 0, 100, 50)])
    covered = sum(n for _, _, ps in f_wins for *_, n in ps)
    assert covered == 1150
    assert all(length <= 400 for _, length, _ in f_wins)
    assert [w.path for w in wins].count("g") == 1


@needs_torch
def test_mapped_windows_never_share_a_page_and_cover_every_byte():
    import torch
    a, b = torch.empty(5000, dtype=torch.uint8), torch.empty(9000, dtype=torch.uint8)
    jobs = [loader.Job("f", 8, 5000, a), loader.Job("f", 5008, 9000, b), loader.Job("g", 100, 5000, a)]
    cut = loader.mapped_windows(jobs, 8192)
    f = cut["f"]
    assert sorted(f) == [0, 1]                      # bytes 8..14008: windows 0 and 1
    for w, pieces in f.items():
        for _, _, at, n in pieces:
            assert w * 8192 <= at and at + n <= (w + 1) * 8192
    assert sum(n for ps in f.values() for *_, n in ps) == 14000
    assert [(d.numel(), do, at, n) for d, do, at, n in f[0]] == [(5000, 0, 8, 5000), (9000, 0, 5008, 3184)]
    assert list(cut["g"]) == [0]
    with pytest.raises(ValueError):
        loader.mapped_windows(jobs, 5000)


def test_pinned_reader_takes_more_workers_and_windows_for_large_loads():
    assert loader.pinned_threads(loader.BIG_LOAD - 1) == loader.DEFAULT_THREADS == 8
    assert loader.pinned_threads(loader.BIG_LOAD) == loader.BIG_THREADS == 16
    assert loader.pinned_window(loader.BIG_LOAD - 1) == 4 << 20
    assert loader.pinned_window(loader.BIG_LOAD) == 16 << 20


def test_gds_backend_without_kvikio_is_pinned(monkeypatch):
    if importlib.util.find_spec("kvikio") is None:
        b = loader.gds_backend()
        assert b["reader"] == "pinned" and "kvikio is not importable" in b["reason"]
    monkeypatch.setenv("GPUSNAP_SDK_READER", "pinned")
    assert loader.gds_backend() == {"reader": "pinned", "reason": "GPUSNAP_SDK_READER=pinned"}
    monkeypatch.setenv("GPUSNAP_SDK_READER", "mapped")
    assert loader.gds_backend()["reader"] == "mapped"


def test_sdk_imports_neither_torch_nor_the_rest_of_gpusnap():
    code = ("import sys, gpusnap.sdk; bad=[m for m in sys.modules if m.split('.')[0] in "
            "('torch','click','zstandard','psutil') or (m.startswith('gpusnap.') and not "
            "m.startswith('gpusnap.sdk'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---- registry and agent (CPU PyTorch) --------------------------------------------------------

@pytest.fixture
def model_file(tmp_path):
    if not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    import torch

    from tests.workloads.sdk_server import write_safetensors
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    m.register_buffer("not_in_file", torch.ones(3))
    path = str(tmp_path / "m.safetensors")
    write_safetensors({k: v for k, v in m.state_dict().items() if k != "not_in_file"}, path)
    return m, path


@needs_torch
def test_registry_matches_tensors_and_keeps_the_rest(model_file):
    from gpusnap.sdk import registry
    m, path = model_file
    reg = registry.build(m, path)
    assert sorted(s.name for s in reg.slots) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert reg.kept == {"not_in_file": "not in the safetensors files"}
    assert reg.bytes == sum(p.numel() * 2 for p in m.parameters())
    assert registry.check_against_files(reg) == []


@needs_torch
def test_registry_tied_names_share_one_slot(model_file, tmp_path):
    import torch

    from gpusnap.sdk import registry
    m, path = model_file
    m.tied = m[0]                       # the same module under a second name
    reg = registry.build(m, path)
    slot = next(s for s in reg.slots if s.name == "0.weight")
    assert slot.aliases == ["tied.weight"] and len(reg.slots) == 4
    del torch


@needs_torch
def test_registry_refuses_a_changed_dtype_and_keeps_views(model_file):
    import torch

    from gpusnap.sdk import registry
    m, path = model_file
    m[2].float()
    with pytest.raises(ValueError, match="2.weight: dtype torch.float32 in the model, BF16"):
        registry.build(m, path)
    reg = registry.build(m, path, strict=False)
    assert "2.weight" in reg.kept
    m[2].to(torch.bfloat16)
    big = torch.zeros(64 * 32 * 2, dtype=torch.bfloat16)
    m[0].weight.data = big[: 64 * 32].view(64, 32)      # a view into a larger storage
    reg = registry.build(m, path)
    assert "view" in reg.kept["0.weight"]


@needs_torch
def test_enable_refuses_weights_changed_after_loading(model_file):
    import torch

    import gpusnap.sdk
    m, path = model_file
    with torch.no_grad():
        m[0].weight.mul_(2)
    with pytest.raises(ValueError, match="differ from their bytes"):
        gpusnap.sdk.enable(m, path, start=False)


@needs_torch
def test_agent_prepare_resume_in_process(model_file):
    import torch

    import gpusnap.sdk
    m, path = model_file
    kv = torch.ones(1000)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y0 = m(x)
    agent = gpusnap.sdk.enable(m, path, scratch=[kv], start=False)
    p = agent.prepare()
    assert p["state"] == "prepared" and p["bytes_dropped"] == agent.registry.bytes + 4000
    assert m[0].weight.numel() == 0 and kv.numel() == 0
    assert m.not_in_file.numel() == 3                   # not registered: untouched
    assert agent.prepare()["again"]
    r = agent.resume()
    assert r["state"] == "resident" and r["bytes"] == agent.registry.bytes and r["verified"]
    assert torch.equal(m(x), y0) and kv.shape == (1000,) and not kv.any()
    assert agent.resume()["again"]


@needs_torch
def test_resume_refuses_changed_files_and_other_bytes(model_file):
    import gpusnap.sdk
    m, path = model_file
    agent = gpusnap.sdk.enable(m, path, start=False)
    agent.prepare()
    os.utime(path)                                      # touched: the quick check refuses
    with pytest.raises(RuntimeError, match="changed since prepare"):
        agent.resume()
    # same size, mtime put back, other bytes: the fingerprints refuse
    rec = agent.files[0]
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x11\x22\x33\x44")
    os.utime(path, ns=(rec["mtime_ns"], rec["mtime_ns"]))
    with pytest.raises(RuntimeError, match="differ from what was dropped"):
        agent.resume()
    assert agent.state == "prepared" and m[2].bias.numel() == 0


@needs_torch
def test_failed_prepare_puts_everything_back(model_file):
    import torch

    import gpusnap.sdk
    m, path = model_file
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    y0 = m(x)
    agent = gpusnap.sdk.enable(m, path, start=False)

    def boom():
        raise RuntimeError("boom")
    agent.on_prepare.append(boom)
    with pytest.raises(RuntimeError, match="boom"):
        agent.prepare()
    assert agent.state == "resident" and torch.equal(m(x), y0)
    with agent.serving():                               # the gate was released
        pass


@needs_torch
def test_agent_socket_status_peer_check_and_watchdog(model_file, tmp_path):
    import gpusnap.sdk
    import shutil
    import tempfile
    m, path = model_file
    base = tempfile.mkdtemp(prefix="gpusnap-sdk-test-")    # under /tmp: reachable by uid 65534
    d = os.path.join(base, "run")
    agent = gpusnap.sdk.enable(m, path, socket_dir=d, watchdog_s=2)
    try:
        assert oct(os.stat(d).st_mode & 0o777) == "0o700"
        assert oct(os.stat(agent.path).st_mode & 0o777) == "0o600"
        s = gpusnap.sdk.request(agent.path, "status")
        assert s["state"] == "resident" and s["tensors"] == 4 and s["pid"] == os.getpid()
        with pytest.raises(gpusnap.sdk.AgentError, match="unknown command"):
            gpusnap.sdk.request(agent.path, "fly")
        assert gpusnap.sdk.request(agent.path, "prepare")["state"] == "prepared"
        deadline = time.monotonic() + 10                # nobody resumes: the watchdog does
        while agent.state != "resident" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.state == "resident"
        if os.geteuid() == 0:
            os.chmod(base, 0o711)
            os.chmod(d, 0o711)
            os.chmod(agent.path, 0o666)
            code = ("import os,sys,socket; os.setgid(65534); os.setuid(65534); "
                    "c=socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); "
                    "c.sendall(b'{\"cmd\":\"prepare\"}\\n'); c.shutdown(1); print(c.recv(4096).decode())")
            out = subprocess.run([sys.executable, "-c", code, agent.path], capture_output=True, text=True)
            assert "uid 65534 may not talk to this agent" in out.stdout, out.stderr
            assert agent.state == "resident"
    finally:
        agent.close()
        assert not os.path.exists(agent.path)
        shutil.rmtree(base)


@needs_torch
def test_enable_hooks_for_servers_that_reload_themselves(tmp_path):
    import gpusnap.sdk
    p = str(tmp_path / "w.safetensors")
    _weights(p)
    calls = []
    agent = gpusnap.sdk.enable_hooks(lambda: calls.append("sleep") or {"bytes_dropped": 123},
                                     lambda: calls.append("wake") or {"bytes": 456}, p, start=False)
    r = agent.prepare()
    assert r["bytes_dropped"] == 123 and [f["path"] for f in r["files"]] == [os.path.realpath(p)]
    assert agent.resume()["bytes"] == 456 and calls == ["sleep", "wake"]

    def fail():
        calls.append("half-asleep")
        raise RuntimeError("no")
    agent.on_prepare[:] = [fail]
    with pytest.raises(RuntimeError):
        agent.prepare()
    assert calls[-2:] == ["half-asleep", "wake"] and agent.state == "resident"


def test_the_pinned_reader_takes_larger_windows_only_for_large_loads():
    from gpusnap.sdk import loader
    assert loader.pinned_window(1 << 30) == 4 << 20
    assert loader.pinned_window(loader.BIG_LOAD - 1) == 4 << 20
    assert loader.pinned_window(loader.BIG_LOAD) == loader.BIG_WINDOW == 16 << 20


@needs_torch
def test_stream_writer_refuses_a_tensor_unlike_its_spec_and_leaves_no_temp_file(tmp_path):
    import torch

    from tests.workloads.sdk_server import write_safetensors_stream
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="its spec says 8"):
        write_safetensors_stream([("a", torch.float32, (2,))], lambda n: torch.zeros(3), path)
    assert os.listdir(tmp_path) == []
