"""gpusnap.sdk.collectives: ranks stop at the same step, teardown runs before the
weights are dropped and rebuild after; the engine spares NCCL ranks whose agent promises
a teardown and insists that it happens. On CPU PyTorch, agents over real sockets."""

from __future__ import annotations

import importlib.util
import threading

import pytest

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
