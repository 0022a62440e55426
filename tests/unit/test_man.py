"""Man pages and shell completion come from the CLI's click metadata."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO
from gpusnap.cli import cli

GEN = runpy.run_path(os.path.join(REPO, "scripts", "gen-man.py"), run_name="gen_man")


def test_checked_in_man_pages_match_the_cli():
    pages = GEN["pages"]()
    man = os.path.join(REPO, "man")
    on_disk = {n for n in os.listdir(man) if n.endswith(".1")}
    assert on_disk == set(pages), "run scripts/gen-man.py"
    for name, text in pages.items():
        with open(os.path.join(man, name)) as f:
            assert f.read() == text, f"man/{name} is stale: run scripts/gen-man.py"


@pytest.mark.parametrize("name", sorted(GEN["pages"]()))
def test_every_help_option_is_in_its_page(name):
    path = name[:-2].split("-")
    res = CliRunner().invoke(cli, [*path[1:], "--help"])
    assert res.exit_code == 0
    with open(os.path.join(REPO, "man", name)) as f:
        page = f.read().replace("\\-", "-")
    options = [w.strip(",") for line in res.output.splitlines() for w in line.split()
               if w.startswith("--") and line.startswith("  -")]
    assert options and all(o in page for o in options), options


def test_man_renders():
    if not os.path.exists("/usr/bin/man"):
        pytest.skip("no man(1)")
    res = subprocess.run(["man", "-l", os.path.join(REPO, "man", "gpusnap-dump.1")],
                         capture_output=True, text=True, env={**os.environ, "MANWIDTH": "100"})
    assert res.returncode == 0 and "--compress" in res.stdout.replace("‐", "-")


def _complete(args: list[str], incomplete: str, store: str) -> list[str]:
    env = {"_GPUSNAP_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["gpusnap", *args, incomplete]),
           "COMP_CWORD": str(len(args) + 1), "GPUSNAP_STORE": store}
    res = subprocess.run([sys.executable, "-m", "gpusnap"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    return [line.split(",", 1)[1] for line in res.stdout.splitlines() if "," in line]


def test_completion_of_commands_and_snapshot_names(tmp_path):
    from test_cli import _store_with_snapshot
    path, sid = _store_with_snapshot(tmp_path)
    assert "dump" in _complete([], "du", path)
    assert _complete(["restore"], "w", path) == ["web"]
    assert sid in _complete(["inspect"], sid[:3], path)
    assert "--json" in _complete(["ls"], "--j", path)
