"""An HTTP server that answers with bytes drawn at its start: the same answer after a
round trip means the process came back, not a new one. No GPU; it speaks the serve
protocol of llm_server.py (STATE/ready, POST /generate -> {"ids": [...]}), so
benchmarks/breadth.py's row helpers drive it on the CPU.

    python -m tests.workloads.echo_server serve --model IGNORED --port P --state DIR
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    from http.server import HTTPServer

    from tests.workloads.common import JsonHandler, ready_and_serve
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["serve"])
    ap.add_argument("--model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", required=True)
    a = ap.parse_args()
    drawn = list(os.urandom(8))

    class Handler(JsonHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"ids": drawn})

    ready_and_serve(HTTPServer(("127.0.0.1", a.port), Handler), a.state,
                    {"pid": os.getpid(), "port": a.port, "load_s": 0.0})


if __name__ == "__main__":
    main()
