"""A tensor-parallel server (two ranks, gloo on the CPU) with gpusnap.sdk's collectives:
dump tears the process groups down and drops the weights, restore reads the weights back
and builds the groups again, and the server answers with the same tokens. Real CRIU."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import wait_pids_free
from tests.workloads.tp_server import TpServer

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install torch)")]


@pytest.fixture
def tp(tmp_path):
    started = []

    def start(**kw) -> TpServer:
        srv = TpServer(str(tmp_path / "model"), str(tmp_path / f"state{len(started)}"),
                       port=18160 + len(started), cpu=True,
                       socket_dir=str(tmp_path / "sockets"), rebuild_timeout=60, **kw)
        srv.make("tiny")
        started.append(srv)
        return srv.start(timeout=120)

    yield start
    for srv in started:
        srv.stop()


def test_ranks_tear_down_and_rebuild_their_groups_around_dump_and_restore(tp, gpusnap):
    srv = tp(sdk=True)
    tokens = srv.generate(6)
    assert srv.ready["sdk"]["collectives"] is True
    for _ in range(2):
        rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
        assert rc == 0, f"{err}\n{srv.logs()}"
        assert sorted(a["pid"] for a in snap["sdk"]["agents"]) == sorted(srv.ranks)
        assert snap["sdk"]["bytes_out_of_image"] > 0
        srv.reap()
        wait_pids_free([srv.pid, *srv.ranks])
        rc, res, err = gpusnap("restore", snap["id"])
        assert rc == 0, f"{err}\n{srv.logs()}"
        assert res["pid"] == srv.pid and res["sdk"]["bytes"] == snap["sdk"]["bytes_out_of_image"]
        assert srv.generate(6) == tokens, srv.logs()


def test_one_snapshot_restored_twice_meets_in_a_fresh_store(tp, gpusnap):
    """Each restore of a snapshot starts the tree again: its ranks must not rendezvous in
    the store file an earlier restore of the same snapshot left behind. CRIU restores
    each copy into a time namespace whose clocks go on from the dump, so both copies see
    their launcher start at about the same tick (now and then the same one): the
    namespace's offset is what tells them apart."""
    from tests.workloads.common import kill_all
    srv = tp(sdk=True)
    tokens = srv.generate(3)
    rc, snap, err = gpusnap("dump", "--pid", str(srv.pid))
    assert rc == 0, err
    srv.reap()
    stores = set()
    for _ in range(2):
        wait_pids_free([srv.pid, *srv.ranks])
        rc, res, err = gpusnap("restore", snap["id"])
        assert rc == 0, f"{err}\n{srv.logs()}"
        assert srv.generate(3) == tokens, srv.logs()
        kill_all([*srv.ranks, srv.pid])
        stores |= {f for f in os.listdir(os.path.join(srv.state, "rendezvous")) if f.endswith("-1")}
    assert len(stores) == 2, f"both copies met in one store: {sorted(stores)}"


def test_leave_running_dump_keeps_the_server_answering(tp, gpusnap):
    srv = tp(sdk=True)
    tokens = srv.generate(4)
    rc, snap, err = gpusnap("dump", "--leave-running", "--pid", str(srv.pid))
    assert rc == 0, err
    assert srv.generate(4) == tokens, srv.logs()
