"""A small model server that uses gpusnap.sdk, on CPU or GPU, for the SDK's tests.

    python -m tests.workloads.sdk_server --state DIR [--mib 64] [--device cpu|cuda]
        [--no-sdk] [--socket-dir D] [--fail-prepare] [--kv-mib 8]

Builds a stack of 1024x1024 float32 linear layers (--mib of weights, seeded), writes them
to DIR/model.safetensors (once), loads the model's tensors from that file, and (unless
--no-sdk) enables the SDK with a zero "KV cache" as scratch. Writes DIR/ready (pid,
socket) and, on SIGUSR1, DIR/report.json: the SHA-256 of the model's output on a fixed
input, the weight bytes resident, and the agent's state. The forward pass runs under
agent.serving(), so a report asked for while the weights are out comes after resume.
--fail-prepare makes every prepare fail (the dump must then go on in transparent mode).
Run it with stdio on files and in its own session (CRIU needs both).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import struct
import time

WIDTH = 1024


def write_safetensors(tensors: dict, path: str) -> None:
    """A minimal safetensors writer (the format: gpusnap/sdk/safetensors.py)."""
    write_safetensors_stream([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                             tensors.__getitem__, path)


ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64"}


def write_safetensors_stream(specs: list, produce, path: str) -> None:
    """The same file from (name, dtype, shape) specs, each tensor asked of produce(name)
    when its turn comes and let go after it is written: one tensor in host memory at a
    time (a 70B shard is 72 GB)."""
    import torch
    header, off = {}, 0
    for name, dtype, shape in specs:
        n = torch.empty(0, dtype=dtype).element_size()
        for d in shape:
            n *= d
        header[name] = {"dtype": ST_DTYPES[str(dtype).split(".")[-1]], "shape": list(shape),
                        "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, _, _ in specs:
                b = produce(name).detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                if b.numel() != want:
                    raise ValueError(f"{name}: {b.numel()} bytes, its spec says {want}")
                if want:        # the tensor's own memory, not a copy of it
                    f.write(memoryview((ctypes.c_char * want).from_address(b.data_ptr())))
                del b
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build(mib: int, device: str):
    import torch
    layers = max(1, mib * (1 << 20) // (WIDTH * WIDTH * 4))
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods).to(device)


def load_from(model, path: str) -> None:
    """Fill the model's tensors from the file (as a real server's loader would)."""
    import torch

    from gpusnap.sdk import read_header
    h = read_header(path)
    with open(path, "rb") as f, torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            e = h.entries[name]
            f.seek(e.offset)
            cpu = torch.empty(e.shape, dtype=t.dtype)
            f.readinto((ctypes.c_char * e.length).from_address(cpu.data_ptr()))
            t.copy_(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--kv-mib", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-sdk", action="store_true")
    ap.add_argument("--socket-dir")
    ap.add_argument("--fail-prepare", action="store_true")
    args = ap.parse_args()
    import torch
    torch.manual_seed(0)
    path = os.path.join(args.state, "model.safetensors")
    model = build(args.mib, args.device)
    if not os.path.exists(path):
        write_safetensors(model.state_dict(), path)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_from(model, path)
    kv = torch.ones(args.kv_mib << 18, dtype=torch.float32, device=args.device)   # "used"
    agent = None
    if not args.no_sdk:
        import gpusnap.sdk
        agent = gpusnap.sdk.enable(model, path, scratch={"kv": kv}, socket_dir=args.socket_dir)
        if args.fail_prepare:
            def refuse():
                raise RuntimeError("this server refuses to prepare (--fail-prepare)")
            agent.on_prepare.append(refuse)
    x = torch.linspace(-1, 1, WIDTH * 4, device=args.device).reshape(4, WIDTH)
    asked = []
    signal.signal(signal.SIGUSR1, lambda *a: asked.append(1))

    def report() -> None:
        with agent.serving() if agent else contextlib.nullcontext(), torch.no_grad():
            y = model(x).float().cpu().contiguous()
            resident = sum(p.numel() * p.element_size() for p in model.parameters())
            out = {"pid": os.getpid(), "output_sha256": hashlib.sha256(
                       ctypes.string_at(y.data_ptr(), y.numel() * 4)).hexdigest(),
                   "weight_bytes_resident": resident, "kv_numel": kv.numel(),
                   "kv_zero": bool((kv == 0).all()), "state": agent.state if agent else None}
        tmp = os.path.join(args.state, "report.json.tmp")
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.rename(tmp, os.path.join(args.state, "report.json"))

    with open(os.path.join(args.state, "ready.tmp"), "w") as f:
        json.dump({"pid": os.getpid(), "socket": agent.path if agent else None,
                   "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}, f)
    os.rename(os.path.join(args.state, "ready.tmp"), os.path.join(args.state, "ready"))
    while True:
        if asked:
            asked.clear()
            report()
        time.sleep(0.02)


if __name__ == "__main__":
    main()
