"""The CLI through gpusnapd: where GPUSNAP_SOCKET (or the config file) names a daemon that
answers, a command
the daemon runs (daemon/client.FORWARDED) is sent there whole, and its stdout, stderr and
exit code come back as this process would have printed them; Ctrl-C or SIGTERM here
interrupts the operation there (its undo runs, and its message comes back). With no
daemon named, or none answering, the CLI runs standalone.

gpusnap/entry.py calls forward() before the CLI is imported: a command the daemon runs
costs this process the interpreter, this module, client.py and http.client, nothing more
(no click, engine, store or CUDA)."""

from __future__ import annotations

import os
import signal
import sys


def forward(argv: list[str], path: str) -> None:
    """Run argv on the daemon at socket path and exit with its exit code; return if it
    does not run that command or none answers there."""
    from ..daemon.client import FORWARDED, Client, Unreachable, command_of, refusal
    if command_of(argv)[0] not in FORWARDED or {"-h", "--help"} & set(argv):
        return
    client = Client(path)
    env = {k: v for k, v in os.environ.items() if k.startswith("GPUSNAP_")}
    events = client.stream("POST", "/v1/run", {"argv": list(argv), "cwd": os.getcwd(), "env": env})
    try:
        first = next(events)
    except Unreachable:
        return
    if "op" not in first:
        raise refusal(first)
    sys.exit(_follow(client, first["op"], events))


def _follow(client, op: str, events) -> int:
    from ..daemon.client import went_away
    def cancel(signum, frame):
        client.cancel(op)                       # the answer goes on: the undo's message, 130
    old = {sig: signal.signal(sig, cancel) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for event in events:
            if "stdout" in event:
                sys.stdout.write(event["stdout"])
                sys.stdout.flush()
            elif "stderr" in event:
                sys.stderr.write(event["stderr"])
                sys.stderr.flush()
            elif "exit_code" in event:
                return int(event["exit_code"])
    except OSError as exc:
        raise went_away(exc) from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    raise went_away()

