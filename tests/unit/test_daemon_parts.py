"""Pure parts of gpusnapd: command-line routing, metrics from engine results, JSON logs."""

from __future__ import annotations

import json
import logging

from gpusnap.daemon import api
from gpusnap.daemon.logs import JsonLines
from gpusnap.daemon.metrics import Metrics


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
