"""The paper-scale budget (docs/SCALE.md): per-token costs measured on this device, extrapolated.

    .venv/bin/python bench/paper_scale.py [--device cpu|cuda] [--blocks 2]

Measures, on random-weight models of the real shapes at reduced depth:
  - a PixArt-XL block (width 1152, 1024 image tokens = 512 px, cross-attention to 120 text tokens) and a
    FLUX double-stream block (width 3072, 4096 image tokens = 1024 px, 512 text tokens): seconds per block
    per image, without and with capture of its output (to host memory);
  - one TopK SAE optimizer step at d=1152 with 16x latents (k=32, batch 4096): seconds per token.
Then prints storage and compute for the paper's setting and for FLUX at 1024 px, all layers and steps and
with the levers (4 layers, 10 steps, 1/16 of the tokens), using

  store bytes   = images x steps x layers x tokens x width x 2 (fp16)
  sampling time = images x steps x guidance passes x depth x (block seconds per image)
  SAE time      = training tokens x (seconds per token), per layer
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Setting:
    name: str
    depth: int
    width: int
    tokens: int
    steps: int
    passes: int  # forward passes a step (2 with classifier-free guidance)


PIXART = Setting("PixArt-alpha 512 px (the paper)", 28, 1152, 1024, 20, 2)
FLUX = Setting("FLUX.1-dev 1024 px", 57, 3072, 4096, 28, 1)
LEVERS = {"layers": 4, "steps": 10, "token_fraction": 1 / 16}


def _timed(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def block_seconds(device: str, dtype: torch.dtype, blocks: int) -> dict[str, tuple[float, float]]:
    """(seconds per block per image without capture, with capture) for PixArt-XL and FLUX blocks."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    out = {}
    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_layers=blocks, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                      out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                                      sample_size=64).to(device, dtype).eval()
    x, text = torch.randn(1, 4, 64, 64, device=device, dtype=dtype), torch.randn(1, 120, 4096, device=device,
                                                                                    dtype=dtype)
    t = torch.tensor([500], device=device)
    kw = {"encoder_hidden_states": text, "timestep": t, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    out["pixart"] = _both(lambda: pixart(x, **kw), pixart.transformer_blocks, blocks, device)
    flux = FluxTransformer2DModel(num_layers=blocks, num_single_layers=0, guidance_embeds=True).to(device, dtype).eval()
    img, txt = torch.randn(1, 4096, 64, device=device, dtype=dtype), torch.randn(1, 512, 4096, device=device, dtype=dtype)
    ids = torch.zeros(4096, 3, device=device, dtype=dtype)
    kw = {"encoder_hidden_states": txt, "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype),
          "timestep": torch.tensor([0.5], device=device, dtype=dtype), "img_ids": ids,
          "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
          "guidance": torch.tensor([3.5], device=device, dtype=dtype)}
    out["flux"] = _both(lambda: flux(img, **kw), flux.transformer_blocks, blocks, device)
    return out


def _both(forward, modules, blocks: int, device: str) -> tuple[float, float]:
    plain = _timed(forward, 3, device) / blocks
    kept = []

    def hook(_m, _i, o):
        kept.append((o[1] if isinstance(o, tuple) else o).to(torch.float16).cpu())

    handles = [m.register_forward_hook(hook) for m in modules]
    captured = _timed(forward, 3, device) / blocks
    for h in handles:
        h.remove()
    return plain, captured


def sae_seconds_per_token(device: str) -> float:
    from tide_core.sae import SAESpec, SAETrainConfig, SAETrainer
    from tide_core.sae.batches import TokenBatch

    d, batch = 1152, 4096
    trainer = SAETrainer({"topk": SAESpec(d_in=d, n_latents=16 * d, k=32, variant="topk")},
                         SAETrainConfig(total_tokens=10**12, batch_size=batch, warmup_tokens=0, init_tokens=batch))
    b = TokenBatch(torch.randn(batch, d, device=device), torch.zeros(batch, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))
    trainer.saes["topk"].to(device).init_from_sample(b.acts)
    return _timed(lambda: trainer.train_step(b), 3, device) / batch


def human(n: float, unit: str) -> str:
    for p, name in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= p:
            return f"{n / p:.1f} {name}{unit}"
    return f"{n:.1f} {unit}"


def budget(s: Setting, block: tuple[float, float], sae_tok: float, images: int) -> list[str]:
    rows = []
    for label, layers, steps, frac in (("all layers and steps", s.depth, s.steps, 1.0),
                                       ("levers: 4 layers, 10 steps, 1/16 tokens", LEVERS["layers"],
                                        LEVERS["steps"], LEVERS["token_fraction"])):
        tokens = s.tokens * frac
        store = images * steps * layers * tokens * s.width * 2
        sample = images * s.steps * s.passes * s.depth * block[0]
        capture = images * s.steps * s.passes * s.depth * (block[1] - block[0]) * layers / s.depth
        sae_tokens = images * steps * tokens  # one pass over one layer's stored tokens
        rows.append(f"| {s.name} | {label} | {human(store, 'B')} | {human(store / images, 'B')} | "
                    f"{sample / 3600:,.1f} h (+{max(capture, 0) / 3600:,.1f} h capture) | "
                    f"{sae_tokens * sae_tok / 3600:,.1f} h per layer ({human(sae_tokens, '')} tokens) |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--images", type=int, default=10_000)
    args = p.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    blocks = block_seconds(args.device, dtype, args.blocks)
    sae_tok = sae_seconds_per_token(args.device)
    for name, (plain, captured) in blocks.items():
        print(f"{name} block on {args.device}: {plain * 1e3:.1f} ms per image, {captured * 1e3:.1f} ms with capture")
    print(f"SAE step (d=1152, 16x, k=32, batch 4096) on {args.device}: {sae_tok * 1e6:.2f} us per token "
          f"({1 / sae_tok:,.0f} tokens/s)")
    print(f"\n{args.images:,} images on one {args.device} device:\n")
    print("| setting | captured | store | per image | sampling | SAE training |")
    print("|---|---|---|---|---|---|")
    for row in budget(PIXART, blocks["pixart"], sae_tok, args.images) + budget(FLUX, blocks["flux"], sae_tok,
                                                                                 args.images):
        print(row)


if __name__ == "__main__":
    main()
