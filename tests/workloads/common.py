"""What the test workloads share: a JSON request handler and a look at their logs."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler


class JsonHandler(BaseHTTPRequestHandler):
    """Quiet, and answers JSON; GET: {"ok": true, "pid": this process}."""

    def do_GET(self):
        self._send({"ok": True, "pid": os.getpid()})

    def log_message(self, *args):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def tail_logs(directory: str, names: list[str], chars: int = 3000) -> str:
    """The last chars of each log that exists, each under its name."""
    out = []
    for name in names:
        try:
            with open(os.path.join(directory, name), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-chars:]}")
        except OSError:
            pass
    return "\n".join(out)


def evidence(step: str, rc, out, err: str, logs: str, chars: int = 6000) -> str:
    """A failed test's message: a gpusnap step's exit code, its JSON and stderr (tails),
    then the workload's logs, so a cut run log still says why."""
    import json
    shown = json.dumps(out, indent=1) if isinstance(out, (dict, list)) else str(out)
    return (f"\n=== gpusnap {step}: exit {rc}\n--- json\n{shown[-chars:]}\n--- stderr\n"
            f"{(err or '')[-chars:]}\n=== workload logs\n{logs}")


def stacks_on_sigusr2() -> None:
    """A workload process prints every Python thread's stack on stderr at SIGUSR2."""
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR2, all_threads=True)


def ask_stacks(pids, settle_s: float = 1.0) -> None:
    """SIGUSR2 to each pid that is there (stacks_on_sigusr2), then a moment for them to
    reach the logs: called when a workload does not answer, before its logs are read."""
    import signal
    import time
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR2)
        except (ProcessLookupError, TypeError):
            pass
    time.sleep(settle_s)


def kill_all(pids) -> None:
    """SIGKILL each pid that is there (None and gone ones are skipped)."""
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


def ready_and_serve(server, state: str, info: dict) -> None:
    """Write STATE/ready (info, atomically), then serve forever."""
    tmp = os.path.join(state, "ready.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, os.path.join(state, "ready"))
    server.serve_forever()
