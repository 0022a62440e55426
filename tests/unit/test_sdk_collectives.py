"""gpusnap.sdk.collectives: ranks stop at the same step, teardown runs before the
weights are dropped and rebuild after; the engine spares NCCL ranks whose agent promises
a teardown and insists that it happens. On CPU PyTorch, agents over real sockets."""

from __future__ import annotations

import importlib.util
import threading

import pytest

from conftest import REPO
from gpusnap.engine import agent_steps
from gpusnap.errors import AgentFailed

torch_missing = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                   reason="PyTorch is not installed")


def _agent(tmp_path, log):
    from gpusnap.sdk import collectives
    from gpusnap.sdk.agent import Agent
    from gpusnap.sdk.registry import Registry
    agent = Agent(Registry(), socket_dir=str(tmp_path), watchdog_s=None)
    agent.on_prepare.append(lambda: log.append("app prepare"))
    return collectives(agent, lambda: log.append("teardown"), lambda: log.append("rebuild"))


@torch_missing
def test_teardown_first_rebuild_last_and_each_once(tmp_path):
    log = []
    agent = _agent(tmp_path, log)
    assert agent.status()["collectives"] is True
    assert agent.prepare()["collectives"] is True
    agent.prepare()
    agent.on_resume.insert(0, lambda: log.append("app resume"))
    agent.resume()
    agent.resume()
    assert log == ["teardown", "app prepare", "app resume", "rebuild"]


@torch_missing
def test_a_prepare_that_fails_before_teardown_rebuilds_nothing(tmp_path):
    log = []
    agent = _agent(tmp_path, log)

    def fail():
        raise RuntimeError("no")
    agent.on_prepare.insert(0, fail)
    with pytest.raises(RuntimeError):
        agent.prepare()
    assert log == [] and agent.state == "resident"
    assert not agent.wait_prepared(0.05)


@torch_missing
def test_serving_loop_sees_the_wish_and_waits_for_the_prepare(tmp_path):
    """The loop holds the gate across its steps and leaves it only when it sees
    checkpoint_wanted(): the prepare then gets the gate, and the loop waits for resume."""
    log = []
    agent = _agent(tmp_path, log)
    steps = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            with agent.serving():
                while not agent.checkpoint_wanted():
                    steps.append(1)
                    if stop.is_set():
                        return
            assert agent.wait_prepared(10)
            log.append("loop saw prepared")
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    while not steps:
        pass
    reply = agent.prepare()
    assert reply["state"] == "prepared" and not agent.checkpoint_wanted()
    agent.resume()
    stop.set()
    t.join(5)
    assert log[:2] == ["teardown", "app prepare"] and "loop saw prepared" in log


class _Target:
    pids = [4242]


def test_a_required_rank_without_an_agent_stops_the_dump_before_the_lock():
    with pytest.raises(AgentFailed, match="4242"):
        agent_steps.DumpAgents(_Target(), required=[4242]).prepare(None)


def test_a_required_rank_whose_prepare_failed_or_did_not_tear_down_is_refused():
    agents = agent_steps.DumpAgents(_Target(), required=[1, 2])
    agents.asked = {}
    with pytest.raises(AgentFailed, match=r"\[1, 2\]"):
        agents._insist_on_collectives({1: {"collectives": False}}, {2: "timed out"})
    agents._insist_on_collectives({1: {"collectives": True}, 2: {"collectives": True}}, {})


@torch_missing
def test_a_rebuild_that_hangs_fails_the_resume_in_bounded_time(tmp_path):
    """A rendezvous that never completes (a peer gone) fails resume after the bound; a
    resume while it still hangs fails at once; once it returns, the next resume rebuilds."""
    import time

    from gpusnap.sdk import collectives
    from gpusnap.sdk.agent import Agent
    from gpusnap.sdk.registry import Registry
    release, calls = threading.Event(), []

    def rebuild():
        calls.append(1)
        if len(calls) == 1:
            release.wait(30)
    agent = collectives(Agent(Registry(), socket_dir=str(tmp_path), watchdog_s=None),
                        lambda: None, rebuild, rebuild_timeout_s=0.3)
    agent.prepare()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not rebuilt within 0.3 s"):
        agent.resume()
    assert time.monotonic() - t0 < 5 and agent.state == "prepared"
    with pytest.raises(TimeoutError, match="has not returned"):
        agent.resume()
    assert len(calls) == 1
    release.set()
    for _ in range(100):
        if not any(t.name == "gpusnap-rebuild" for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert agent.resume()["state"] == "resident" and len(calls) == 2


@torch_missing
def test_a_rebuild_that_fails_fails_the_resume_with_its_error(tmp_path):
    from gpusnap.sdk import collectives
    from gpusnap.sdk.agent import Agent
    from gpusnap.sdk.registry import Registry

    def rebuild():
        raise RuntimeError("Gloo connectFullMesh failed")
    agent = collectives(Agent(Registry(), socket_dir=str(tmp_path), watchdog_s=None),
                        lambda: None, rebuild)
    agent.prepare()
    with pytest.raises(RuntimeError, match="connectFullMesh"):
        agent.resume()
    assert agent.state == "prepared"


def _epoch_in_time_namespace(boottime_s: int) -> str:
    import subprocess
    import sys
    code = "from gpusnap.sdk.collective import parent_epoch; print(parent_epoch())"
    r = subprocess.run(["unshare", "--time", "--fork", f"--boottime={boottime_s}",
                        sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    if r.returncode:
        pytest.skip(f"no time namespace here: {r.stderr.strip()[-200:]}")
    return r.stdout.strip()


def test_epoch_tells_time_namespaces_apart():
    """CRIU restores every copy of a snapshot into a time namespace whose clocks go on
    from the dump: the ranks of two copies see their launcher start at the same tick,
    and only the namespace's offset tells the copies apart."""
    import os
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1)")
    from gpusnap.sdk.collective import parent_epoch, timens_offset_ns
    assert timens_offset_ns() == 0 and "@" not in parent_epoch()
    one, two = _epoch_in_time_namespace(5), _epoch_in_time_namespace(7)
    assert one.endswith("@5000000000") and two.endswith("@7000000000")
    assert one != two
