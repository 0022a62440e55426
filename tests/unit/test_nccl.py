"""NCCL ranks that may use CUDA IPC: the pure rule, and /proc read from a real process."""

from __future__ import annotations

import os
import shutil

import pytest

from gpusnap.cuda.nccl import ProcFacts, ipc_ranks, peer_memory_safe, read_facts, refuse_ipc_ranks
from gpusnap.errors import NcclPeerMemory

from conftest import libz_path

LIB = "/usr/lib/x86_64-linux-gnu/libnccl.so.2"
SAFE = {"NCCL_P2P_DISABLE": "1", "NCCL_CUMEM_ENABLE": "0"}


def facts(pid=1, maps=(LIB,), **env) -> ProcFacts:
    return ProcFacts(pid, list(maps), dict(env))


def test_rank_of_several_without_the_remedy_is_refused():
    assert ipc_ranks([facts(7, WORLD_SIZE="2")]) == [7]
    assert ipc_ranks([facts(7, LOCAL_WORLD_SIZE="4", NCCL_CUMEM_ENABLE="0")]) == [7]
    assert ipc_ranks([facts(7, WORLD_SIZE="2", NCCL_P2P_DISABLE="1")]) == [7]


def test_nccl_shared_memory_marks_a_rank_whatever_its_environment():
    shm = (LIB, "/dev/shm/nccl-Ab12Cd (deleted)")
    assert ipc_ranks([facts(3, shm)]) == [3]
    assert ipc_ranks([facts(3, shm, **SAFE)]) == []


def test_both_settings_make_it_safe():
    assert ipc_ranks([facts(7, WORLD_SIZE="2", **SAFE)]) == []
    assert peer_memory_safe({"NCCL_P2P_DISABLE": "2", "NCCL_CUMEM_ENABLE": "0"})
    assert not peer_memory_safe({"NCCL_P2P_DISABLE": "0", "NCCL_CUMEM_ENABLE": "0"})
    assert not peer_memory_safe({"NCCL_P2P_DISABLE": "yes", "NCCL_CUMEM_ENABLE": "0"})
    assert not peer_memory_safe({"NCCL_P2P_DISABLE": "1"})


def test_libnccl_alone_is_not_a_rank():
    """Every CUDA build of PyTorch maps libnccl at import: one process, one GPU."""
    assert ipc_ranks([facts(5), facts(6, WORLD_SIZE="1")]) == []
    assert ipc_ranks([facts(5, ("/usr/lib/libcuda.so.1",), WORLD_SIZE="2")]) == []
    assert ipc_ranks([facts(5, ("/x/libnccl-net.so",), WORLD_SIZE="2")]) == [5]


@pytest.fixture
def fake_rank(tmp_path, sleeper):
    """A process that maps a library named libnccl.so.2 (a copy of libz) and says WORLD_SIZE=2."""
    lib = tmp_path / "libnccl.so.2"
    shutil.copy(libz_path(), lib)

    def start(**env):
        return sleeper(f"import ctypes; ctypes.CDLL({str(lib)!r})",
                       env={"PATH": os.environ.get("PATH", ""), "WORLD_SIZE": "2", **env})
    return start


def test_read_facts_sees_the_mapping_and_the_environment(fake_rank):
    proc = fake_rank()
    got = read_facts(proc.pid)
    assert any(p.endswith("/libnccl.so.2") for p in got.maps)
    assert got.env["WORLD_SIZE"] == "2"
    with pytest.raises(NcclPeerMemory) as err:
        refuse_ipc_ranks([os.getpid(), proc.pid], "dump")
    assert str(proc.pid) in err.value.message
    assert "NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0" in err.value.hint
    assert err.value.exit_code == 23
    refuse_ipc_ranks([proc.pid + 10_000_000], "dump")      # a process gone: nothing to say
    safe = fake_rank(**SAFE)
    refuse_ipc_ranks([safe.pid], "dump")
