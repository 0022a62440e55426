"""The CLI contract users and scripts rely on: --json anywhere, JSON errors, stable types."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from gpusnap.cli import LazyGroup, cli, main

from test_cli import _store_with_snapshot


def _all_commands():
    """(path, command) for every command and subcommand, as the user reaches them."""
    ctx = click.Context(cli)
    out = []
    for name in LazyGroup.COMMANDS:
        cmd = cli.get_command(ctx, name)
        out.append(([name], cmd))
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            out.append(([name, sub_name], sub))
    return out


def _run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("path", [p for p, _ in _all_commands()], ids=" ".join)
def test_every_command_takes_json_after_it(path):
    res = CliRunner().invoke(cli, [*path, "--json", "--help"])
    assert res.exit_code == 0, res.output
    assert "--json" in res.output


def test_one_definition_of_json():
    helps = {next(p.help for p in cmd.params if p.name == "json") for _, cmd in _all_commands()}
    helps.add(next(p.help for p in cli.params if p.name == "json"))
    assert len(helps) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_command(tmp_path, where):
    path, sid = _store_with_snapshot(tmp_path)
    args = ["--store", path] + (["--json", "ls"] if where == "before" else ["ls", "--json"])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and json.loads(res.output)[0]["id"] == sid


@pytest.mark.parametrize("args, code", [
    (["dump", "--no-such-flag", "--json"], 2),          # click's usage error, --json after
    (["--json", "restore"], 2),                         # missing argument
    (["inspect", "nope", "--json"], 3),                 # gpusnap's own error
])
def test_errors_are_json_on_stdout(tmp_path, capsys, args, code):
    path, _ = _store_with_snapshot(tmp_path)
    got, out, err = _run_main(["--store", path, *args], capsys)
    assert got == code
    body = json.loads(out)
    assert {"error", "exit_code", "hint", "message"} <= set(body)
    assert body["exit_code"] == code and isinstance(body["error"], str)
    assert "gpusnap: error:" in err and "Traceback" not in err


def test_usage_error_without_json_is_text(capsys):
    got, out, err = _run_main(["dump", "--no-such-flag"], capsys)
    assert got == 2 and out == "" and "No such option" in err


@pytest.mark.parametrize("args, hint", [
    (["ls", "--store", "/x"], "give it before the command (`gpusnap --store VALUE ls ...`), or set GPUSNAP_STORE"),
    (["seed", "add", "--key-file", "k"], "(`gpusnap --key-file VALUE seed add ...`), or set GPUSNAP_KEY_FILE"),
    (["restore", "-v", "x"], "(`gpusnap -v restore ...`)"),
])
def test_gpusnaps_own_option_after_the_command_says_where_it_goes(capsys, args, hint):
    got, out, err = _run_main(["--json", *args], capsys)
    body = json.loads(out)
    assert got == 2 and hint in body["hint"] and "is an option of gpusnap itself" in body["hint"]
    assert "Did you mean" not in body["message"]            # not a command's option instead
    got, _out, err = _run_main(["ls", "--jsn"], capsys)     # a command's own: as before
    assert "Did you mean '--json'?" in err and "`gpusnap ls --help` lists what it takes" in err


def test_inspect_files_changes_text_and_types_stay(tmp_path):
    path, sid = _store_with_snapshot(tmp_path)
    runner = CliRunner()
    plain = runner.invoke(cli, ["--store", path, "inspect", "web"]).output
    listed = runner.invoke(cli, ["--store", path, "inspect", "web", "--files"]).output
    assert "core-1.img" not in plain and "core-1.img" in listed
    for extra in ([], ["--files"]):
        info = json.loads(runner.invoke(cli, ["--store", path, "inspect", "web", "--json", *extra]).output)
        assert isinstance(info["files"], list) and isinstance(info["logs"], list)
        assert info["files"][0] == {"path": "core-1.img", "size": 100, "mode": info["files"][0]["mode"],
                                    "chunks": 1}


def test_unexpected_errors_have_no_traceback(tmp_path, capsys, monkeypatch):
    import gpusnap.store.repository as repository
    path, _ = _store_with_snapshot(tmp_path)

    def boom(self):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(repository.Repository, "scan", boom)
    got, out, err = _run_main(["--store", path, "ls", "--json"], capsys)
    assert got == 1 and "Traceback" not in err and "simulated bug" in json.loads(out)["message"]


def test_kernel_thread_is_refused_clearly(tmp_path, capsys):
    store = tmp_path / "store"
    got, _out, err = _run_main(["--store", str(store), "dump", "--pid", "2"], capsys)
    assert got == 2 and "kernel thread" in err and "Traceback" not in err
    assert not store.exists(), "a refused dump creates no store"


def test_key_generate_onto_an_existing_file(tmp_path, capsys):
    key = tmp_path / "k"
    key.write_text("keep me")
    got, out, err = _run_main(["key", "generate", str(key), "--json"], capsys)
    assert got == 2 and json.loads(out)["exit_code"] == 2 and "never overwritten" in err
    assert key.read_text() == "keep me"


def test_export_into_a_missing_directory(tmp_path, capsys):
    path, _ = _store_with_snapshot(tmp_path)
    got, _out, err = _run_main(["--store", path, "export", "web", str(tmp_path / "no" / "x.tar")], capsys)
    assert got == 2 and "no directory" in err


def test_export_to_stdout_and_import_from_stdin(tmp_path):
    import subprocess
    import sys
    path, sid = _store_with_snapshot(tmp_path)
    other = str(tmp_path / "other")
    gpusnap = [sys.executable, "-m", "gpusnap"]
    exp = subprocess.Popen([*gpusnap, "--store", path, "export", "web", "-", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imp = subprocess.run([*gpusnap, "--store", other, "import", "-", "--json"], stdin=exp.stdout,
                         capture_output=True, text=True, timeout=60)
    exp.stdout.close()
    assert exp.wait(timeout=60) == 0 and imp.returncode == 0, imp.stderr
    assert json.loads(exp.stderr.read())["id"] == sid       # the report went to stderr
    assert json.loads(imp.stdout)["id"] == sid
