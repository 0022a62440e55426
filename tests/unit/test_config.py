"""Settings: flag > environment > config file > default, as doctor prints them."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from gpusnap import config
from gpusnap.cli import cli


def _settings(runner, *args, env=None):
    res = runner.invoke(cli, [*args, "doctor", "--json"], env=env)
    assert res.exit_code == 0, res.output
    return {c["name"][len("setting "):]: c["detail"] for c in json.loads(res.output)
            if c["name"].startswith("setting ")}


@pytest.fixture
def conf_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("store: /srv/from-config\nthreads: 3\nlock_timeout: 4.5\ncompress: 7\n"
                    "log: /var/log/gpusnap-hook.log\n")
    monkeypatch.setenv("GPUSNAP_CONFIG", str(path))
    for s in config.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    yield path
    for env in list(config._exported):
        os.environ.pop(env, None)
    config._exported.clear()


def test_precedence_flag_env_config_default(conf_file, tmp_path):
    runner = CliRunner()
    got = _settings(runner)
    assert got["store"].startswith("/srv/from-config (config ")
    assert got["threads"].startswith("3 (config ")
    assert got["key_file"] == "None (default)"
    got = _settings(runner, env={"GPUSNAP_STORE": "/srv/from-env"})
    assert got["store"] == "/srv/from-env (env GPUSNAP_STORE)"
    got = _settings(runner, "--store", "/srv/from-flag", env={"GPUSNAP_STORE": "/srv/from-env"})
    assert got["store"] == "/srv/from-flag (flag --store)"


def test_config_reaches_the_options(conf_file):
    """dump's --lock-timeout and --compress take the config's values as their defaults."""
    ctx = cli.make_context("gpusnap", ["dump", "--help"], resilient_parsing=True)
    assert ctx.default_map["dump"] == {"lock_timeout": "4.5", "compress": "7"}
    assert ctx.default_map["store"] == "/srv/from-config"
    assert os.environ["GPUSNAP_THREADS"] == "3"            # read deep down: exported


def test_bad_config_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from gpusnap.cli import main
    path = tmp_path / "c.yaml"
    path.write_text("stroe: /x\n")
    monkeypatch.setenv("GPUSNAP_CONFIG", str(path))
    with pytest.raises(SystemExit) as exc:
        main(["ls"])
    assert exc.value.code == 2 and "unknown settings" in capsys.readouterr().err
    monkeypatch.setenv("GPUSNAP_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit) as exc:
        main(["ls"])
    assert exc.value.code == 2


def test_every_environment_variable_is_documented():
    """One README table names every GPUSNAP_* variable the code reads."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    used = set()
    for base, _dirs, files in os.walk(os.path.join(root, "gpusnap")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(base, name)) as f:
                    used |= set(re.findall(r"\b(GPUSNAP_[A-Z0-9_]+|CRTOOLS_[A-Z0-9_]+)\b", f.read()))
    used |= {s.env for s in config.SETTINGS}
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("### Environment variables"):]
    table = table[:table.index("\n#", 4)]
    assert not sorted(v for v in used if f"`{v}`" not in table)


def test_config_writable_by_others_is_refused(conf_file, capsys):
    from gpusnap.cli import main
    os.chmod(conf_file, 0o666)
    with pytest.raises(SystemExit) as exc:
        main(["ls"])
    assert exc.value.code == 43 and "other users" in capsys.readouterr().err
