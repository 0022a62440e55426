"""`gpusnap hooks install` from a wheel installed into a fresh venv: the hook it writes
must run with no checkout on disk, so it may name nothing of the source tree.

The fresh venv gets gpusnap from the wheel alone; its dependencies (click, psutil,
pyyaml, ...) come from this test's own environment through a path in a .pth file, which
adds that directory but does not run the .pth files in it, so the editable install of
the checkout living there stays inactive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="installs into root-owned directories")]


def run(argv, **kw):
    res = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{argv}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        pytest.skip("setuptools >= 70.1 is needed to build the wheel offline (scripts/setup.sh)")
    src = base / "src"      # a copy: no build/ left in the checkout, none of its stale files in
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(   # the wheel
        ".*", "build", "dist", "*.egg-info", "__pycache__", "benchmarks", "tests", "examples"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(base / "dist"), str(src)], cwd=str(base))
    wheel, = (base / "dist").glob("gpusnap-*.whl")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", str(wheel)])
    site = run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    with open(os.path.join(site, "zz-test-deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    return venv


def test_wheel_install_resolves_gpusnap_to_the_wheel(wheel_venv):
    where = run([str(wheel_venv / "bin" / "python"), "-I", "-c",
                 "import gpusnap.criu.hook, yaml; print(gpusnap.criu.hook.__file__)"],
                cwd="/").strip()
    assert where.startswith(str(wheel_venv)) and REPO not in where, where
    assert os.access(wheel_venv / "bin" / "gpusnap-criu-hook", os.X_OK), "the console script"


def test_hook_installed_from_a_wheel_names_no_source_path_and_runs(wheel_venv, tmp_path):
    conf, script = tmp_path / "criu" / "runc.conf", tmp_path / "lib" / "gpusnap-criu-hook"
    run([str(wheel_venv / "bin" / "gpusnap"), "hooks", "install", "--config", str(conf),
         "--script", str(script)], cwd=str(tmp_path))
    body = script.read_text()
    assert REPO not in body and REPO not in conf.read_text(), body
    assert body.startswith(f"#!{wheel_venv}/bin/python")
    assert conf.read_text().endswith(f"action-script {script}\n")
    # as CRIU runs it for an action it only logs, and with no action at all
    for env in ({}, {"CRTOOLS_SCRIPT_ACTION": "no-such-action"}):
        res = subprocess.run([str(script)], env=env, cwd="/", capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
    run([str(wheel_venv / "bin" / "gpusnap"), "hooks", "uninstall", "--config", str(conf),
         "--script", str(script)], cwd=str(tmp_path))
    assert not script.exists() and not conf.exists()
