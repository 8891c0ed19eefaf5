"""``model.source = "tiny-pixart"``: a tiny random-weight PixArt, built here, loaded like any PixArt.

Real PixArt checkpoints cannot be downloaded on the project's machines, so the text-conditional path runs
end to end on this: a ``PixArtTransformer2DModel``, a ``transformers`` T5 encoder, a T5 fast tokenizer (a
Unigram model over a small fixed vocabulary), a two-block VAE and a DDPM schedule, each built from a config
with seeded random weights and written with ``save_pretrained`` into ``model.tiny_pixart.checkpoint_dir``.
From there it loads through exactly the code a hub id or a downloaded directory goes through (``PixArt``).
The weights are random, so its images are noise: it tests the machinery, not the science.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch

from tide_core.config import TinyPixArtConfig
from tide_core.files import atomic_directory
from tide_core.models.built import BuiltHere
from tide_core.models.dit import TIDE_MODEL_FILE
from tide_core.models.pixart import PixArt
from tide_core.tiny_text import save_t5_tokenizer, tiny_t5


class TinyPixArt(BuiltHere, PixArt):
    """The tiny PixArt: built by ``prepare``; every other method is PixArt's, on the built directory."""

    family: ClassVar[str] = "tiny-pixart"
    section: ClassVar[str] = "tiny_pixart"
    label: ClassVar[str] = "PixArt"
    meta_key: ClassVar[str] = "tiny_pixart_fingerprint"  # what directories built before BuiltHere record

    @classmethod
    def build(cls, settings: TinyPixArtConfig, out: Path) -> Path:
        return build(settings, out)


def build(cfg: TinyPixArtConfig, out: Path) -> Path:
    """Every component from a config, seeded, saved in the diffusers pipeline layout (atomically)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "writing shards" bar per build in every asset's log
    with atomic_directory(out) as tmp:
        save_t5_tokenizer(tmp / "tokenizer")
        torch.manual_seed(cfg.seed)
        tiny_t5(cfg.text_width, cfg.text_layers).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(cfg.seed + 1)
        PixArtTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=4,
                                 out_channels=8, num_layers=cfg.num_layers, cross_attention_dim=cfg.num_heads *
                                 cfg.head_dim, sample_size=cfg.sample_size, patch_size=2,
                                 caption_channels=cfg.text_width, norm_num_groups=4).save_pretrained(tmp / "transformer")
        torch.manual_seed(cfg.seed + 2)
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      layers_per_block=1, norm_num_groups=4).save_pretrained(tmp / "vae")
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02
                      ).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                 "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                 "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        weights = hashlib.sha256()  # the identity the DiT family's fingerprint reads (not a file time)
        for f in sorted((tmp / "transformer").glob("*.safetensors")):
            weights.update(f.read_bytes())
        meta = {TinyPixArt.meta_key: TinyPixArt.built_fingerprint(cfg), "weights_sha256": weights.hexdigest(),
                "tiny_pixart_config": cfg.model_dump(exclude={"checkpoint_dir"})}
        (tmp / TIDE_MODEL_FILE).write_text(json.dumps(meta, indent=2))
    return out
