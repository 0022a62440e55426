"""A client of gpusnapd: HTTP over its unix socket with the standard library (http.client
does the HTTP; this module only connects it to a unix socket), so the CLI imports
nothing heavy to use the daemon."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Iterator

from ..errors import GpusnapError

# The commands the CLI sends to a daemon that answers (the rest run standalone). suspend
# and resume are what a standby pool or a GPU switch waits on: through the daemon they
# skip the interpreter's imports and libcuda's load.
FORWARDED = {"dump", "restore", "ls", "inspect", "verify", "warm", "rm", "gc",
             "suspend", "resume", "switch", "ps"}


def command_of(argv: list[str]) -> tuple[str | None, str | None]:
    """The subcommand of a gpusnap command line and its --store, if given."""
    store, args = None, iter(argv)
    for arg in args:
        if arg in ("--store", "--key-file"):
            value = next(args, None)
            store = value if arg == "--store" else store
        elif arg.startswith("--store="):
            store = arg.split("=", 1)[1]
        elif not arg.startswith("-"):
            return arg, store
    return None, store


class Unreachable(Exception):
    """No daemon answers on that socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str, timeout: float | None = None):
        self.socket_path = socket_path
        self.timeout = timeout

    def _send(self, method: str, path: str, body: dict | None):
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            raise Unreachable(f"{self.socket_path}: {exc.strerror or exc}") from None
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        return conn, conn.getresponse()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """(HTTP status, parsed JSON body)."""
        conn, resp = self._send(method, path, body)
        try:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def stream(self, method: str, path: str, body: dict | None = None) -> Iterator[dict]:
        """The NDJSON events of a streamed answer (an error answer: its one JSON body)."""
        conn, resp = self._send(method, path, body)
        try:
            if resp.status != 200:
                raw = resp.read()
                yield {"http_status": resp.status, **(json.loads(raw) if raw else {})}
                return
            while True:
                line = resp.readline()
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()

    def run(self, argv: list[str], cwd: str = "/", env: dict | None = None) -> tuple[int, str, str]:
        """Run a gpusnap command line on the daemon (/v1/run), as a controller does
        without starting a CLI: (exit code, stdout, stderr), as the CLI would have
        printed them. env: GPUSNAP_* variables for the command (others are not sent).
        Raises Unreachable when no daemon answers, GpusnapError when it refuses."""
        body = {"argv": [str(a) for a in argv], "cwd": cwd,
                "env": {k: v for k, v in (env or {}).items() if k.startswith("GPUSNAP_")}}
        out, err = [], []
        cause = None
        try:
            for event in self.stream("POST", "/v1/run", body):
                if "http_status" in event:      # refused: it ran nothing
                    raise refusal(event)
                if "stdout" in event:
                    out.append(event["stdout"])
                elif "stderr" in event:
                    err.append(event["stderr"])
                elif "exit_code" in event:
                    return int(event["exit_code"]), "".join(out), "".join(err)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            cause = exc
        raise went_away(cause)

    def cancel(self, op: str) -> None:
        try:
            self.request("POST", f"/v1/ops/{op}/cancel")
        except (Unreachable, OSError, http.client.HTTPException):
            pass


def refusal(answer: dict) -> GpusnapError:
    """The daemon's answer when it does not run a command (an HTTP error body)."""
    exc = GpusnapError(f"gpusnapd: {answer.get('message') or answer.get('http_status')}",
                       hint=answer.get("hint"))
    exc.exit_code = int(answer.get("exit_code") or 1)
    return exc


def went_away(cause: BaseException | None = None) -> GpusnapError:
    """A daemon that stopped answering in the middle of an operation (cause: how it
    showed, where known)."""
    return GpusnapError(f"gpusnapd went away mid-operation{f': {cause}' if cause else ''}",
                        hint="its operation was interrupted and undone")
