"""The `gpusnap` command. Where GPUSNAP_SOCKET is set, a command gpusnapd runs goes there
first (daemon/forward.py), before the CLI, its click and the engine are imported: the
process that talks to the daemon stays thin. Everything else, and everything when no
daemon answers, runs in the CLI (gpusnap/cli)."""

from __future__ import annotations

import os
import sys


def main(argv=None) -> None:
    args = list(argv if argv is not None else sys.argv[1:])
    if os.environ.get("GPUSNAP_SOCKET"):
        from .daemon.forward import forward
        from .errors import GpusnapError, Interrupted
        try:
            forward(args)                       # exits if gpusnapd ran it
        except (GpusnapError, KeyboardInterrupt) as exc:
            from .cli import fail, json_asked
            fail(exc if isinstance(exc, GpusnapError) else Interrupted(), json_asked(args))
    from .cli import main as cli_main
    cli_main(args)
