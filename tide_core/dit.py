"""Building, saving and loading DiTs: the embedded digits default and diffusers checkpoints.

Every model, default or hub, lives in the diffusers pipeline layout:
    <dir>/transformer/{config.json, diffusion_pytorch_model.safetensors}
    <dir>/scheduler/scheduler_config.json
    <dir>/vae/...            (latent-space models only; absent = pixel space)
    <dir>/tide_model.json    (ours: class names, training provenance; optional for hub models)
so one loader serves both, and the default checkpoint can be opened by diffusers itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tide_core.config import DIGITS_SOURCE, DigitsDiTConfig, ModelConfig
from tide_core.digits import CLASS_NAMES

TIDE_MODEL_FILE = "tide_model.json"


@dataclass
class DiTBundle:
    """A loaded DiT with what the sampler needs to drive it."""

    transformer: nn.Module
    vae: nn.Module | None  # None = pixel space
    scheduler_config: dict
    num_classes: int
    class_names: list[str]
    source: str
    config_hash: str  # hash of the transformer config + weights file identity
    vae_scaling: float = 1.0
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def null_class(self) -> int:
        # diffusers' LabelEmbedding appends the "no class" row after the real classes.
        return self.num_classes

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.inner_dim)

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.sample_size // int(self.transformer.config.patch_size)
        return side, side

    @property
    def learn_sigma(self) -> bool:
        return int(self.transformer.config.out_channels) == 2 * self.in_channels


def build_digits_dit(cfg: DigitsDiTConfig) -> nn.Module:
    """A fresh class-conditional DiT (adaLN-Zero) for 1-channel pixel-space digits."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(cfg.seed)
    model = DiTTransformer2DModel(
        sample_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        num_embeds_ada_norm=len(CLASS_NAMES),
    )
    # diffusers drops the label independently in every block; the trainer drops it once per image
    # instead (so "unconditional" means the same thing in all blocks).
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def digits_scheduler_config(cfg: DigitsDiTConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": "epsilon",
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }


def save_bundle(bundle: DiTBundle, out_dir: str | Path) -> Path:
    """Write a bundle in the diffusers layout (atomically: temp dir, then rename)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    bundle.transformer.save_pretrained(tmp / "transformer")
    (tmp / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", **bundle.scheduler_config}
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    if bundle.vae is not None:
        bundle.vae.save_pretrained(tmp / "vae")
    meta = {"num_classes": bundle.num_classes, "class_names": bundle.class_names, **bundle.meta}
    (tmp / TIDE_MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        _rmtree(out)
    tmp.rename(out)
    return out


def load_bundle(path_or_id: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiTBundle:
    """Load a diffusers-layout DiT from a local directory or a hub id (transformer, VAE, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    src = str(path_or_id)
    local = Path(src)
    if local.exists() and not (local / "transformer" / "config.json").exists():
        raise FileNotFoundError(
            f"{local} has no transformer/config.json: expected a diffusers DiT directory "
            "(for the default model run `tide train-dit` first)"
        )
    transformer = DiTTransformer2DModel.from_pretrained(src, subfolder="transformer", torch_dtype=dtype,
                                                        low_cpu_mem_usage=False)
    transformer = transformer.to(device).eval().requires_grad_(False)
    sched = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    vae, scaling = None, 1.0
    has_vae = (local / "vae").exists() if local.exists() else True
    if has_vae:
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False)
        vae = vae.to(device).eval()
        vae.requires_grad_(False)
        scaling = float(vae.config.scaling_factor)
    meta = json.loads((local / TIDE_MODEL_FILE).read_text()) if (local / TIDE_MODEL_FILE).exists() else {}
    num_classes = int(meta.get("num_classes", transformer.config.num_embeds_ada_norm))
    names = meta.get("class_names") or [str(i) for i in range(num_classes)]
    return DiTBundle(
        transformer=transformer,
        vae=vae,
        scheduler_config=sched,
        num_classes=num_classes,
        class_names=list(names),
        source=src,
        config_hash=_config_hash(transformer.config, meta),
        vae_scaling=scaling,
        meta=meta,
    )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device='cuda' but torch sees no CUDA device; set model.device='auto' or 'cpu'")
    return device


def load_model(cfg: ModelConfig, repo_root: Path | None = None) -> DiTBundle:
    """The configured DiT: the digits checkpoint directory or a hub id / local directory."""
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    if cfg.source == DIGITS_SOURCE:
        ckpt = checkpoint_path(cfg.digits, repo_root)
        if not (ckpt / "transformer" / "config.json").exists():
            raise FileNotFoundError(
                f"no default DiT checkpoint at {ckpt}: run `tide train-dit` (or materialize dit_model)"
            )
        return load_bundle(ckpt, device=device, dtype=dtype)
    return load_bundle(cfg.source, device=device, dtype=dtype)


def checkpoint_path(cfg: DigitsDiTConfig, repo_root: Path | None = None) -> Path:
    p = Path(cfg.checkpoint_dir)
    return p if p.is_absolute() else (repo_root or Path.cwd()) / p


def _config_hash(transformer_config, meta: dict) -> str:
    payload = {k: v for k, v in dict(transformer_config).items() if not k.startswith("_")}
    payload["weights"] = meta.get("weights_sha256", "")
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p)
