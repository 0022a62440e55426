"""Find a CRIU >= 4.1: criu on PATH, then the private prefixes that scripts/install-criu.sh
fills. $GPUSNAP_CRIU, when set, names the one CRIU to use: no fallback to another (a CRIU
named on purpose that is missing is an error, not a reason to run a different one)."""

from __future__ import annotations

import functools
import os
import re
import shutil

from .. import sysrun
from ..errors import CriuMissing

MIN_VERSION = (4, 1)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRIVATE_PREFIXES = ["/opt/gpusnap/criu/bin/criu", os.path.join(_REPO_ROOT, ".deps/criu/bin/criu")]


INSTALL_HINT = (
    "install CRIU >= 4.1 as root. Debian 13 or later: `apt install criu`; Debian 12 "
    "(ships 3.17, which fails on 6.x kernels): `make setup` or scripts/install-criu.sh in a "
    "gpusnap checkout puts Debian unstable's CRIU into /opt/gpusnap/criu; Ubuntu: the CRIU "
    "project's PPA, `add-apt-repository ppa:criu/ppa && apt install criu`; Fedora: "
    "`dnf install criu` (check `criu --version`); elsewhere: build it (criu.org/Installation). "
    "gpusnap finds criu on PATH, in /opt/gpusnap/criu, or where GPUSNAP_CRIU points")


def parse_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def candidates() -> list[str]:
    if os.environ.get("GPUSNAP_CRIU"):
        return [os.environ["GPUSNAP_CRIU"]]
    out = []
    on_path = shutil.which("criu", path=os.environ.get("PATH", sysrun.SAFE_PATH) + ":/usr/sbin:/sbin")
    if on_path:
        out.append(on_path)
    out += [p for p in PRIVATE_PREFIXES if os.path.exists(p)]
    return out


@functools.lru_cache(maxsize=None)
def find_criu() -> tuple[str, str]:
    """(path, version string) of the first usable CRIU, or CriuMissing."""
    seen = []
    for path in candidates():
        try:
            res = sysrun.run([path, "--version"], timeout=20)
        except OSError as exc:
            seen.append(f"{path} (cannot run: {exc.strerror or exc})")
            continue
        version = parse_version(res.stdout)
        seen.append(f"{path} ({'.'.join(map(str, version)) if version else 'unknown'})")
        if version and version[:2] >= MIN_VERSION:
            return path, ".".join(map(str, version))
    found = "; found " + ", ".join(seen) if seen else ""
    hint = ("GPUSNAP_CRIU names the CRIU to use: point it at CRIU >= 4.1, or unset it"
            if os.environ.get("GPUSNAP_CRIU") else INSTALL_HINT)
    raise CriuMissing(f"CRIU >= {MIN_VERSION[0]}.{MIN_VERSION[1]} is not installed{found}", hint=hint)
