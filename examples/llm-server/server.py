"""An LLM server that cooperates with gpusnap: its weights stay out of snapshots.

    python server.py --model DIR [--port 8000] [--device cuda]

DIR is a Hugging Face model directory with *.safetensors (any causal LM transformers
loads). Endpoints on 127.0.0.1:PORT:
    GET  /health                                -> {"ok": true, "pid": ..., "sdk": state}
    POST /generate {"ids": [...], "max_new_tokens": n}   -> {"ids": [...]}   (greedy)

The three lines that matter are marked SDK: enable() after loading, and every use of
the model under agent.serving() so that no request runs while `gpusnap dump` has the
weights out (a request that comes then waits for them).
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM

import gpusnap.sdk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device).eval()
    agent = gpusnap.sdk.enable(model, args.model)                      # SDK: register + agent
    print(json.dumps({"pid": os.getpid(), "socket": agent.path, "backend": gpusnap.sdk.gds_backend(),
                      "registered_bytes": agent.registry.bytes, "kept": agent.registry.kept}), flush=True)

    def generate(ids: list[int], n: int) -> list[int]:
        with agent.serving(), torch.inference_mode():                   # SDK: the serving gate
            x = torch.tensor([ids], device=args.device)
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        return out[0, len(ids):].tolist()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"ok": True, "pid": os.getpid(), "sdk": agent.state})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send({"ids": generate(req.get("ids") or [1, 415, 2936], int(req.get("max_new_tokens", 8)))})

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
