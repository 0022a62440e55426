"""Install gpusnap's CRIU action script for container runtimes, and take it out again.

    install:   /usr/local/lib/gpusnap/gpusnap-criu-hook (0755): a few lines that run
               gpusnap.criu.hook with this Python, isolated (`-I`), so nothing of the
               source tree or the caller's environment is in it; and `action-script <that
               path>` in a CRIU config file: /etc/criu/runc.conf by default (runc reads it
               for docker, podman and runc itself; crun reads /etc/criu/crun.conf first,
               then runc.conf). An existing config file is copied to FILE.bak before it is
               changed; a second install changes nothing.
    uninstall: the line goes (a file left empty goes too); the script goes, unless another
               CRIU config beside it or in /etc/criu (runc.conf, crun.conf,
               default.conf) still names it.

Both destinations must be directories only root can change. Every file is written to a
new temp name (O_EXCL, O_NOFOLLOW) and renamed into place with its mode, so a link left
at a destination (FILE.bak included) is replaced, never written through. Pure of click.
"""

from __future__ import annotations

import os
import re
import stat
import sys

from .. import interrupts
from ..errors import InsecureStore, UsageError
from ..paths import replace_file, writable_by_others

DEFAULT_SCRIPT = "/usr/local/lib/gpusnap/gpusnap-criu-hook"
DEFAULT_CONFIG = "/etc/criu/runc.conf"
MARK = "# added by `gpusnap hooks install`"
ENTRY = "gpusnap.criu.hook"


def _line_re(script: str) -> re.Pattern:
    return re.compile(r"^\s*action-script(\s+|\s*=\s*)([\"']?)" + re.escape(script) + r"\2\s*$")


def render_script(python: str, source: str | None = None) -> str:
    """The installed hook: this interpreter, isolated, running gpusnap.criu.hook; source:
    a directory holding the gpusnap package where python's own site does not (a node
    prepared by examples/kubernetes/install-node.sh)."""
    path = f"sys.path.insert(0, {source!r})\n" if source else ""
    return (f"#!{python} -I\n"
            f'"""gpusnap\'s CRIU action script, written by `gpusnap hooks install`: '
            f'see {ENTRY}."""\n'
            f"import sys\n\n{path}"
            f"from {ENTRY} import main  # noqa: E402\n\n"
            f"sys.exit(main())\n")


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


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _mode(path: str, default: int) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return default
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else default


def check_destinations(paths: list[str]) -> None:
    """Refuse a destination whose directory is open to group or other writes (sticky or
    not) or not owned by root, or has such a directory above it: whoever can change it
    can change what root runs at every checkpoint."""
    for path in paths:
        directory = os.path.dirname(path)
        cur = directory
        while not os.path.exists(cur) and cur != "/":
            cur = os.path.dirname(cur)
        st = os.stat(cur)
        bad = writable_by_others([cur]) or (cur if st.st_mode & 0o022 else None)
        if bad:
            raise InsecureStore(f"{directory} for {path}: {bad} can be changed by a user other "
                                f"than root", hint="pick a directory only root can write")


def _check_interpreter(python: str) -> None:
    """The hook's interpreter must be root's alone, and must find gpusnap on its own
    (isolated: no PYTHONPATH, no current directory), as it will under CRIU."""
    import gpusnap

    from .. import sysrun
    package = os.path.dirname(os.path.abspath(gpusnap.__file__))
    untrusted = writable_by_others([python, sys.prefix, package])
    if untrusted:
        raise InsecureStore(
            "the hook runs as root at every container checkpoint with this interpreter and "
            f"package; {untrusted} can be changed by a user other than root",
            hint="install gpusnap where only root can write (e.g. under /opt), then run hooks install")
    try:
        probe = sysrun.run([python, "-I", "-c", f"import {ENTRY}"], cwd="/", timeout=120)
    except OSError as e:
        raise UsageError(f"cannot run {python}: {e.strerror}") from None
    if not probe.ok:
        raise UsageError(f"{python} -I cannot import {ENTRY}: {probe.stderr.strip()[-300:]}",
                         hint="install gpusnap into that Python (pip install gpusnap, or "
                              "pip install -e . in a checkout); PYTHONPATH does not reach the hook")


def install(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT,
            python: str | None = None) -> dict:
    """Returns {script, config, backup, changed: [paths written]}."""
    if not os.path.isabs(config) or not os.path.isabs(script):
        raise UsageError("--config and --script must be absolute paths")
    if re.search(r"\s", script):
        raise UsageError("the hook path must not contain spaces")
    interpreter = python or sys.executable
    _check_interpreter(interpreter)
    check_destinations([script, config])
    text = render_script(interpreter)
    changed, backup = [], None
    created = not os.path.lexists(script)
    if _read(script) != text or _mode(script, 0) != 0o755:
        _write(script, text, 0o755)
        changed.append(script)
    try:
        old = _read(config)
        new = add_line(old, script)
        if new is not None:
            mode = _mode(config, 0o644)
            if old is not None:
                backup = config + ".bak"
                _write(backup, old, mode)
            _write(config, new, mode)
            changed.append(config)
    except BaseException:
        if created and script in changed and config not in changed:
            # a script no config names: the one this call wrote goes again
            with interrupts.shielded():
                os.unlink(script)
        raise
    return {"script": script, "config": config, "backup": backup, "changed": changed}


def _write(path: str, text: str, mode: int) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    replace_file(path, text.encode(), mode=mode)


def uninstall(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT,
              remove_script: bool = True) -> dict:
    """Returns {script, config, changed: [paths changed or removed]}."""
    changed = []
    old = _read(config)
    if old is not None:
        new = remove_line(old, script)
        if new is not None:
            if new.strip():
                check_destinations([config])
                _write(config, new, _mode(config, 0o644))
            else:
                os.unlink(config)
            changed.append(config)
    still = _other_configs_naming(config, script)
    if remove_script and not still and os.path.lexists(script):
        os.unlink(script)
        changed.append(script)
    return {"script": script, "config": config, "changed": changed, "still_named_by": still}


CONFIG_NAMES = ("runc.conf", "crun.conf", "default.conf")     # what runc, crun and CRIU read


def _other_configs_naming(config: str, script: str) -> list[str]:
    """The CRIU configs beside config, and in /etc/criu, other than config, whose
    action-script line names script (examples/kubernetes/install-node.sh adds it to
    crun.conf too): the script stays for them, else their checkpoints would fail."""
    places = {os.path.join(d, name) for d in (os.path.dirname(os.path.abspath(config)), "/etc/criu")
              for name in CONFIG_NAMES}
    return sorted(p for p in places
                  if os.path.realpath(p) != os.path.realpath(config)
                  and add_line(_read(p), script) is None)


def installed(config: str = DEFAULT_CONFIG, script: str = DEFAULT_SCRIPT) -> bool:
    text = _read(config)
    return bool(text) and add_line(text, script) is None and os.access(script, os.X_OK)
