"""Stable Diffusion 3: diffusers' ``SD3Transformer2DModel`` (MMDiT): joint blocks in which the image stream and
the text stream attend to each other, each with its own adaLN-Zero modulated by the timestep and the pooled
text vector.

Text, as diffusers' ``StableDiffusion3Pipeline`` makes it: two CLIP encoders (text_encoder: CLIP-L,
text_encoder_2: CLIP-G, both ``CLIPTextModelWithProjection``) give their penultimate hidden states, joined
along channels and zero-padded to T5's width, followed in the sequence by T5's embeddings (text_encoder_3);
the pooled vector is the two CLIPs' projected outputs joined. With ``model.use_t5 = false`` (or no
text_encoder_3/ in the directory) T5's part is zeros, as diffusers does without the third encoder.
Guidance is classifier-free against the negative prompt. The text stream's positions are CLIP's 77 (the
``tokenizer`` pieces: both CLIPs tokenize alike), then T5's max_prompt_tokens (``tokenizer_3``), each part's
padding masked out. The last joint block returns no text stream (``context_pre_only``), so it has no
``resid_text``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tide_core.config import ModelConfig
from tide_core.models.base import ModelInfo, TextSequence
from tide_core.models.flow import (
    SITES,
    FlowDiT,
    TextConditions,
    blank,
    clip_embed,
    joined,
    sequences,
    t5_embed,
    tokenizer,
)
from tide_core.models.pixart import TokenCount
from tide_core.models.registry import HUB_IDS

KNOWN_HUB_MODELS = {  # SD3-medium: 24 joint blocks of 24 heads x 64
    name: ModelInfo(family="sd3", source=name, num_layers=24, hidden_size=1536, sites=SITES)
    for name, family in HUB_IDS.items() if family == "sd3"
}


class SD3(FlowDiT):
    """An SD3 transformer with its CLIP (and T5) text conditions."""

    family: ClassVar[str] = "sd3"
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"
    parts: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer",
                                        "text_encoder_2", "tokenizer_2")
    t5_tokenizer: ClassVar[str] = "tokenizer_3"
    known_hub_models: ClassVar[dict[str, ModelInfo]] = KNOWN_HUB_MODELS

    @classmethod
    def count_tokens(cls, cfg: ModelConfig, texts: list[str]) -> list[TokenCount]:
        if (Path(cfg.source) / cls.t5_tokenizer).is_dir():
            return super().count_tokens(cfg, texts)
        tok = tokenizer(cfg.source, "tokenizer")  # CLIP alone: its 77 tokens are what cuts a prompt
        return [TokenCount(len(i), len(i) > tok.model_max_length) for i in tok(texts).input_ids]

    @classmethod
    def site_problem(cls, num_layers: int, layer: int, site: str) -> str | None:
        if site in cls.text_sites and layer == num_layers - 1:
            return (f"capture.layers has {layer} with site {site!r}: SD3's last joint block returns no text stream "
                    f"(context_pre_only); capture {site} at layers 0..{num_layers - 2}")
        return None

    @classmethod
    def text_sequences(cls, cfg: ModelConfig, texts: list[str]) -> list[TextSequence]:
        clip_tok = tokenizer(cfg.source, "tokenizer")
        clip = sequences(clip_tok, texts, clip_tok.model_max_length, "clip")
        if cfg.use_t5 and (Path(cfg.source) / "text_encoder_3").is_dir():
            t5 = sequences(tokenizer(cfg.source, "tokenizer_3"), texts, cfg.max_prompt_tokens, "t5")
        else:  # T5's part of the sequence is zeros: no prompt token there
            t5 = blank(len(texts), cfg.max_prompt_tokens, "t5")
        return joined(clip, t5)

    @classmethod
    def embed_prompts(cls, cfg: ModelConfig, texts: list[str], device: str, dtype: torch.dtype,
                      transformer: nn.Module) -> TextConditions:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        src = cfg.source
        hidden, pooled = [], []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            encoder = CLIPTextModelWithProjection.from_pretrained(src, subfolder=enc, dtype=dtype).to(device).eval()
            h, p = clip_embed(tokenizer(src, tok), encoder, texts)  # [N, 77, C_i], [N, P_i]
            hidden.append(h)
            pooled.append(p)
            del encoder
        clip = torch.cat(hidden, dim=-1)  # [N, 77, C_1 + C_2]
        width = int(transformer.config.joint_attention_dim)
        if cfg.use_t5 and (Path(src) / "text_encoder_3").is_dir():
            encoder = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", dtype=dtype).to(device).eval()
            t5 = t5_embed(tokenizer(src, "tokenizer_3"), encoder, texts, cfg.max_prompt_tokens)  # [N, L, width]
            del encoder
        else:
            t5 = torch.zeros(len(texts), cfg.max_prompt_tokens, width)
        clip = F.pad(clip, (0, width - clip.shape[-1]))  # [N, 77, width]
        return TextConditions(torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1))  # [N, 77 + L, width]

    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def predict_noise(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self.transformer(x.to(self.dtype), encoder_hidden_states=self.text.embeds[conditions],  # [B, L, C]
                                pooled_projections=self.text.pooled[conditions],  # [B, P]
                                timestep=timesteps.to(self.dtype)).sample.float()  # t = 1000 sigma
