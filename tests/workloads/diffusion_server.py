"""A latent-diffusion server with random weights: a diffusers UNet2DConditionModel and
AutoencoderKL (SDXL-shaped, SD-1.5-shaped, or tiny), a DDIM scheduler, fixed
conditioning tensors in place of the text encoders.

    python -m tests.workloads.diffusion_server make --size sdxl --out DIR [--device cpu]
    python -m tests.workloads.diffusion_server serve --model DIR --port P --state DIR [--sdk]

`make` builds both models from their configs (no download), random weights, bf16, and
saves them with save_pretrained (DIR/unet, DIR/vae: safetensors). `serve` loads them onto
the GPU with from_pretrained, warms up, writes STATE/ready and answers on localhost:
    POST /generate {"steps": n, "seed": s} -> {"sha256": of the decoded image, "shape": [...]}
A fixed seed makes "the same image as before" checkable. --sdk enables gpusnap.sdk over
the UNet (the bulk of the weights; the VAE stays in the image), every generation under
agent.serving(). Run it with stdio on files and in its own session (CRIU needs both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

# Each size's UNet and VAE. sdxl: the SDXL base UNet's shape (2.57 B parameters, its
# pooled-text and size conditioning included), 1024x1024 images; sd15: SD 1.5's (0.86 B),
# 512x512; tiny: SDXL's structure at toy widths (the CPU's size: it runs the sdxl code path).
XL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time")
UNETS = {
    "sdxl": dict(XL_BLOCKS, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=1280 + 6 * 256, sample_size=128),
    "sd15": dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, sample_size=64),
    "tiny": dict(XL_BLOCKS, block_out_channels=(32, 64, 64), layers_per_block=1,
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32,
                 attention_head_dim=8, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=16,
                 norm_num_groups=32),
}
VAES = {
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                 scaling_factor=0.13025),
    "sd15": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=128,
                 norm_num_groups=32),
}
# bf16 bytes of each size's UNet + VAE (parameters x 2, counted with diffusers 0.42), for
# what a row needs before the model exists (benchmarks/breadth.py --dry-run).
WEIGHTS_BYTES = {"sdxl": 2 * (2_567_463_684 + 83_653_863), "sd15": 2 * (859_520_964 + 83_653_863),
                 "tiny": 2 * (2_001_508 + 367_527)}


def make(size: str, out: str, device: str = "cuda") -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **UNETS[size])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, **VAES[size])
    unet.to(torch.bfloat16).save_pretrained(os.path.join(out, "unet"))
    vae.to(torch.bfloat16).save_pretrained(os.path.join(out, "vae"))
    with open(os.path.join(out, "size.json"), "w") as f:
        json.dump({"size": size}, f)


def load(model_dir: str, device: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"),
                                                torch_dtype=torch.bfloat16).to(device).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"),
                                        torch_dtype=torch.bfloat16).to(device).eval()
    return unet, vae, DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                    beta_start=0.00085, beta_end=0.012)


def generate(unet, vae, scheduler, steps: int, seed: int, device: str) -> dict:
    import torch
    size = unet.config.sample_size
    gen = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn((1, 4, size, size), generator=gen, device=device, dtype=torch.bfloat16)
    cond = torch.randn((1, 77, unet.config.cross_attention_dim), generator=gen, device=device,
                       dtype=torch.bfloat16)
    added = None
    if unet.config.addition_embed_type == "text_time":      # SDXL: pooled text, sizes
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        side = 8 * size
        added = {"text_embeds": torch.randn((1, pooled), generator=gen, device=device,
                                            dtype=torch.bfloat16),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=device,
                                          dtype=torch.bfloat16)}
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            noise = unet(latents, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
            latents = scheduler.step(noise, t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu().contiguous()
    return {"sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest(),
            "shape": list(pixels.shape)}


def serve(model_dir: str, port: int, state: str, sdk: bool = False, device: str = "cuda") -> None:
    import contextlib
    import importlib.util
    from http.server import HTTPServer

    from tests.workloads.common import JsonHandler, ready_and_serve
    t0 = time.time()
    unet, vae, scheduler = load(model_dir, device)
    t_load = time.time()
    agent = None
    if sdk:
        import gpusnap.sdk
        agent = gpusnap.sdk.enable(unet, os.path.join(model_dir, "unet"))

    def serving():
        return agent.serving() if agent else contextlib.nullcontext()

    with serving():
        warm = generate(unet, vae, scheduler, 2, 0, device)
    t_warm = time.time()

    class Handler(JsonHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with serving():
                out = generate(unet, vae, scheduler, int(req.get("steps", 4)),
                               int(req.get("seed", 0)), device)
            self._send(out)

    ready_and_serve(HTTPServer(("127.0.0.1", port), Handler), state,
                    {"pid": os.getpid(), "port": port, "load_s": t_load - t0, "warm_s": t_warm - t_load,
                     "warm": warm, "sdk": agent.status() if agent else None,
                     # without accelerate, from_pretrained allocates every weight before
                     # reading it in (low_cpu_mem_usage off): a little slower cold start
                     "accelerate": importlib.util.find_spec("accelerate") is not None})


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--size", choices=sorted(UNETS), default="sdxl")
    m.add_argument("--out", required=True)
    m.add_argument("--device", default="cuda")
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, default=18300)
    s.add_argument("--state", required=True)
    s.add_argument("--sdk", action="store_true")
    s.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.size, args.out, args.device)
    else:
        serve(args.model, args.port, args.state, args.sdk, args.device)


if __name__ == "__main__":
    main()
