"""The CLI without CRIU: help, exit codes, JSON, store commands on a store built by hand."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from gpusnap.cli import cli, main
from gpusnap.model import Target
from gpusnap.store import Repository

from conftest import commit_snapshot


def _store_with_snapshot(tmp_path) -> tuple[str, str]:
    path = str(tmp_path / "store")
    repo = Repository.open(path)
    src = tmp_path / "img"
    src.mkdir()
    (src / "core-1.img").write_bytes(b"x" * 100)
    m = commit_snapshot(repo, str(src), "web", target=Target("process", 9, [9], name="py"),
                        criu_version="4.2.1", kernel="6", timings={"criu_dump": 0.1})
    return path, m.id


def test_help_lists_commands_and_exit_codes():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for word in ("dump", "restore", "verify", "doctor", "Exit codes", "No such snapshot"):
        assert word in res.output


def test_ls_inspect_verify_rm_gc_json(tmp_path):
    path, sid = _store_with_snapshot(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["--store", path, "--json", "ls"])
    assert json.loads(res.output)[0]["id"] == sid
    res = runner.invoke(cli, ["--store", path, "--json", "inspect", "web"])
    info = json.loads(res.output)
    assert info["id"] == sid and info["bytes_logical"] == 100
    res = runner.invoke(cli, ["--store", path, "--json", "verify"])
    assert res.exit_code == 0 and json.loads(res.output)["bad"] == []
    res = runner.invoke(cli, ["--store", path, "--json", "rm", sid[:5]])
    assert json.loads(res.output)["removed"] == [sid]
    res = runner.invoke(cli, ["--store", path, "--json", "gc"])
    assert json.loads(res.output)["chunks"] == 1


def test_errors_map_to_exit_codes(tmp_path, capsys):
    path, _ = _store_with_snapshot(tmp_path)
    for args, code in ((["inspect", "nope"], 3), (["dump"], 2)):
        try:
            main(["--store", path, "--json", *args])
        except SystemExit as exc:
            assert exc.code == code, args
    os.chmod(path, 0o755)
    try:
        main(["--store", path, "ls"])
    except SystemExit as exc:
        assert exc.code == 43


def test_bench_without_a_gpu_says_so(tmp_path, monkeypatch):
    import gpusnap.engine.demo as demo
    monkeypatch.setattr(demo, "gpu_available", lambda: False)
    try:
        main(["--store", str(tmp_path / "s"), "bench"])
    except SystemExit as exc:
        assert exc.code == 20


def test_bench_loads_the_harness_of_the_checkout():
    from gpusnap.cli import cmd_bench
    harness = cmd_bench._harness()
    assert callable(harness.main) and harness.PROMPT


def test_commands_that_only_read_create_no_store(tmp_path, capsys):
    """A mistyped --store is an error, not a new empty store (ls says there is none)."""
    missing = str(tmp_path / "typo")
    res = CliRunner().invoke(cli, ["--store", missing, "--json", "ls"])
    assert res.exit_code == 0 and res.output.rstrip().endswith("[]")
    for args in (["inspect", "x"], ["verify"], ["restore", "x"], ["rm", "x"], ["gc"], ["warm", "x"]):
        try:
            main(["--store", missing, *args])
        except SystemExit as exc:
            assert exc.code == 40, args
        assert "no gpusnap store" in capsys.readouterr().err
    assert not os.path.exists(missing)


def test_progress_bars_start_no_thread(monkeypatch):
    """A tty's progress bar must not cost ingest and materialise their worker processes
    (they fall back to threads when another thread runs)."""
    import sys
    import threading

    from gpusnap.cli.context import AppContext
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    app = AppContext.__new__(AppContext)
    app.quiet, app.as_json = False, False
    with app.progress("x", 10) as update:
        update(5)
        assert threading.active_count() == 1


def test_the_timings_table_keeps_page_stream_figures_out_of_the_total():
    """stream_* are the receiver's seconds inside criu_dump, workers' summed seconds and
    their count: not stages (the demo's total once added 16 workers as 16 s)."""
    from gpusnap.cli.context import timings_table
    text = timings_table({"plan": 0.5, "criu_dump": 1.0, "pages_finish": 0.25, "commit_sync": 0.25,
                          "cuda_restore": 0.5, "commit": 0.5, "stream_recv": 0.4,
                          "stream_w_write": 30.0, "stream_workers": 16})
    assert "total                 3.000 s" in text
    assert "16 workers, summed:" in text and "writing 30.000 s" in text
    assert "cuda_restore ran at the same time as pages_finish" in text
    assert "stream_workers" not in text and "slots of 16 MiB" not in text
    grown = timings_table({"criu_dump": 1.0, "stream_recv": 0.4, "stream_slots": 1721,
                           "stream_slots_peak": 598, "stream_workers": 16})
    assert "total                 1.000 s" in grown
    assert "slots of 16 MiB: 1721 allowed, 598 used at most" in grown
    assert "reading the private slots" not in grown and "new chunks" not in grown
    private = timings_table({"criu_dump": 1.0, "stream_recv": 0.4, "stream_workers": 16,
                             "stream_private": 1, "stream_w_read": 2.5, "stream_close_s": 0.9,
                             "stream_new_gb_at_close": 1.5, "stream_end_s": 1.25})
    assert "reading the private slots 2.500 s" in private and "total                 1.000 s" in private
    assert "new chunks: 1.50 GB stored by CRIU's end, 0.900 s after the first slot; the last 1.250 s" in private
