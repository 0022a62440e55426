"""Pure parts of gpusnapd: command-line routing, metrics from engine results, JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from gpusnap.daemon import api, gpufacts
from gpusnap.daemon.logs import JsonLines
from gpusnap.daemon.metrics import Metrics
from s3server import s3_env, s3_server  # noqa: F401


def test_command_of_finds_the_subcommand_and_store_past_global_options():
    assert api.command_of(["--json", "--store", "/s", "-v", "dump", "--pid", "1"]) == ("dump", "/s")
    assert api.command_of(["--store=/x", "ls"]) == ("ls", "/x")
    assert api.command_of(["--key-file", "k", "restore", "a"]) == ("restore", None)
    assert api.command_of(["--json"]) == (None, None)


def test_metrics_take_stage_timings_and_bytes_from_results():
    m = Metrics()
    m.observe("dump", 1.5, 0, [{"timings": {"criu_dump": 0.4, "ingest": 0.9}, "bytes_logical": 100,
                                "bytes_new": 40, "via": "daemon"}])
    m.observe("restore", 0.2, 11, [])
    text = m.render().decode()
    assert 'gpusnap_stage_seconds_count{op="dump",stage="ingest"} 1.0' in text
    assert 'gpusnap_bytes_total{kind="bytes_new",op="dump"} 40.0' in text
    assert 'gpusnap_operations_total{op="restore",result="exit_11"} 1.0' in text


def test_logs_are_json_lines_with_their_fields():
    record = logging.LogRecord("gpusnapd", logging.INFO, __file__, 1, "finished", None, None)
    record.fields = {"op": "dump-1-2", "exit_code": 0}
    entry = json.loads(JsonLines().format(record))
    assert entry["msg"] == "finished" and entry["op"] == "dump-1-2" and entry["level"] == "info"


def test_gpu_facts_are_gpuinfo_dicts_or_nothing():
    gpu = {"index": 0, "uuid": "GPU-1", "name": "H200", "memory_total": 8, "memory_free": 4,
           "pci_bus_id": "0:1", "minor": 0}
    assert gpufacts.parse(json.dumps([gpu]).encode()) == [gpu]
    assert gpufacts.parse(b"null") is None
    for bad in (b"{}", b'[{"uuid": "GPU-1"}]', b"[", b'[{"index": 0, "evil": 1}]'):
        with pytest.raises(ValueError):
            gpufacts.parse(bad)


def test_the_gpu_facts_helper_answers_and_goes_away():
    """A real helper process: on this host NVML answers nothing (or the GPUs), in time."""
    facts = gpufacts.GpuFacts()
    facts.start()
    pid = facts.pid
    try:
        for _ in range(2):
            gpus = asyncio.run(facts.ask(timeout=10))
            assert gpus is None or all("uuid" in g for g in gpus)
            assert facts.nvml is (gpus is not None)
        assert os.path.exists(f"/proc/{pid}")
    finally:
        facts.stop()
    assert not os.path.exists(f"/proc/{pid}") and asyncio.run(facts.ask()) is None


def test_a_restore_plans_with_the_gpus_it_was_given_once():
    from gpusnap.engine import gpu
    from gpusnap.model import CudaFacts
    given = [{"index": 0, "uuid": "GPU-aa", "name": "H200", "memory_total": 8 << 30,
              "memory_free": 8 << 30, "pci_bus_id": "0:1", "minor": 0}]
    facts = CudaFacts(pids=[1], gpus=[{"uuid": "GPU-aa", "name": "H200", "memory_total": 8 << 30}])
    gpu.use_host_gpus(given)
    move = gpu.plan_remap(facts, None)
    assert move.host == given and move.pairs is None
    assert gpu._given is None, "used once: the next plan asks NVML"


def test_the_daemon_loads_an_s3_stores_client_library_once_for_its_children(s3_env):
    """Each operation's child makes its client from the session the daemon made (no
    request sent): no import of botocore and no first client per restore."""
    from gpusnap.store.backends import s3
    s3._sessions.clear()
    api.warm_imports(f"s3://{s3_env}/warm")
    assert len(s3._sessions) == 1
    api.warm_imports("/a/local/store")
    assert len(s3._sessions) == 1
