"""benchmarks/breadth.py's pure parts: what a row needs (--dry-run), the 120B-class
estimate from measured rates, and the tables of each row from rows shaped as the
benchmark writes them."""

from __future__ import annotations

import json

import pytest

from benchmarks import breadth
from tests.workloads.tp_server import shapes, shard_bytes


def test_shards_split_and_sizes_are_what_their_names_say():
    assert 15e9 < shard_bytes("8b", 1) < 17e9
    assert 58e9 < shard_bytes("30b", 1) < 64e9                  # ~60 GB bf16 on one H200
    for world in (2, 4, 8):
        assert shard_bytes("120b", world) * world > 220e9
        assert shard_bytes("120b", world) < 130e9                # one H200 holds its share
        assert len(shapes("8b", world)) == len(shapes("8b", 1))
    with pytest.raises(ValueError, match="3 ranks"):
        shapes("8b", 3)


def test_dry_run_plans_and_refuses_what_the_disk_cannot_hold(tmp_path, capsys):
    rc = breadth.main(["tp", "--dry-run", "--world", "2", "--work", str(tmp_path)])
    p = json.loads(capsys.readouterr().out)
    assert p["gpus_needed"] == 2 and p["weights_bytes"] == 2 * shard_bytes("8b", 2)
    assert (rc == 0) == p["fits"] == (p["disk_free_bytes"] >= p["disk_bytes"])
    rc = breadth.main(["tp", "--dry-run", "--world", "8", "--size", "120b", "--work", str(tmp_path)])
    p = json.loads(capsys.readouterr().out)
    assert rc == 1 and not p["fits"] and p["disk_bytes"] > 2 * 220e9
    with pytest.raises(SystemExit, match="split over 3"):
        breadth.main(["tp", "--dry-run", "--world", "3", "--work", str(tmp_path)])


def _tp_row(world=2):
    per_gpu_gb = shard_bytes("8b", world) / 1e9
    runs = [{"gpus": "same", "total": per_gpu_gb / 4, "dump_s": 9.0, "bytes_logical": 19e9,
             "bytes_out_of_image": None}, {"gpus": "1,0", "total": 5.0, "dump_s": 9.0,
                                           "bytes_logical": 19e9, "bytes_out_of_image": None}]
    sdk = [dict(r, total=per_gpu_gb / 8, bytes_out_of_image=18e9) for r in runs]
    return {"row": "tp", "size": "8b", "world": world, "runs": 1,
            "weights_bytes": world * shard_bytes("8b", world),
            "transparent": {"cold_s": [per_gpu_gb / 2], "restore": runs},
            "sdk": {"error": "RuntimeError: boom"} if world == 4 else {"cold_s": [20.0], "restore": sdk}}


def test_the_estimate_scales_the_measured_rate_per_gpu():
    rates = breadth.measured_rates(_tp_row())
    assert rates["restore_gbps_per_gpu"] == pytest.approx(4.0)
    assert rates["sdk_gbps_per_gpu"] == pytest.approx(8.0)
    assert rates["cold_gbps_per_gpu"] == pytest.approx(2.0)
    e = breadth.estimate_120b(rates, "120b", 8)
    assert e["restore_s"] == pytest.approx(shard_bytes("120b", 8) / 1e9 / 4.0, abs=0.01)
    assert e["sdk_s"] < e["restore_s"] < e["cold_s"]


def test_estimate_row_reads_the_tp_rows_json(tmp_path, capsys):
    with open(tmp_path / "breadth_tp_h200_8b_tp2.json", "w") as f:
        json.dump({"card": "NVIDIA H200", "row": _tp_row()}, f)
    assert breadth.main(["estimate", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "breadth_estimate_h200_120b.md").read_text()
    assert "TP=8" in md and "Not measured" in md


def test_every_row_has_a_table():
    switches = [{"suspend_s": 3.0, "resume_s": 1.5, "first_token_s": 0.05, "total": 4.55}]
    floor = [{"lock_s": 0.01, "checkpoint_s": 2.9, "restore_s": 1.2, "unlock_s": 0.01,
              "driver_s": 4.12, "first_token_s": 0.05, "total": 4.17}]
    rows = [
        {"row": "switch", "size": "8b", "weights_bytes": 16e9,
         "transparent": {"cold_s": [9.0, 9.5], "switches": switches, "floor": floor},
         "sdk": {"cold_s": [9.0, 9.5], "switches": switches}},
        {"row": "standby", "size": "1b", "weights_bytes": 2e9,
         "transparent": {"cold_s": 5.0, "runs": [{"total": 0.5, "resume_s": 0.4, "first_token_s": 0.1,
                                                  "standby_restore_s": 1.0, "host_memory": 3e9,
                                                  "gpu_memory_while_standby": 0}]},
         "sdk": {"error": "AgentFailed: x"}},
        _tp_row(), _tp_row(4),
        {"row": "b30", "size": "30b", "mode": "sdk", "weights_bytes": 61e9, "cold_s": 40.0,
         "dump_s": 5.0, "bytes_logical": 3e9, "bytes_stored": 1e9,
         "restore": {"total": 3.0, "criu_restore": 0.5, "sdk": {"gbps": 20}}},
        {"row": "diffusion", "size": "sd15", "weights_bytes": 2e9,
         "transparent": {"cold_s": 8.0, "restore": [{"total": 1.0, "dump_s": 2.0, "bytes_logical": 3e9,
                                                     "bytes_out_of_image": None}]}},
    ]
    for row in rows:
        md = breadth.summarise(row, "NVIDIA H200")
        assert md.startswith(f"# {row['row']} — NVIDIA H200") and "|---|" in md
    assert "+0.38 s from it" in breadth.summarise(rows[0], "NVIDIA H200")
    assert "failed: RuntimeError: boom" in breadth.summarise(rows[3], "x")


def test_b30_needs_more_disk_than_the_one_gpu_machine_has():
    need = breadth.b30_needs("30b")
    assert need["disk"] > 64 * 2**30 > need["weights"]
    assert need["disk"] < 128 * 2**30
    assert breadth.b30_needs("30b", compress="1")["disk"] < need["disk"]
    assert breadth.b30_needs("30b", "sdk")["disk"] < need["disk"]


def test_b30_drops_the_weights_file_only_where_that_makes_the_store_fit():
    need = breadth.b30_needs("30b")
    gib = 2**30
    assert breadth.b30_disk_plan(need, 128 * gib, model_there=False) is False
    # the one-GPU machine: the file made (57 GiB) and ~7 GiB left
    assert breadth.b30_disk_plan(need, 7 * gib, model_there=True) is True
    assert breadth.b30_disk_plan(need, 1 * gib, model_there=True) is None
    assert breadth.b30_disk_plan(breadth.b30_needs("30b", "sdk"), 7 * gib, model_there=True) is False
    assert breadth.b30_disk_plan(breadth.b30_needs("30b", "sdk"), 1 * gib, model_there=True) is None


def test_runs_through_two_front_doors_get_a_line_each():
    def run(via, total):
        return {"via": via, "total": total, "resume_s": total - 0.1, "first_token_s": 0.1,
                "standby_restore_s": 1.0, "host_memory": 3e9, "gpu_memory_while_standby": 0}
    standby = {"row": "standby", "size": "1b", "weights_bytes": 2e9,
               "transparent": {"cold_s": 5.0, "runs": [run("cli", 1.1), run("daemon", 0.8),
                                                       run("cli", 1.2), run("daemon", 0.7)]}}
    md = breadth.summarise(standby, "NVIDIA H200")
    assert "| transparent (cli) | 1.15 |" in md and "| transparent (daemon) | 0.75 |" in md
    switches = [{"via": "cli", "suspend_s": 3.0, "resume_s": 1.5, "first_token_s": 0.05, "total": 4.55},
                {"via": "daemon", "suspend_s": 2.8, "resume_s": 1.3, "first_token_s": 0.05, "total": 4.25}]
    floor = [{"lock_s": 0.01, "checkpoint_s": 2.9, "restore_s": 1.2, "unlock_s": 0.01,
              "driver_s": 4.12, "first_token_s": 0.05, "total": 4.17}]
    switch = {"row": "switch", "size": "8b", "weights_bytes": 16e9,
              "transparent": {"cold_s": [9.0, 9.5], "switches": switches, "floor": floor}}
    md = breadth.summarise(switch, "NVIDIA H200")
    assert "transparent (daemon)" in md and "+0.38 s (cli), +0.08 s (daemon) from it" in md


def test_diffusion_sizes_sdxl_on_the_gpu_tiny_on_the_cpu(tmp_path, capsys):
    assert breadth.main(["diffusion", "--dry-run", "--work", str(tmp_path)]) in (0, 1)
    p = json.loads(capsys.readouterr().out)
    assert p["size"] == "sdxl" and 5.2e9 < p["weights_bytes"] < 5.4e9    # SDXL's UNet + VAE, bf16
    assert p["disk_bytes"] < 64 * 2**30 and p["ram_bytes"] < 128 * 2**30  # one H200's machine
    breadth.main(["diffusion", "--dry-run", "--cpu", "--work", str(tmp_path)])
    p = json.loads(capsys.readouterr().out)
    assert p["size"] == "tiny" and p["weights_bytes"] < 10e6
    with pytest.raises(SystemExit, match="no size 'sd3'"):
        breadth.main(["diffusion", "--dry-run", "--size", "sd3", "--work", str(tmp_path)])


def test_diffusion_table_says_whether_the_image_was_the_same():
    def row(same, deterministic=True):
        run = {"total": 1.0, "dump_s": 2.0, "bytes_logical": 3e9, "bytes_out_of_image": None,
               "same_answer": same}
        return {"row": "diffusion", "size": "sdxl", "weights_bytes": 5.3e9,
                "transparent": {"cold_s": 8.0, "deterministic": deterministic, "restore": [run]}}
    assert "| transparent | 8.00 | 1.00 | 2.00 | 3.00 |  | yes |" in breadth.summarise(row(True), "x")
    assert "| no (nor twice before the dump) |" in breadth.summarise(row(False, False), "x")
