"""A small transformers inference server, the workload gpusnap exists for.

    python -m tests.workloads.llm_server make --size 1b --out DIR     # random weights -> safetensors
    python -m tests.workloads.llm_server serve --model DIR --port P --state DIR [--sdk]

`make` builds a Llama-style causal LM from a config with random weights (no model hub
needed) and saves config.json + model.safetensors. `serve` loads it with
from_pretrained onto the GPU, warms up (one generation), writes STATE/ready, and answers
on localhost:
    GET  /health                    -> {"ok": true, "pid": ...}
    POST /generate {"ids": [...], "max_new_tokens": n}   -> {"ids": [...]} (greedy)
Greedy decoding on fixed ids makes "the same tokens as before" checkable.
--sdk enables gpusnap.sdk after loading: `gpusnap dump` then drops the weights before the
checkpoint and `gpusnap restore` reads them back from model.safetensors; every generation
runs under agent.serving() so none runs while the weights are out.
Run it with stdio on files and in its own session (CRIU needs both).
"""

from __future__ import annotations

import argparse
import json
import os
import time

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)  ~params
    "tiny": (256, 2, 4, 4, 688, 32000),          # smoke tests
    "0.5b": (1024, 24, 16, 16, 2816, 32000),     # ~0.46B
    "1b": (2048, 16, 32, 8, 5632, 32000),        # ~1.1B (TinyLlama-shaped)
    "1.5b": (2048, 24, 16, 8, 5632, 32000),      # ~1.5B
    "8b": (4096, 32, 32, 8, 14336, 128256),      # Llama-3-8B-shaped
    "30b": (6656, 56, 52, 52, 17920, 32000),     # LLaMA-30B-shaped, 56 layers: ~30B, ~61 GB bf16
}
PROMPT = [1, 415, 2936, 9060, 285, 1142, 461, 10575, 754, 272, 17898, 3914, 28723]


def _config(size: str):
    from transformers import LlamaConfig
    h, n, heads, kv, inter, vocab = SIZES[size]
    return LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       torch_dtype="bfloat16")


def make(size: str, out: str, seed: int = 0) -> None:
    import torch
    from transformers import LlamaForCausalLM
    os.makedirs(out, exist_ok=True)
    config = _config(size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)     # built in bf16: a 30b in fp32 would not fit the GPU
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # rotary buffers were left empty by to_empty: from_pretrained recomputes them.
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    write_safetensors(os.path.join(out, "model.safetensors"), state)
    config.save_pretrained(out)


def write_safetensors(path: str, state: dict) -> None:
    """The safetensors file of state ({name: bf16 tensor} on any device), one tensor in
    host memory at a time: a 30B model's 61 GB would not fit twice in a 128 GiB host (as
    model.cpu() + save_file need). The format: the header's length (8 bytes, little
    endian), the JSON header padded to 8 bytes, the tensors' bytes in the header's order."""
    import torch
    names = sorted(state)
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        t = state[name]
        if t.dtype != torch.bfloat16:
            raise ValueError(f"{name}: {t.dtype}, only bf16 is written here")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in names:
            t = state[name].detach().contiguous().view(torch.int16).cpu()
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    return model


def generate(model, ids: list[int], n: int) -> list[int]:
    import torch
    with torch.inference_mode():
        x = torch.tensor([ids], device="cuda")
        out = model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def serve(model_dir: str, port: int, state: str, sdk: bool = False) -> None:
    import contextlib
    from http.server import HTTPServer

    from tests.workloads.common import JsonHandler, ready_and_serve
    t0 = time.time()
    model = load(model_dir)
    t_load = time.time()
    agent = None
    if sdk:
        import gpusnap.sdk
        agent = gpusnap.sdk.enable(model, os.path.join(model_dir, "model.safetensors"))
    t_enable = time.time()

    def serving():
        return agent.serving() if agent else contextlib.nullcontext()

    with serving():
        warm = generate(model, PROMPT, 4)
    t_warm = time.time()

    class Handler(JsonHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with serving():
                ids = generate(model, req.get("ids") or PROMPT, int(req.get("max_new_tokens", 1)))
            self._send({"ids": ids})

    ready_and_serve(HTTPServer(("127.0.0.1", port), Handler), state,
                    {"pid": os.getpid(), "port": port, "load_s": t_load - t0, "warm_s": t_warm - t_enable,
                     "sdk_enable_s": t_enable - t_load, "warm_ids": warm,
                     "sdk": agent.status() if agent else None})


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--size", choices=sorted(SIZES), default="1b")
    m.add_argument("--out", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, default=18080)
    s.add_argument("--state", required=True)
    s.add_argument("--sdk", action="store_true", help="enable gpusnap.sdk (weights out of snapshots)")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.size, args.out)
    else:
        serve(args.model, args.port, args.state, args.sdk)


if __name__ == "__main__":
    main()
