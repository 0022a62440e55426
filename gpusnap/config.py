"""gpusnap's settings and where each comes from: flag > environment > config file > default.

The config file is YAML, /etc/gpusnap/config.yaml unless GPUSNAP_CONFIG names another
(the CRIU action script reads its own keys, log/lock_timeout_ms/remap, from the same
file). Click applies the order for settings that are flags (config values become its
default_map); the ones read deeper down, from the environment (work dir, threads), get
the config's value exported into the environment when the environment has none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InsecureStore, UsageError

DEFAULT_PATH = "/etc/gpusnap/config.yaml"
HOOK_KEYS = ("log", "lock_timeout_ms", "remap")     # the CRIU action script's own


@dataclass(frozen=True)
class Setting:
    key: str                  # in config.yaml
    env: str
    default: object
    flag: str | None          # the option that sets it, "--store" or "dump --lock-timeout"
    help: str


SETTINGS = [
    Setting("store", "GPUSNAP_STORE", "/var/lib/gpusnap", "--store", "the snapshot store: a directory, or s3://BUCKET/PREFIX"),
    Setting("key_file", "GPUSNAP_KEY_FILE", None, "--key-file", "key of an encrypted store"),
    Setting("cache", "GPUSNAP_CACHE", "/var/cache/gpusnap", "--cache",
            "local chunk cache of an s3:// store"),
    Setting("cache_size", "GPUSNAP_CACHE_SIZE", "20G", "--cache-size",
            "bound of that cache (least recently used chunks go first)"),
    Setting("workdir", "GPUSNAP_WORKDIR", None, None,
            "scratch for CRIU images (unset: gpusnap's huge-page tmpfs as root, else /dev/shm)"),
    Setting("threads", "GPUSNAP_THREADS", None, None,
            "worker processes for ingest, materialise, verify (unset: the CPUs, at most 16)"),
    Setting("compress", "GPUSNAP_COMPRESS", "fast", "dump --compress",
            "zstd level of new chunks: fast, 1-19, bf16 (byte planes), or none"),
    Setting("engine", "GPUSNAP_ENGINE", None, "dump --engine",
            "container engine, docker or podman (unset: whichever knows the name)"),
    Setting("lock_timeout", "GPUSNAP_LOCK_TIMEOUT", 10.0, "dump --lock-timeout",
            "seconds to wait for CUDA work in flight before locking"),
    Setting("huge_pages", "GPUSNAP_HUGE_PAGES", "auto", None,
            "auto: the host's THP mode is 'always' while the CUDA driver checkpoints (where "
            "it is 'madvise'), so the device memory it moves lands in 2 MiB pages; off: "
            "leave the mode alone"),
    Setting("socket", "GPUSNAP_SOCKET", "/run/gpusnap/gpusnapd.sock", None,
            "the API socket of gpusnapd, the daemon: the CLI runs its commands there "
            "when one answers (set empty: standalone)"),
]
BY_KEY = {s.key: s for s in SETTINGS}
_exported: set[str] = set()          # environment variables set from the config file


def path() -> str:
    return os.environ.get("GPUSNAP_CONFIG") or DEFAULT_PATH


def load(where: str | None = None) -> dict:
    """The config file's settings ({} where there is none); UsageError if it is malformed."""
    where = where or path()
    try:
        with open(where) as f:
            _check_owner(where, os.fstat(f.fileno()))
            text = f.read()
    except FileNotFoundError:
        if os.environ.get("GPUSNAP_CONFIG"):
            raise UsageError(f"GPUSNAP_CONFIG names {where}, which does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read the config file {where}: {exc.strerror}") from None
    import yaml
    try:
        conf = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"the config file {where} is not valid YAML: {exc}") from None
    if not isinstance(conf, dict):
        raise UsageError(f"the config file {where} must be a mapping of settings")
    unknown = sorted(set(conf) - set(BY_KEY) - set(HOOK_KEYS))
    if unknown:
        raise UsageError(f"unknown settings in {where}: {', '.join(map(str, unknown))}",
                         hint="known: " + ", ".join(BY_KEY))
    return {k: v for k, v in conf.items() if k in BY_KEY and v is not None}


def _check_owner(where: str, st: os.stat_result) -> None:
    """The file names the store and the key: only root or this user may be able to change it."""
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise InsecureStore(f"the config file {where} can be changed by other users "
                            f"(owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})",
                            hint=f"chmod go-w {where}")


def default_map(conf: dict) -> dict:
    """click's default_map for the config's settings that are flags."""
    out: dict = {}
    for key, value in conf.items():
        flag = BY_KEY[key].flag
        if not flag:
            continue
        *command, option = flag.split()
        name = option.lstrip("-").replace("-", "_")
        (out.setdefault(command[0], {}) if command else out)[name] = str(value)
    return out


def export_env(conf: dict) -> None:
    """Settings read from the environment deep down get the config's value where the
    environment has none (environment > config)."""
    for key, value in conf.items():
        setting = BY_KEY[key]
        if not setting.flag and setting.env not in os.environ:
            os.environ[setting.env] = str(value)
            _exported.add(setting.env)


def effective(conf: dict, flags: dict[str, object] | None = None) -> list[dict]:
    """Each setting's value and its source: flag, env, config or default."""
    flags = flags or {}
    rows = []
    for s in SETTINGS:
        if s.key in flags:
            value, source = flags[s.key], f"flag {s.flag}"
        elif s.env in os.environ and s.env not in _exported:
            value, source = os.environ[s.env], f"env {s.env}"
        elif s.key in conf:
            value, source = conf[s.key], f"config {path()}"
        else:
            value, source = s.default, "default"
        rows.append({"setting": s.key, "value": value, "source": source, "env": s.env})
    return rows
