"""The `gpusnap` command. Where GPUSNAP_SOCKET (else the config file's `socket:`) names
a daemon, a command gpusnapd runs goes there first (daemon/forward.py), before the CLI,
its click and the engine are imported: the process that talks to the daemon stays thin.
Everything else, and everything when no daemon answers, runs in the CLI (gpusnap/cli).
GPUSNAP_SOCKET set empty runs the CLI standalone, whatever the config file says."""

from __future__ import annotations

import os
import sys


def main(argv=None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    path = _socket()
    if path:
        from .daemon.forward import forward
        from .errors import GpusnapError, Interrupted
        try:
            forward(args, path)                 # exits if gpusnapd ran it
        except (GpusnapError, KeyboardInterrupt) as exc:
            from .cli import fail, json_asked
            fail(exc if isinstance(exc, GpusnapError) else Interrupted(), json_asked(args))
    from .cli import main as cli_main
    cli_main(args)


def _socket() -> str | None:
    """The daemon's socket to try: GPUSNAP_SOCKET, else the config file's `socket:`."""
    named = os.environ.get("GPUSNAP_SOCKET")
    if named is not None:
        return named or None
    from . import config
    from .errors import GpusnapError
    try:
        return config.load().get("socket") or None
    except GpusnapError:
        return None                             # the CLI says what is wrong with the file
