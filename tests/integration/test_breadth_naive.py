"""benchmarks/breadth.py's naive baseline with real CRIU on the CPU: a server with no CUDA
(the driver's part has no pids then) goes through naive_rounds' plain `criu dump` into
its images directory and `criu restore`, answers as before, and the row's table has its
naive line; the images are removed after."""

from __future__ import annotations

import argparse
import os

import pytest

from benchmarks import breadth

pytestmark = [pytest.mark.root]


def _ctx(tmp_path, runs: int) -> breadth.Ctx:
    args = argparse.Namespace(work=str(tmp_path), row="diffusion", budget=120.0, dry_run=False, cpu=True,
                              naive_runs=runs, store=None, daemon=False)
    return breadth.Ctx(args)


def test_naive_round_trips_of_a_server_come_back_with_the_same_answer(tmp_path):
    ctx = _ctx(tmp_path, runs=2)
    row = {"row": "diffusion", "size": "tiny", "weights_bytes": 1 << 20, "runs": 2,
           "transparent": {"cold_s": 1.0, "restore": [{"total": 0.5, "dump_s": 0.5, "bytes_logical": 1e6}]}}
    try:
        breadth.with_naive(ctx, row, breadth.naive_bytes("diffusion", 1 << 20), lambda images:
                           breadth._single_server_naive(ctx, "tests.workloads.echo_server", "-", "echo-naive",
                                                        18297, breadth.first_token, images),
                           lead_s=1.0)
    finally:
        for pid in breadth.STARTED:
            breadth.stop(pid)
    naive = row["naive"]
    assert "error" not in naive, naive["error"]
    assert naive["deterministic"] and len(naive["restore"]) == 2
    assert all(r["same_answer"] and r["bytes_logical"] > 0 and r["total"] > 0 for r in naive["restore"])
    assert not os.path.exists(naive["dir"])
    md = breadth.summarise(row, "cpu")
    assert "x naive" in md and "| naive |" in md and "2 run(s) (the other modes: 2 each)" in md

