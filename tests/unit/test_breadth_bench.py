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
    assert (rc == 0) == p["fits"] == (p["disk_free_bytes"] >= p["disk_bytes"]
                                      and p["ram_available_bytes"] >= p["ram_bytes"])
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
    switch["transparent"]["floor_thp"] = [{**floor[0], "checkpoint_s": 2.5, "total": 3.77}]
    md = breadth.summarise(switch, "NVIDIA H200")
    assert "huge-page window" in md and "+0.78 s (cli), +0.48 s (daemon) from that" in md
    # gpusnap switch: a line per door and way; the overlapped floor beside the sequential one
    switches.append({"via": "daemon", "way": "daemon, switch", "suspend_s": 2.8, "resume_s": 1.3,
                     "first_token_s": 0.05, "total": 2.95})
    switch["transparent"]["floor_overlapped"] = [{**floor[0], "driver_s": 2.92, "total": 2.97}]
    md = breadth.summarise(switch, "NVIDIA H200")
    assert "| transparent (daemon, switch) | 2.95 |" in md
    assert "overlapped by hand" in md and "-0.02 s (daemon, switch) from that" in md


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


# ---- the naive baseline ----------------------------------------------------------------------

GIB = 2**30


def test_naive_images_go_to_ram_only_where_ram_holds_them_beside_the_host_copy():
    images = breadth.naive_bytes("b30", breadth.b30_needs("30b")["weights"])
    assert 62e9 < images < 64e9
    # the one-GPU machine: 128 GiB of RAM, /dev/shm half of it, the disk emptied of the
    # store (the weights file dropped): the images go to the disk
    one = breadth.naive_place(images, 126 * GIB, [("/dev/shm/x", 63 * GIB, True), ("/w/naive", 64 * GIB, False)])
    assert one == {"dir": "/w/naive", "in_ram": False, "images_bytes": images}
    # the two-GPU machine: 256 GiB of RAM
    two = breadth.naive_place(images, 252 * GIB, [("/dev/shm/x", 126 * GIB, True), ("/w/naive", 64 * GIB, False)])
    assert two["dir"] == "/dev/shm/x" and two["in_ram"]
    # nowhere: why, place by place
    none = breadth.naive_place(images, 126 * GIB, [("/dev/shm/x", 63 * GIB, True), ("/w/naive", 7 * GIB, False)])
    assert none["dir"] is None and "/dev/shm/x: in RAM" in none["why"] and "/w/naive: 7.5 GB free" in none["why"]
    # a small server's images: /dev/shm, as cold_start.py's naive baseline
    small = breadth.naive_place(breadth.naive_bytes("standby", 2 * 10**9), 126 * GIB,
                                [("/dev/shm/x", 63 * GIB, True), ("/w/naive", 64 * GIB, False)])
    assert small["dir"] == "/dev/shm/x"
    assert breadth.naive_bytes("diffusion", 5.3e9) > 2 * 5.3e9          # images hold a cache as big
    assert 100 < breadth.naive_seconds(images) < 150 and breadth.naive_seconds(0) == 10


def test_b30_free_after_counts_the_weights_file_unless_dropped():
    w = breadth.b30_needs("30b")["weights"]
    assert breadth.b30_free_after(7 * GIB, w, w, True) == 7 * GIB + w          # dropped: its room too
    assert breadth.b30_free_after(70 * GIB, w, w, False) == 70 * GIB           # made, stays
    assert breadth.b30_free_after(120 * GIB, 0, w, False) == 120 * GIB - w     # to be made, stays
    assert breadth.b30_free_after(GIB, 0, w, None) == 0


def _machine(monkeypatch, ram: int, shm_free: int, work_free: int):
    """The dry-run's facts of a GPU machine: RAM, /dev/shm (a tmpfs) and the disk's free bytes."""
    import collections
    import shutil

    import psutil

    from gpusnap.engine import workdir
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, shm_free if str(p).startswith("/dev/shm")
                                                              else work_free))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: usage(ram, 0, 0))
    monkeypatch.setattr(workdir, "tmpfs_of", lambda p: "/dev/shm" if str(p).startswith("/dev/shm") else None)


def test_b30_dry_run_says_where_the_naive_images_would_go(tmp_path, capsys, monkeypatch):
    model = tmp_path / "models" / "30b" / "model.safetensors"
    model.parent.mkdir(parents=True)
    with open(model, "wb") as f:                    # the weights file b30make made (sparse)
        f.truncate(breadth.b30_needs("30b")["weights"])
    _machine(monkeypatch, ram=126 * GIB, shm_free=63 * GIB, work_free=7 * GIB)
    assert breadth.main(["b30", "--dry-run", "--work", str(tmp_path)]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["drops_weights_file"] is True
    assert p["naive"]["dir"] == str(tmp_path / "naive-images") and p["naive"]["in_ram"] is False
    assert p["naive"]["runs"] == 1 and p["naive"]["estimate_s"] > 100
    _machine(monkeypatch, ram=252 * GIB, shm_free=126 * GIB, work_free=7 * GIB)
    breadth.main(["b30", "--dry-run", "--naive-runs", "2", "--work", str(tmp_path)])
    p = json.loads(capsys.readouterr().out)
    assert p["naive"]["dir"].startswith("/dev/shm/") and p["naive"]["runs"] == 2
    for argv, says in ((["--no-naive"], "off"), (["--mode", "sdk"], "b30 --mode transparent")):
        breadth.main(["b30", "--dry-run", "--work", str(tmp_path), *argv])
        assert says in json.loads(capsys.readouterr().out)["naive"]
    breadth.main(["tp", "--dry-run", "--work", str(tmp_path)])
    assert "ghost-limit" in json.loads(capsys.readouterr().out)["naive"]


def _naive_standby(total=0.6):
    run = {"total": total, "resume_s": total - 0.05, "first_token_s": 0.05, "standby_restore_s": 2.0,
           "restore_total": total + 2.0, "host_memory": 3e9, "gpu_memory_while_standby": 0,
           "criu_restore": 2.0, "cuda_restore+unlock": total - 0.05, "first_token": 0.05, "dump_s": 3.0}
    return {"dir": "/dev/shm/gpusnap-bench-naive", "in_ram": True, "cold_s": 6.0, "runs": [run]}


def _standby(naive=None):
    run = {"total": 0.5, "resume_s": 0.45, "first_token_s": 0.05, "standby_restore_s": 1.0,
           "host_memory": 3e9, "gpu_memory_while_standby": 0}
    return {"row": "standby", "size": "1b", "weights_bytes": 2e9, "runs": 3,
            "transparent": {"cold_s": 5.0, "runs": [run]}, "sdk": {"cold_s": 5.0, "runs": [dict(run, total=0.3)]},
            **({"naive": naive} if naive else {})}


def test_standby_table_has_the_naive_line_and_x_naive_only_with_naive_numbers():
    md = breadth.summarise(_standby(), "x")
    assert "x naive" not in md and "naive" not in md
    md = breadth.summarise(_standby(_naive_standby(0.6)), "x")
    assert "| mode | resume to first token | x naive | resume |" in md
    assert "| transparent | 0.50 | 1.20 | 0.45 |" in md and "| sdk | 0.30 | 2.00 |" in md
    assert "| naive | 0.60 | 1.00 | 0.55 | 0.05 | 2.00 | 3.00 | 0.00 | 6.00 |" in md
    assert "1 run(s) (the other modes: 3 each)" in md and "/dev/shm/gpusnap-bench-naive (host memory)" in md
    assert "whole naive restore to first token: 2.60 s" in md
    skipped = breadth.summarise(_standby({"skipped": "no room for 3 GB"}), "x")
    assert "| naive | skipped: no room for 3 GB |" in skipped and "x naive" not in skipped
    failed = breadth.summarise(_standby({"error": "CriuFailed: criu dump failed"}), "x")
    assert "| naive | failed: CriuFailed: criu dump failed |" in failed and "x naive" not in failed


def test_b30_and_diffusion_tables_put_naive_beside_the_transparent_numbers():
    b30 = {"row": "b30", "size": "30b", "mode": "transparent", "weights_bytes": 61e9, "cold_s": 18.0,
           "dump_s": 70.0, "bytes_logical": 61.8e9, "bytes_stored": 61e9,
           "restore": {"total": 15.6, "criu_restore": 0.2, "cuda_restore": 10.1}}
    md = breadth.summarise(b30, "x")
    assert "x naive" not in md
    naive = {"dir": "/w/naive-images", "in_ram": False, "runs": [
        {"dump_s": 75.0, "bytes_logical": 62e9, "same_answer": True, "criu_restore": 33.0,
         "cuda_restore+unlock": 10.0, "first_token": 0.05, "total": 43.05}]}
    md = breadth.summarise(dict(b30, naive=naive), "x")
    assert "| transparent | 18.00 | 70.00 | 61.80 | 61.00 | 15.60 | 2.76 | criu_restore 0.20" in md
    assert "| naive |  | 75.00 | 62.00 |  | 43.05 | 1.00 | criu_restore 33.00, cuda_restore+unlock 10.00" in md
    assert "/w/naive-images (disk)" in md
    assert "| naive | failed: TimeoutError" in breadth.summarise(dict(b30, naive={"error": "TimeoutError: x"}), "x")
    run = {"total": 2.0, "dump_s": 2.0, "bytes_logical": 3e9, "bytes_out_of_image": None, "same_answer": True}
    diffusion = {"row": "diffusion", "size": "sdxl", "weights_bytes": 5.3e9, "runs": 2,
                 "transparent": {"cold_s": 8.0, "restore": [run]},
                 "naive": {"dir": "/dev/shm/n", "in_ram": True, "cold_s": 9.0, "deterministic": True,
                           "restore": [dict(run, total=5.0, bytes_logical=11e9)]}}
    md = breadth.summarise(diffusion, "x")
    assert "| transparent | 8.00 | 2.00 | 2.50 | 2.00 | 3.00 |  | yes |" in md
    assert "| naive | 9.00 | 5.00 | 1.00 | 2.00 | 11.00 |  | yes |" in md


def test_tp_table_says_why_it_has_no_naive_line():
    assert "no naive baseline: a plain `criu dump`" in breadth.summarise(_tp_row(), "x")


def test_no_naive_flag_and_naive_runs():
    assert breadth.parse(["standby"]).naive_runs == 1
    assert breadth.parse(["standby", "--no-naive"]).naive_runs == 0
    assert breadth.parse(["diffusion", "--naive-runs", "3"]).naive_runs == 3


def test_a_budget_without_room_for_the_naive_step_records_why_and_starts_nothing(tmp_path, monkeypatch):
    import argparse
    monkeypatch.setattr(breadth, "naive_where", lambda *a: {"dir": "/dev/shm/n", "in_ram": True})
    args = argparse.Namespace(work=str(tmp_path), row="standby", budget=5.0, dry_run=True, naive_runs=1)
    ctx = breadth.Ctx(args)
    row, started = {"row": "standby"}, []
    breadth.with_naive(ctx, row, 10**9, started.append)
    assert not started and "TimeoutError" in row["naive"]["error"] and "budget" in row["naive"]["error"]
    args.naive_runs = 0
    row = {"row": "standby"}
    breadth.with_naive(breadth.Ctx(args), row, 10**9, started.append)
    assert row == {"row": "standby"} and not started


def test_reader_modes_start_their_servers_with_that_reader(monkeypatch):
    """--modes sdk,sdk_mapped: the sdk_mapped mode runs as SDK with GPUSNAP_SDK_READER=mapped
    in the environment its servers inherit, and only while it runs."""
    import types
    monkeypatch.delenv("GPUSNAP_SDK_READER", raising=False)
    monkeypatch.setattr(breadth, "llm_model", lambda ctx, size: "/nowhere")
    monkeypatch.setattr(breadth, "_weights", lambda model: 1)
    seen = []

    def mode_fn(ctx, model, sdk, mode=None):
        import os
        seen.append((sdk, mode, os.environ.get("GPUSNAP_SDK_READER")))
        return {}
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(size="8b", runs=1, modes="sdk,sdk_mapped"))
    row = breadth.llm_row(ctx, "switch", mode_fn)
    assert seen == [(True, None, None), (True, "sdk_mapped", "mapped")]
    assert set(row) >= {"sdk", "sdk_mapped"} and "transparent" not in row
    import os
    assert "GPUSNAP_SDK_READER" not in os.environ


def test_the_api_door_runs_commands_on_a_real_gpusnapd_from_this_process(tmp_path):
    """breadth --api: a command sent to the daemon's /v1/run by the benchmark itself (no
    interpreter started), its JSON answer as the CLI's; refused without a daemon."""
    import argparse
    args = argparse.Namespace(work=str(tmp_path), row="switch", budget=300, daemon=True, api=True,
                              cpu=True, dry_run=False)
    ctx = breadth.Ctx(args)
    try:
        via, env = ctx.doors()[-1]          # starts gpusnapd on the row's store
        assert via == "daemon"
        assert [w[0] for w in breadth._switch_ways(ctx)] == ["daemon"] * 3 + ["api"] * 2
        assert [d[0] for d in ctx.doors_and_api()] == ["cli", "daemon", "api"]
        assert ctx.run("api", "ps", env=env) == [] == ctx.run("daemon", "ps", env=env)
        with pytest.raises(RuntimeError, match="api door needs --daemon"):
            ctx.api("ps", env={"GPUSNAP_SOCKET": ""})
        with pytest.raises(RuntimeError, match=r"\(api\): exit 25"):
            ctx.api("resume", "999999", env=env)
    finally:
        ctx.close()


def test_tp_needs_count_what_each_mode_keeps():
    w = 145 << 30
    both = breadth.tp_needs(w, 2, ["transparent", "sdk"])
    sdk = breadth.tp_needs(w, 2, ["sdk"])
    assert both["disk"] == 2 * w + (4 << 30) and both["ram"] == w + (16 << 30)
    assert sdk["disk"] == w + (4 << 30) + (4 << 30) and sdk["ram"] == 16 << 30


def test_asked_modes_default_and_refusal():
    class A:
        row, modes = "tp", None
    assert breadth.asked_modes(A()) == list(breadth.MODES)
    A.modes = "sdk"
    assert breadth.asked_modes(A(), breadth.MODES) == ["sdk"]
    A.modes = "sdk_mapped"
    with pytest.raises(SystemExit, match="not one of"):
        breadth.asked_modes(A(), breadth.MODES)


def test_b30_table_has_a_line_per_further_door():
    row = {"row": "b30", "size": "30b", "mode": "sdk", "weights_bytes": 61e9, "cold_s": 20.0,
           "dump_s": 2.3, "bytes_logical": 1.0e9, "bytes_stored": 0.2e9, "warm_s": 0.4,
           "restores": [{"via": "cli", "total": 3.6, "plan": 0.2},
                        {"via": "daemon", "total": 3.2, "plan": 0.01},
                        {"via": "api", "total": 2.9, "plan": 0.01}]}
    row["restore"] = row["restores"][0]
    md = breadth.summarise(row, "NVIDIA H200")
    assert "| sdk (cli, images warmed) | 20.00 | 2.30 | 1.00 | 0.20 | 3.60 |" in md
    assert "| sdk (daemon, images warmed) |  |  |  |  | 3.20 |" in md
    assert "| sdk (api, images warmed) |  |  |  |  | 2.90 |" in md
