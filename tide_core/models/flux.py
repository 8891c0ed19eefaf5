"""FLUX.1: diffusers' ``FluxTransformer2DModel``: double-stream blocks (image and text streams, each with its
own weights, attending jointly), then single-stream blocks over the concatenated sequence; rotary positions
from (row, col) ids; latents packed 2x2 into tokens.

Layers number the double-stream blocks first (0 .. num_layers - 1), then the single-stream ones; every
block's ``resid`` is its image tokens and ``resid_text`` its text tokens (a single block's output split back at
the text length), the text stream's positions being T5's (``tokenizer_2``).

Text, as diffusers' ``FluxPipeline`` makes it: CLIP-L's pooled output (text_encoder, ``CLIPTextModel``) is
the pooled vector; T5's embeddings (text_encoder_2) the text sequence, max_prompt_tokens long (FLUX-schnell
trains with 256, FLUX-dev with 512). Guidance: FLUX-dev reads sampling.guidance_scale as an input (a
distilled guidance embedding; one pass a step, no negative prompt); FLUX-schnell takes none (the scale must
be 1). Its schedule shifts with the image's token count (``use_dynamic_shifting``), as the pipeline does.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from tide_core.config import ModelConfig
from tide_core.models.base import GuidanceMode, ModelInfo, TextSequence
from tide_core.models.dit import transformer_config
from tide_core.models.flow import SITES, FlowDiT, TextConditions, clip_embed, sequences, t5_embed, tokenizer
from tide_core.models.registry import HUB_IDS

KNOWN_HUB_MODELS = {  # FLUX.1: 19 double + 38 single blocks of 24 heads x 128
    name: ModelInfo(family="flux", source=name, num_layers=57, hidden_size=3072, sites=SITES)
    for name, family in HUB_IDS.items() if family == "flux"
}
HUB_GUIDANCE: dict[str, GuidanceMode] = {"black-forest-labs/FLUX.1-dev": "embedded",
                                         "black-forest-labs/FLUX.1-schnell": "none"}


# pack, unpack and image_ids are FluxPipeline's `_pack_latents`, `_unpack_latents` and
# `_prepare_latent_image_ids`, written here because those are private static methods (docs/DECISIONS.md).
def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 latent patches as tokens, row-major (FluxPipeline's packing)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/2, 2, W/2, 2]
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Rotary position ids [(h)(w), 3] of a token grid: (0, row, col), row-major."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class Flux(FlowDiT):
    """A FLUX transformer with its CLIP pooled vector and T5 sequence."""

    family: ClassVar[str] = "flux"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    parts: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer",
                                        "text_encoder_2", "tokenizer_2")
    t5_tokenizer: ClassVar[str] = "tokenizer_2"
    known_hub_models: ClassVar[dict[str, ModelInfo]] = KNOWN_HUB_MODELS

    @classmethod
    def depth(cls, tc: dict) -> int:
        return int(tc["num_layers"]) + int(tc["num_single_layers"])

    @classmethod
    def guidance_mode(cls, cfg: ModelConfig) -> GuidanceMode:
        if cfg.source in HUB_GUIDANCE:
            return HUB_GUIDANCE[cfg.source]
        return "embedded" if transformer_config(cfg.source).get("guidance_embeds") else "none"

    @classmethod
    def text_sequences(cls, cfg: ModelConfig, texts: list[str]) -> list[TextSequence]:
        return sequences(tokenizer(cfg.source, "tokenizer_2"), texts, cfg.max_prompt_tokens, "t5")

    @classmethod
    def embed_prompts(cls, cfg: ModelConfig, texts: list[str], device: str, dtype: torch.dtype,
                      transformer: nn.Module) -> TextConditions:
        from transformers import CLIPTextModel, T5EncoderModel

        src = cfg.source
        encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype).to(device).eval()
        _, pooled = clip_embed(tokenizer(src, "tokenizer"), encoder, texts)  # [N, P]
        del encoder
        encoder = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", dtype=dtype).to(device).eval()
        embeds = t5_embed(tokenizer(src, "tokenizer_2"), encoder, texts, cfg.max_prompt_tokens)  # [N, L, C]
        del encoder
        return TextConditions(embeds, pooled)

    def blocks(self) -> nn.ModuleList:
        # a view over both kinds, in the order the forward runs them (the modules stay the transformer's)
        return nn.ModuleList([*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks])

    def set_timesteps(self, sched, num_steps: int) -> None:
        """FluxPipeline's schedule: sigmas evenly from 1 to 1/n, shifted by mu, which diffusers' own
        ``calculate_shift`` grows linearly with the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = sched.config
        mu = calculate_shift(self.token_grid.tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                             c.max_shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)

    def predict_noise(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        n = len(x)
        text = self.text.embeds[conditions]  # [B, L, C]
        guidance = (torch.full((n,), self.guidance_scale, device=self.device, dtype=self.dtype)
                    if self.guidance == "embedded" else None)
        out = self.transformer(pack(x.to(self.dtype)), encoder_hidden_states=text,  # [B, T, 4C]
                               pooled_projections=self.text.pooled[conditions],  # [B, P]
                               timestep=(timesteps / 1000).to(self.dtype),  # sigma: FLUX scales by 1000 itself
                               img_ids=image_ids(h // 2, w // 2).to(self.device, self.dtype),
                               txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype),
                               guidance=guidance).sample.float()  # [B, T, 4C]
        return unpack(out, h, w)
