"""Class-conditional DiTs: diffusers' ``DiTTransformer2DModel`` (adaLN-Zero), e.g. facebook/DiT-XL-2-256.

Every model of this family lives in the diffusers pipeline layout, from the hub or a local directory:
    <dir>/transformer/{config.json, diffusion_pytorch_model.safetensors}
    <dir>/scheduler/scheduler_config.json
    <dir>/vae/...            (latent-space models only; absent = pixel space)
    <dir>/tide_model.json    (ours: class names, training provenance; optional)

Sites of a block (``BasicTransformerBlock`` with adaLN-Zero): resid = the block's output (the residual
stream after it); attn = the self-attention ``attn1`` output and mlp = the feed-forward ``ff`` output, both
before adaLN's gate scales them. diffusers' ``DiTPipeline`` hard-codes 1000 classes and a VAE, so the
sampling loop is the project's own (``tide_core.sampling``); this adapter is its model side.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tide_core.config import ModelConfig
from tide_core.models.base import DiTAdapter, Log, ModelInfo, TimeConvention, TokenGrid, resolve_device
from tide_core.models.registry import HUB_IDS, ModelError
from tide_core.prompts import PromptSet

TIDE_MODEL_FILE = "tide_model.json"
# Hub checkpoints whose shape is known without downloading them (the hub is unreachable offline).
KNOWN_HUB_MODELS: dict[str, ModelInfo] = {
    name: ModelInfo(family="dit", source=name, num_layers=28, hidden_size=1152, sites=("resid", "attn", "mlp"))
    for name, family in HUB_IDS.items() if family == "dit"
}
SITE_MODULES = {"attn": "attn1", "mlp": "ff"}  # resid is the block itself


def transformer_config(source: str) -> dict:
    """transformer/config.json of a local diffusers directory; ModelError naming what is missing."""
    path = Path(source) / "transformer" / "config.json"
    if not path.is_file():
        raise ModelError(f"model.source={source!r} has no transformer/config.json: point it at a diffusers "
                         "directory (transformer/, scheduler/, and vae/ for latent models)")
    return json.loads(path.read_text())


def read_meta(directory: str | Path) -> dict:
    """Our tide_model.json beside a checkpoint ({} when absent, as for hub checkpoints)."""
    p = Path(directory) / TIDE_MODEL_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def reuse_or_train(label: str, out: Path, meta_key: str, fingerprint: str, steps: int, plan: str,
                   train: Callable[[Callable[[int, float, float], None]], object], log: Log, force: bool) -> bool:
    """The families trained here (digits, styled-digits): reuse the directory ``out`` when its record holds
    ``fingerprint`` under ``meta_key``, otherwise ``train(progress)`` writes it, with 20 progress lines in the
    log. True when it trained."""
    meta = read_meta(out)
    if not force and meta.get(meta_key) == fingerprint:
        log(f"{label} at {out} matches the config (fingerprint {fingerprint}): using it")
        return False
    if meta:
        log(f"{label} at {out} was trained with another config ({meta.get(meta_key)} != {fingerprint}): retraining")
    log(f"training the {label}: {plan}")
    every = max(1, steps // 20)

    def progress(step: int, loss: float, lr: float) -> None:
        if step % every == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss:.4f}  lr {lr:.2e}")

    t0 = time.perf_counter()
    train(progress)
    log(f"trained in {time.perf_counter() - t0:.0f}s; saved to {out}")
    return True


def directory_fingerprint(source: str) -> str:
    """A model's identity without loading it: for a hub id, the id; for a local directory, its transformer
    config and the recorded weights hash (or the weights files' sizes and modification times when nothing
    recorded one)."""
    if not Path(source).is_dir():
        return hashlib.sha256(source.encode()).hexdigest()[:16]
    tc = {k: v for k, v in transformer_config(source).items() if not k.startswith("_")}
    weights = read_meta(source).get("weights_sha256")
    if weights is None:
        files = sorted((Path(source) / "transformer").glob("*.safetensors"))
        weights = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    payload = {**tc, "weights": weights}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refuse_prompts(family: type[DiTAdapter], prompts: PromptSet | None) -> None:
    if prompts is not None:
        raise ModelError(f"the {family.family} family is class-conditional: remove sampling.prompts (or choose a "
                         "text-conditional model.source)")


def discrete_scheduler(name: str, scheduler_config: dict, num_steps: int, family: str, clip_sample: bool):
    """A fresh DDIM (eta 0), DDPM or DPM-Solver++ scheduler of a DDPM-family model's noise schedule, set to
    num_steps. clip_sample: clip the x0 estimate to [-1, 1] (pixel space only; latents range wider)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if name == "ddim":
        sched = DDIMScheduler.from_config(base, set_alpha_to_one=False, clip_sample=clip_sample)
    elif name == "ddpm":
        sched = DDPMScheduler.from_config(base, variance_type="fixed_small", clip_sample=clip_sample)
    elif name == "dpm":
        sched = DPMSolverMultistepScheduler.from_config(base)
    else:
        raise ModelError(f"unknown scheduler {name!r} for the {family} family: use 'ddim', 'ddpm' or 'dpm'")
    sched.set_timesteps(num_steps)
    return sched


class ClassDiT(DiTAdapter):
    """A diffusers DiT with class labels: condition index = class id; the null class follows the classes."""

    family: ClassVar[str] = "dit"
    sites: ClassVar[tuple[str, ...]] = ("resid", "attn", "mlp")

    def __init__(self, transformer: nn.Module, scheduler_config: dict, *, source: str, fingerprint: str,
                 class_names: list[str], vae: nn.Module | None = None, vae_scaling: float = 1.0,
                 meta: dict | None = None):
        self.transformer = transformer
        self.scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.source, self.fingerprint = source, fingerprint
        self.condition_names = list(class_names)
        self.vae, self.vae_scaling = vae, vae_scaling
        self.meta = dict(meta or {})
        side = int(transformer.config.sample_size) // int(transformer.config.patch_size)
        self.token_grid = TokenGrid(side, side)
        self.time = TimeConvention("discrete", int(self.scheduler_config.get("num_train_timesteps", 1000)))

    # --- without weights -------------------------------------------------------------------------

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        if cfg.source in KNOWN_HUB_MODELS:
            return KNOWN_HUB_MODELS[cfg.source]
        if not Path(cfg.source).is_dir():
            raise ModelError(f"model.source={cfg.source!r} is neither a local directory nor a known hub id "
                             f"({', '.join(sorted(KNOWN_HUB_MODELS))}); the hub is not reachable from here, so "
                             "download the model into a local diffusers directory and point model.source at it")
        tc = transformer_config(cfg.source)
        width = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
        return ModelInfo(family=cls.family, source=cfg.source, num_layers=int(tc["num_layers"]),
                         hidden_size=width, sites=cls.sites)

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        return directory_fingerprint(cfg.source)

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> ClassDiT:
        refuse_prompts(cls, prompts)
        return cls.load_dir(cfg.source, device=resolve_device(cfg.device), dtype=getattr(torch, cfg.dtype),
                            fingerprint=cls.fingerprint_of(cfg))

    @classmethod
    def load_dir(cls, src: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 fingerprint: str = "") -> ClassDiT:
        """Transformer, scheduler config and (if present) VAE from a local directory or a hub id, through
        diffusers' own loaders (the same code path for both)."""
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        local = Path(src)
        if local.exists():
            transformer_config(src)  # a clear error before diffusers' own
        transformer = DiTTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype,
                                                            low_cpu_mem_usage=False)
        transformer = transformer.to(device).eval().requires_grad_(False)
        sched = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
        vae, scaling = None, 1.0
        if (local / "vae").exists() if local.exists() else True:
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False)
            vae = vae.to(device).eval().requires_grad_(False)
            scaling = float(vae.config.scaling_factor)
        meta = read_meta(src) if local.exists() else {}
        n = int(meta.get("num_classes", transformer.config.num_embeds_ada_norm))
        names = meta.get("class_names") or [str(i) for i in range(n)]
        return cls(transformer, sched, source=src, fingerprint=fingerprint, class_names=names, vae=vae,
                   vae_scaling=scaling, meta=meta)

    # --- the loaded model ------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = int(self.transformer.config.sample_size)
        return self.in_channels, side, side

    @property
    def image_shape(self) -> tuple[int, int, int]:
        side = int(self.transformer.config.sample_size)
        if self.vae is None:
            return side, side, self.in_channels
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return side * factor, side * factor, int(self.vae.config.out_channels)

    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def site_module(self, layer: int, site: str) -> nn.Module:
        self.check_site(layer, site)
        block = self.blocks()[layer]
        return block if site == "resid" else getattr(block, SITE_MODULES[site])

    def predict_noise(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), timestep=timesteps, class_labels=conditions).sample.float()
        return out[:, : self.in_channels]  # learned-sigma models also predict a variance; unused here

    def make_scheduler(self, name: str, num_steps: int):
        # pixel-space models clip x0 as their configs say (the digits DiT trains with clip_sample); latents never
        clip = bool(self.scheduler_config.get("clip_sample", True)) and self.vae is None
        return discrete_scheduler(name, self.scheduler_config, num_steps, self.family, clip)

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            latents = self.vae.decode((latents / self.vae_scaling).to(self.dtype)).sample.float()
        return latents.clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae.encode(images.to(self.dtype)).latent_dist.mean.float() * self.vae_scaling

    @torch.no_grad()
    def adaln_modulation(self, layer: int, timesteps: torch.Tensor) -> torch.Tensor:
        """Block L's output is what block L+1 normalises and modulates with its adaLN-Zero (shift_msa,
        scale_msa), or, after the last block, what the final norm modulates with proj_out_1's (shift, scale).
        Evaluated for the null class: the class-agnostic part."""
        self.check_site(layer, "resid")
        blocks = self.blocks()
        t = timesteps.to(self.device)
        labels = torch.full_like(t, self.null_condition)
        if layer + 1 < len(blocks):
            norm = blocks[layer + 1].norm1  # AdaLayerNormZero
            emb = norm.linear(norm.silu(norm.emb(t, labels, hidden_dtype=self.dtype)))  # [T, 6d]
            shift, scale = emb.chunk(6, dim=1)[:2]  # shift_msa, scale_msa
        else:
            cond = blocks[0].norm1.emb(t, labels, hidden_dtype=self.dtype)  # [T, d]
            shift, scale = self.transformer.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        return torch.cat([scale, shift], dim=1).float().cpu()  # [T, 2d]
