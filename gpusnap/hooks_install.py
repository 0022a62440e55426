"""Install gpusnap's CRIU action script for container runtimes, and take it out again.

    install:   hooks/gpusnap-criu-hook -> /usr/local/lib/gpusnap/gpusnap-criu-hook (0755,
               its first line pointing at this Python, `-I`, so that it imports this
               gpusnap's CUDA binding), and `action-script <that path>` in a CRIU config
               file: /etc/criu/runc.conf by default (runc reads it for docker, podman and
               runc itself; crun reads /etc/criu/crun.conf first, then runc.conf). An
               existing config file is copied to FILE.bak before it is changed; a second
               install changes nothing.
    uninstall: the line goes (a file left empty goes too); the script goes.

The files are written atomically (temp name, rename). Pure of click.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from .errors import InsecureStore, UsageError

DEFAULT_SCRIPT = "/usr/local/lib/gpusnap/gpusnap-criu-hook"
DEFAULT_CONFIG = "/etc/criu/runc.conf"
MARK = "# added by `gpusnap hooks install`"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(_REPO, "hooks", "gpusnap-criu-hook")


def _line_re(script: str) -> re.Pattern:
    return re.compile(r"^\s*action-script(\s+|\s*=\s*)([\"']?)" + re.escape(script) + r"\2\s*$")


def render_script(source: str, python: str, src_dir: str) -> str:
    """The hook with its interpreter and gpusnap's source dir filled in."""
    lines = source.splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        raise UsageError(f"{SOURCE} does not start with #!")
    lines[0] = f"#!{python} -I\n"
    out = "".join(lines)
    out, n = re.subn(r"^_SRC = None\b.*$", f"_SRC = {src_dir!r}", out, count=1, flags=re.M)
    if n != 1:
        raise UsageError(f"{SOURCE} has no `_SRC = None` line to fill in")
    return out


def add_line(text: str | None, script: str) -> str | None:
    """The config text with our action-script line, or None if it is already there."""
    text = text or ""
    if any(_line_re(script).match(line) for line in text.splitlines()):
        return None
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{MARK}\naction-script {script}\n"


def remove_line(text: str, script: str) -> str | None:
    """The config text without our line (and our mark), or None if it had neither."""
    pattern = _line_re(script)
    lines = text.splitlines(keepends=True)
    kept = [ln for ln in lines if not pattern.match(ln) and ln.strip() != MARK]
    return None if len(kept) == len(lines) else "".join(kept)


def _write_atomic(path: str, data: str, mode: int) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpusnap-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def install(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT,
            python: str | None = None, source: str = SOURCE) -> dict:
    """Returns {script, config, backup, changed: [paths written]}."""
    if not os.path.isabs(config) or not os.path.isabs(script):
        raise UsageError("--config and --script must be absolute paths")
    if re.search(r"\s", script):
        raise UsageError("the hook path must not contain spaces")
    interpreter = python or sys.executable
    untrusted = _writable_by_others([interpreter, sys.prefix, _REPO, os.path.join(_REPO, "gpusnap")])
    if untrusted:
        raise InsecureStore(
            "the hook runs as root at every container checkpoint with this interpreter and "
            f"source; {untrusted} can be changed by a user other than root",
            hint="install gpusnap where only root can write (e.g. under /opt), then run hooks install")
    try:
        with open(source) as f:
            text = render_script(f.read(), interpreter, _REPO)
    except FileNotFoundError:
        raise UsageError(f"hook source {source} not found (gpusnap runs from its source tree)") from None
    changed, backup = [], None
    if _read(script) != text or (os.stat(script).st_mode & 0o7777) != 0o755:
        _write_atomic(script, text, 0o755)
        changed.append(script)
    old = _read(config)
    new = add_line(old, script)
    if new is not None:
        if old is not None:
            backup = config + ".bak"
            shutil.copy2(config, backup)
        _write_atomic(config, new, 0o644)
        changed.append(config)
    return {"script": script, "config": config, "backup": backup, "changed": changed}


def _writable_by_others(paths: list[str]) -> str | None:
    """The first path (or a directory above it) not owned by root or open to group or
    other writes, else None."""
    for path in paths:
        cur = os.path.realpath(path)
        while not os.path.exists(cur) and cur != "/":
            cur = os.path.dirname(cur)          # not there yet: whoever can create it matters
        while True:
            st = os.stat(cur)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not (st.st_mode & 0o1000)):
                return cur
            if cur == "/":
                break
            cur = os.path.dirname(cur)
    return None


def uninstall(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT,
              remove_script: bool = True) -> dict:
    """Returns {script, config, changed: [paths changed or removed]}."""
    changed = []
    old = _read(config)
    if old is not None:
        new = remove_line(old, script)
        if new is not None:
            if new.strip():
                _write_atomic(config, new, os.stat(config).st_mode & 0o7777)
            else:
                os.unlink(config)
            changed.append(config)
    if remove_script and os.path.exists(script):
        os.unlink(script)
        changed.append(script)
    return {"script": script, "config": config, "changed": changed}


def installed(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT) -> bool:
    text = _read(config)
    return bool(text) and add_line(text, script) is None and os.access(script, os.X_OK)
