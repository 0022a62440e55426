"""Docs that match: every gpusnap command in README and examples/ parses, examples'
files are valid, and the docs name no feature that is not there."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from gpusnap.cli import cli

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in
                             glob.glob(os.path.join(REPO, "examples", "*", "README.md")))]
PLACEHOLDERS = {"PID": "4242", "IMAGE": "busybox"}


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks, continuation lines joined."""
    out, block = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            block = not block
            continue
        if block:
            if out and out[-1].endswith("\\"):
                out[-1] = out[-1][:-1] + " " + line.strip()
            else:
                out.append(line.strip())
    return out


def _gpusnap_commands(path: str) -> list[list[str]]:
    with open(os.path.join(REPO, path)) as f:
        lines = _code_lines(f.read())
    commands = []
    for line in lines:
        line = re.sub(r"\s#.*$", "", line)                  # a trailing comment
        line = re.sub(r"\[[^\]]*\]", "", line)               # [optional parts]
        line = line.split(" | ")[0].replace("...", "")
        if not line.startswith("gpusnap "):
            continue
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(line)[1:]]
        commands.append(words)
    return commands


CASES = [(doc, words) for doc in DOCS for words in _gpusnap_commands(doc)]


def test_docs_have_commands():
    assert len(CASES) > 30 and {d for d, _ in CASES} >= {"README.md", "examples/podman/README.md"}


@pytest.mark.parametrize("doc, words", CASES, ids=[f"{d}:{' '.join(w)}" for d, w in CASES])
def test_documented_command_parses(doc, words):
    """Every option and command of the line exists: --help after it parses the whole line."""
    res = CliRunner().invoke(cli, [*words, "--help"])
    assert res.exit_code == 0, res.output


def test_compose_files_parse_and_name_a_container():
    files = glob.glob(os.path.join(REPO, "examples", "**", "compose*.y*ml"), recursive=True)
    assert files
    for path in files:
        with open(path) as f:
            spec = yaml.safe_load(f)
        for name, service in spec["services"].items():
            assert service.get("image") or service.get("build"), name
            build = service.get("build")
            if isinstance(build, dict):
                context = os.path.join(os.path.dirname(path), build.get("context", "."))
                assert os.path.exists(os.path.join(context, build.get("dockerfile", "Dockerfile")))
        named = {s.get("container_name") for s in spec["services"].values()}
        with open(os.path.join(os.path.dirname(path), "README.md")) as f:
            dumped = [w for w in _gpusnap_commands(os.path.relpath(f.name, REPO)) if w[0] == "dump"]
        assert dumped and all(w[1] in named for w in dumped)


def test_criu_configs_name_the_installed_script():
    from gpusnap.criu.hook_install import DEFAULT_SCRIPT
    for path in glob.glob(os.path.join(REPO, "examples", "runtime-hooks", "*.conf")):
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.strip() and not ln.startswith("#")]
        assert ["action-script", DEFAULT_SCRIPT] in lines, path


def test_docs_name_no_feature_that_is_not_there():
    texts = DOCS + ["man/gpusnap.1", "pyproject.toml"]
    # The Kubernetes walkthrough is where the kubelet and CRI-O routes are documented, each
    # step marked as run or on paper; nothing else may claim them.
    walkthrough = os.path.join("examples", "kubernetes", "README.md")
    for path in texts:
        with open(os.path.join(REPO, path)) as f:
            text = f.read()
        if os.path.normpath(path) != walkthrough:
            assert "CRI-O" not in text and "kubelet" not in text, path
        assert "in about a second" not in text, path
