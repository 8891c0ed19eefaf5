"""``model.source = "tiny-sd3"`` and ``"tiny-flux"``: tiny random-weight SD3 and FLUX models, built here, loaded
like any downloaded directory of their family.

Hub checkpoints cannot be downloaded on the project's machines, so the flow-matching, two-stream path runs
end to end on these: the family's diffusers transformer, ``transformers`` CLIP and T5 encoders, tokenizers
built locally over a small vocabulary (CLIP's byte-pair model, T5's Unigram), a two-block VAE with a scaling
and shift factor, and the family's flow-matching scheduler config; each from a config with seeded random
weights, written with ``save_pretrained`` into the section's checkpoint_dir. From there they load through
exactly the code a hub id goes through (``SD3``, ``Flux``). The weights are random, so the images are noise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch

from tide_core.config import ModelConfig
from tide_core.config.model import TinyFlowConfig, TinyFluxConfig
from tide_core.files import atomic_directory
from tide_core.models.base import GuidanceMode
from tide_core.models.built import BuiltHere
from tide_core.models.dit import TIDE_MODEL_FILE
from tide_core.models.flux import Flux
from tide_core.models.sd3 import SD3
from tide_core.tiny_text import VOCABULARY, save_t5_tokenizer, tiny_t5

LATENT_CHANNELS = 4
CLIP_MAX_TOKENS = 77
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def save_clip_tokenizer(path: Path) -> None:
    """A CLIP tokenizer over VOCABULARY: byte-pair merges that spell each word whole (with CLIP's "</w>"
    end-of-word suffix), over every letter, so any lowercase word still tokenizes (letter by letter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    vocab = {t: i for i, t in enumerate(CLIP_SPECIALS)}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for piece in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(piece, len(vocab))
    merges = []
    for word in VOCABULARY:
        parts = [*word[:-1], word[-1] + "</w>"]
        whole = parts[0]
        for part in parts[1:]:  # left to right: "r"+"e", "re"+"d</w>"
            merges.append((whole, part))
            whole += part
            vocab.setdefault(whole, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges)), end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.post_processor = processors.TemplateProcessing(single=f"{CLIP_SPECIALS[0]} $A {CLIP_SPECIALS[1]}",
                                                       special_tokens=[(t, i) for i, t in enumerate(CLIP_SPECIALS)])
    CLIPTokenizerFast(tokenizer_object=tok, bos_token=CLIP_SPECIALS[0], eos_token=CLIP_SPECIALS[1],
                      pad_token=CLIP_SPECIALS[1], unk_token=CLIP_SPECIALS[1],
                      model_max_length=CLIP_MAX_TOKENS).save_pretrained(path)


def tiny_clip(width: int, layers: int, projection: bool, vocab_size: int):
    """A random CLIP text encoder (seed torch before calling); it pools at the end-of-text token (id 1)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=CLIP_MAX_TOKENS,
                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)


def build(family: str, cfg: TinyFlowConfig, out: Path) -> Path:
    """Every component of a tiny SD3 or FLUX from its config, seeded, saved in the diffusers pipeline layout
    (atomically). The CLIP widths are text_width, T5's twice that (SD3 pads the joined CLIPs to T5's width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    w, t5_width, inner = cfg.text_width, 2 * cfg.text_width, cfg.num_heads * cfg.head_dim
    with atomic_directory(out) as tmp:
        save_clip_tokenizer(tmp / "tokenizer")
        clip_vocab = len(json.loads((tmp / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
        torch.manual_seed(cfg.seed)
        tiny_clip(w, cfg.text_layers, family == "sd3", clip_vocab).save_pretrained(tmp / "text_encoder")
        t5_dir = "text_encoder_3" if family == "sd3" else "text_encoder_2"
        save_t5_tokenizer(tmp / t5_dir.replace("text_encoder", "tokenizer"))
        torch.manual_seed(cfg.seed + 1)
        tiny_t5(t5_width, cfg.text_layers).save_pretrained(tmp / t5_dir)
        torch.manual_seed(cfg.seed + 2)
        if family == "sd3":
            save_clip_tokenizer(tmp / "tokenizer_2")
            tiny_clip(w, cfg.text_layers, True, clip_vocab).save_pretrained(tmp / "text_encoder_2")
            SD3Transformer2DModel(sample_size=cfg.sample_size, patch_size=2, in_channels=LATENT_CHANNELS,
                                  out_channels=LATENT_CHANNELS, num_layers=cfg.num_layers,
                                  attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
                                  joint_attention_dim=t5_width, caption_projection_dim=inner,
                                  pooled_projection_dim=2 * w, pos_embed_max_size=cfg.sample_size
                                  ).save_pretrained(tmp / "transformer")
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        else:
            b = 3 * cfg.head_dim // 8 // 2 * 2  # rotary axes (index, row, col): even parts summing to head_dim
            rope = (cfg.head_dim - 2 * b, b, b)
            FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=cfg.num_layers,
                                   num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.head_dim,
                                   num_attention_heads=cfg.num_heads, joint_attention_dim=t5_width,
                                   pooled_projection_dim=w, guidance_embeds=cfg.guidance_embeds, axes_dims_rope=rope
                                   ).save_pretrained(tmp / "transformer")
            # FLUX-dev shifts its schedule with the image size; FLUX-schnell does not
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0,
                                                    use_dynamic_shifting=cfg.guidance_embeds, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        sched.save_pretrained(tmp / "scheduler")
        torch.manual_seed(cfg.seed + 3)
        _tiny_vae().save_pretrained(tmp / "vae")
        weights = hashlib.sha256()  # the identity the DiT family's fingerprint reads (not a file time)
        for f in sorted((tmp / "transformer").glob("*.safetensors")):
            weights.update(f.read_bytes())
        cls = TinySD3 if family == "sd3" else TinyFlux
        meta = {cls.meta_key: cls.built_fingerprint(cfg), "weights_sha256": weights.hexdigest(),
                "tiny_config": cfg.model_dump(exclude={"checkpoint_dir"})}
        (tmp / TIDE_MODEL_FILE).write_text(json.dumps(meta, indent=2))
    return out


class BuiltFlow(BuiltHere):
    """A tiny flow model: its family's build and the family in the fingerprint (two families, one section
    shape)."""

    base_family: ClassVar[str]

    @classmethod
    def fingerprint_payload(cls, settings) -> dict:
        return {"family": cls.base_family, **super().fingerprint_payload(settings)}

    @classmethod
    def build(cls, settings: TinyFlowConfig, out: Path) -> Path:
        return build(cls.base_family, settings, out)


class TinySD3(BuiltFlow, SD3):
    family: ClassVar[str] = "tiny-sd3"
    section: ClassVar[str] = "tiny_sd3"
    label: ClassVar[str] = "SD3"
    base_family: ClassVar[str] = "sd3"


class TinyFlux(BuiltFlow, Flux):
    family: ClassVar[str] = "tiny-flux"
    section: ClassVar[str] = "tiny_flux"
    label: ClassVar[str] = "FLUX"
    base_family: ClassVar[str] = "flux"

    @classmethod
    def depth_of(cls, settings: TinyFluxConfig) -> int:
        return settings.num_layers + settings.num_single_layers

    @classmethod
    def guidance_mode(cls, cfg: ModelConfig) -> GuidanceMode:
        return "embedded" if cfg.tiny_flux.guidance_embeds else "none"
