"""GPU readiness in one run (about 5 minutes on one current GPU): capture and SAE training at paper shapes.

    bash bench/gpu_check.sh            # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --tiny --device cpu   # the same code paths at toy sizes (a test)

1. Random-weight DiT-XL/2-shaped (28 blocks, width 1152, 16x16 latents, SD's VAE shape) and PixArt-XL-shaped
   (28 blocks, width 1152, cross-attention, 64x64 latents = 512 px; a narrow T5 stands in for T5-XXL, which
   capture never touches) models, written as diffusers directories and loaded through the project's adapters.
2. Capture: the same seeds sampled without and with capture of 4 layers (fp16 on CUDA, pinned-memory copies
   on their own stream): overhead = time with / without, and MB/s of activations into the Zarr store.
3. SAE training: optimizer steps of TopK and TIDE SAEs at d=1152 with 16x and 64x latents, batch 4096, on
   random activations on the device: tokens/s.

Prints one line per measurement; last line: gpu_capture_overhead=<worst ratio>.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tests.conftest import dump_toml  # noqa: E402

FULL = {"depth": 28, "heads": 16, "head_dim": 72, "dit_latent": 32, "pixart_latent": 64, "vae": (128, 256, 512, 512),
        "samples": 32, "steps": 20, "latents": (16, 64), "batch": 4096, "sae_steps": 30}
TINY = {"depth": 2, "heads": 2, "head_dim": 8, "dit_latent": 8, "pixart_latent": 8, "vae": (8, 16),
        "samples": 4, "steps": 2, "latents": (2, 4), "batch": 64, "sae_steps": 2}


def build_dit(out: Path, s: dict) -> Path:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(num_layers=s["depth"], num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
                          in_channels=4, out_channels=8, sample_size=s["dit_latent"], patch_size=2,
                          num_embeds_ada_norm=1000).save_pretrained(out / "transformer")
    _vae(s).save_pretrained(out / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(out / "scheduler")
    return out


def build_pixart(out: Path, s: dict) -> Path:
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    from tide_core.tiny_text import save_t5_tokenizer, tiny_t5

    torch.manual_seed(0)
    width = s["heads"] * s["head_dim"]
    PixArtTransformer2DModel(num_layers=s["depth"], num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
                             in_channels=4, out_channels=8, cross_attention_dim=width, caption_channels=64,
                             sample_size=s["pixart_latent"], patch_size=2, norm_num_groups=4
                             ).save_pretrained(out / "transformer")
    save_t5_tokenizer(out / "tokenizer")
    tiny_t5(64, 1).save_pretrained(out / "text_encoder")
    _vae(s).save_pretrained(out / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(out / "scheduler")
    return out


def _vae(s: dict):
    from diffusers import AutoencoderKL

    n = len(s["vae"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae"],
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=min(32, s["vae"][0]))


def capture_check(name: str, model_dir: Path, tmp: Path, s: dict, device: str, text: bool) -> float:
    """Capture overhead and MB/s of one model, through bench/capture.py's own measurement functions."""
    from bench.capture import load, run_capture, run_plain
    from pipelines.project import Project

    dtype = "float16" if device == "cuda" else "float32"
    layers = sorted({0, s["depth"] // 3, 2 * s["depth"] // 3, s["depth"] - 1})
    cfg = {"model": {"source": str(model_dir), "device": device, "dtype": dtype, "max_prompt_tokens": 16},
           "sampling": {"scheduler": "dpm", "num_steps": s["steps"], "guidance_scale": 4.5,
                        "num_samples": s["samples"], "shard_size": s["samples"], "batch_size": s["samples"]},
           "capture": {"layers": layers, "sites": ["resid"]}, "warehouse": {"root": str(tmp / name)}}
    if text:
        (tmp / "prompts.txt").write_text("a red seven\na blue two on a black background\na cat in the city\n")
        cfg["sampling"]["prompts"] = str(tmp / "prompts.txt")
    path = tmp / f"{name}.toml"
    path.write_text(dump_toml(cfg))
    project = Project.load(path)
    model = load(project)
    run_plain(project, model, s["samples"])  # warm-up: kernels, allocator
    plain = min(run_plain(project, model, s["samples"]) for _ in range(2))
    with_capture, stats = min((run_capture(project, model, s["samples"], tmp / f"{name}.zarr") for _ in range(2)),
                              key=lambda r: r[0])
    mb = sum(st.raw_bytes for st in stats) / 1e6
    print(f"{name}: {s['samples']} images x {s['steps']} steps, layers {layers}: {plain:.2f} s plain, "
          f"{with_capture:.2f} s with capture ({mb:.0f} MB, {mb / with_capture:.0f} MB/s): "
          f"overhead {with_capture / plain:.3f}", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return with_capture / plain


def sae_check(s: dict, device: str) -> None:
    from tide_core.sae import SAESpec, SAETrainConfig, SAETrainer
    from tide_core.sae.batches import TokenBatch

    d = s["heads"] * s["head_dim"]
    for mult in s["latents"]:
        n = d * mult
        specs = {v: SAESpec(d_in=d, n_latents=n, k=min(64, n // 2), variant=v) for v in ("topk", "tide")}
        cfg = SAETrainConfig(total_tokens=10**12, batch_size=s["batch"], warmup_tokens=0, init_tokens=s["batch"])
        trainer = SAETrainer(specs, cfg)
        batch = TokenBatch(torch.randn(s["batch"], d, device=device),
                           torch.randint(0, 1000, (s["batch"],), device=device),
                           torch.zeros(s["batch"], dtype=torch.long, device=device))
        for sae in trainer.saes.values():
            sae.to(device).init_from_sample(batch.acts)
        trainer.train_step(batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(s["sae_steps"]):
            trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = s["sae_steps"] * s["batch"] / (time.perf_counter() - t0)
        print(f"sae d={d} x{mult} ({n} latents), topk + tide in one pass: {rate:,.0f} tokens/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths, measures nothing")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here (bench/capture.py and bench/sae_train.py measure the CPU)")
        raise SystemExit(2)
    s = TINY if args.tiny else FULL
    if args.device == "cuda":
        print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    with tempfile.TemporaryDirectory(prefix="tide-gpu-check-") as d:
        tmp = Path(d)
        ratios = [capture_check("dit-xl", build_dit(tmp / "dit", s), tmp, s, args.device, text=False),
                  capture_check("pixart-xl", build_pixart(tmp / "pixart", s), tmp, s, args.device, text=True)]
    sae_check(s, args.device)
    print(f"gpu_capture_overhead={max(ratios):.3f}")


if __name__ == "__main__":
    main()
