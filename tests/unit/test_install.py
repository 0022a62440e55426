"""`pip install .` gives a working gpusnap, and its doctor says what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO


@pytest.mark.slow
def test_installed_wheel_runs_without_the_checkout(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), REPO], check=True, capture_output=True, timeout=300,
                   cwd=tmp_path)
    wheel = next(wheels.glob("gpusnap-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # -S: no site-packages, so not the checkout's editable install; the dependencies from
    # this venv's site-packages, after the installed copy
    deps = sysconfig.get_paths()["purelib"]
    code = ("import sys; sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]; "
            "import gpusnap; assert gpusnap.__file__.startswith(sys.path[0]), gpusnap.__file__; "
            "from gpusnap.cli import main; main()")
    env = {**os.environ, "GPUSNAP_CRIU": str(tmp_path / "no-criu")}
    res = subprocess.run([sys.executable, "-S", "-c", code, str(target), deps, "--json", "doctor"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert checks["criu"]["status"] == "missing" and "4.1" in checks["criu"]["detail"]
    assert "GPUSNAP_CRIU" in checks["criu"]["fix"]
    assert checks["root"]["status"] in ("ok", "missing")


def test_criu_missing_says_how_to_install_it(monkeypatch):
    from gpusnap.criu import locate
    for distro in ("Debian", "Ubuntu", "Fedora", "4.1"):
        assert distro in locate.INSTALL_HINT
