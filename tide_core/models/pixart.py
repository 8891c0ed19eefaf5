"""Text-conditional DiTs: diffusers' ``PixArtTransformer2DModel`` (PixArt-α and PixArt-Σ, the TIDE paper's
backbone): adaLN-single timestep modulation shared by every block, cross-attention to T5 text embeddings.

The bundle is the diffusers pipeline layout, from the hub (e.g. PixArt-alpha/PixArt-XL-2-512x512) or a local
directory: transformer/, vae/, scheduler/, text_encoder/ (a ``transformers`` T5 encoder) and tokenizer/. A
local directory without vae/ is a pixel-space model: the transformer denoises the images themselves.
The components load through diffusers' and transformers' own classes; the sampling loop is the project's
(``tide_core.sampling``), which needs of this adapter only the denoiser call.

Conditions are the run's prompts: condition i is prompt i, embedded once when the model loads (the text
encoder is freed right after), and the null condition is the negative prompt. Text padding never reaches a
capture: the blocks' hidden states are image tokens only, and the cross-attention masks the padding.

Sites of a block (``BasicTransformerBlock`` with ``ada_norm_single``): resid = the block's output; attn =
the self-attention ``attn1`` output; cross = the cross-attention ``attn2`` output; mlp = the feed-forward
``ff`` output (attn and mlp before their adaLN gates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tide_core.config import ModelConfig
from tide_core.models.base import DiTAdapter, ModelInfo, TimeConvention, TokenGrid, resolve_device
from tide_core.models.dit import directory_fingerprint, discrete_scheduler, transformer_config
from tide_core.models.registry import HUB_IDS, ModelError
from tide_core.prompts import PromptSet

SITES = ("resid", "attn", "cross", "mlp")
SITE_MODULES = {"attn": "attn1", "cross": "attn2", "mlp": "ff"}  # resid is the block itself
VAE_FACTOR = 8  # PixArt's VAE (SD's) halves the side three times
KNOWN_HUB_MODELS: dict[str, tuple[ModelInfo, int]] = {  # id -> (shape, native image side in pixels)
    name: (ModelInfo(family="pixart", source=name, num_layers=28, hidden_size=1152, sites=SITES), side)
    for name, side in (("PixArt-alpha/PixArt-XL-2-512x512", 512), ("PixArt-alpha/PixArt-XL-2-1024-MS", 1024),
                       ("PixArt-alpha/PixArt-Sigma-XL-2-512-MS", 512), ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 1024))
    if HUB_IDS.get(name) == "pixart"
}
EMBED_BATCH = 32  # prompts embedded per text-encoder call


@dataclass(frozen=True)
class TokenCount:
    """How a prompt tokenizes: tokens with the end token, and whether max_prompt_tokens cut it."""

    tokens: int
    truncated: bool


def _require(source: Path, parts: tuple[str, ...]) -> None:
    missing = [p for p in parts if not (source / p).is_dir()]
    if missing:
        raise ModelError(f"model.source={str(source)!r} lacks {', '.join(p + '/' for p in missing)}: a PixArt "
                         "directory needs transformer/, scheduler/, text_encoder/ and tokenizer/, and vae/ unless "
                         "it denoises pixels (the diffusers pipeline layout, as save_pretrained or a hub download "
                         "writes it)")


class PixArt(DiTAdapter):
    """A PixArt transformer with its T5 text encoder, tokenizer, VAE and noise schedule."""

    family: ClassVar[str] = "pixart"
    sites: ClassVar[tuple[str, ...]] = SITES

    def __init__(self, transformer: nn.Module, vae: nn.Module | None, scheduler_config: dict, *, source: str,
                 fingerprint: str, prompts: PromptSet, embeds: torch.Tensor, masks: torch.Tensor,
                 height: int, width: int):
        self.transformer, self.vae = transformer, vae
        self.scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.source, self.fingerprint = source, fingerprint
        self.prompts = prompts
        self.condition_names = prompts.texts
        self.embeds, self.masks = embeds, masks  # [N + 1, L, C], [N + 1, L]: the prompts, then the negative
        self.height, self.width = height, width
        # 8 for PixArt's (SD's) VAE; 1 in pixel space
        self.vae_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        p = int(transformer.config.patch_size)
        self.token_grid = TokenGrid(height // self.vae_factor // p, width // self.vae_factor // p)
        self.time = TimeConvention("discrete", int(self.scheduler_config.get("num_train_timesteps", 1000)))

    # --- without weights -------------------------------------------------------------------------

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        info, side = cls._shape(cfg)
        cls._check_resolution(cfg, side)
        return info

    @classmethod
    def _shape(cls, cfg: ModelConfig) -> tuple[ModelInfo, int]:
        """(shape, native side in pixels), from the known hub ids or transformer/config.json."""
        if cfg.source in KNOWN_HUB_MODELS:
            return KNOWN_HUB_MODELS[cfg.source]
        source = Path(cfg.source)
        _require(source, ("transformer", "scheduler", "text_encoder", "tokenizer"))
        tc = transformer_config(cfg.source)
        width = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
        info = ModelInfo(family=cls.family, source=cfg.source, num_layers=int(tc["num_layers"]), hidden_size=width,
                         sites=cls.sites)
        return info, int(tc["sample_size"]) * _vae_factor(source)

    @classmethod
    def _check_resolution(cls, cfg: ModelConfig, side: int) -> None:
        multiple = (_vae_factor(Path(cfg.source)) if Path(cfg.source).is_dir() else VAE_FACTOR) * 2
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and value % multiple:
                raise ModelError(f"model.{name}={value} is not a multiple of {multiple} (the VAE's factor times the "
                                 f"patch size): try {max(multiple, round(value / multiple) * multiple)}; the "
                                 f"model's native size is {side}")

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        return directory_fingerprint(cfg.source)

    @classmethod
    def count_tokens(cls, cfg: ModelConfig, texts: list[str]) -> list[TokenCount]:
        """How each prompt tokenizes (the tokenizer alone is loaded)."""
        tokenizer = _tokenizer(cfg.source)
        ids = tokenizer(texts, add_special_tokens=True).input_ids
        return [TokenCount(len(i), len(i) > cfg.max_prompt_tokens) for i in ids]

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> PixArt:
        """The transformer and VAE on model.device, the prompts embedded by the text encoder (on
        model.text_encoder_device), which is then freed."""
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        if prompts is None:
            raise ModelError(f"model.source={cfg.source!r} is text-conditional: set sampling.prompts to a prompt file")
        info, side = cls._shape(cfg)
        cls._check_resolution(cfg, side)
        device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        src = cfg.source
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one bar per load would fill every asset's log
        whole = {"torch_dtype": dtype, "low_cpu_mem_usage": False}  # without accelerate: no lazy loading
        transformer = PixArtTransformer2DModel.from_pretrained(src, subfolder="transformer", **whole)
        transformer = transformer.to(device).eval().requires_grad_(False)
        vae = None
        if not Path(src).is_dir() or (Path(src) / "vae").is_dir():  # a hub id always has one
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **whole).to(device).eval().requires_grad_(False)
        sched = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
        text_device = device if cfg.text_encoder_device == "auto" else "cpu"
        encoder = T5EncoderModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype).to(text_device)
        embeds, masks = _embed(_tokenizer(src), encoder.eval(), [*prompts.texts, negative_prompt],
                               cfg.max_prompt_tokens)
        del encoder  # the prompts are embedded: the encoder (GBs for T5-XXL) is not needed again
        return cls(transformer, vae, sched, source=src, fingerprint=cls.fingerprint_of(cfg), prompts=prompts,
                   embeds=embeds.to(device, dtype), masks=masks.to(device), height=cfg.height or side,
                   width=cfg.width or side)

    # --- the loaded model ------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.in_channels, self.height // self.vae_factor, self.width // self.vae_factor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.height, self.width, int(self.in_channels if self.vae is None else self.vae.config.out_channels)

    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def site_module(self, layer: int, site: str) -> nn.Module:
        self.check_site(layer, site)
        block = self.blocks()[layer]
        return block if site == "resid" else getattr(block, SITE_MODULES[site])

    def _added_conditions(self, batch: int) -> dict:
        """Resolution and aspect ratio, for the checkpoints trained with them (the 1024-px ones)."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        res = torch.tensor([[self.height, self.width]], dtype=self.dtype, device=self.device).repeat(batch, 1)
        ratio = torch.tensor([[self.height / self.width]], dtype=self.dtype, device=self.device).repeat(batch, 1)
        return {"resolution": res, "aspect_ratio": ratio}

    def predict_noise(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), encoder_hidden_states=self.embeds[conditions],  # [B, L, C]
                               encoder_attention_mask=self.masks[conditions], timestep=timesteps,  # [B, L]
                               added_cond_kwargs=self._added_conditions(len(x))).sample.float()
        return out[:, : self.in_channels]  # the learned variance channels are not used

    def make_scheduler(self, name: str, num_steps: int):
        return discrete_scheduler(name, self.scheduler_config, num_steps, self.family, clip_sample=False)

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        scaling = float(self.vae.config.scaling_factor)
        return self.vae.decode((latents / scaling).to(self.dtype)).sample.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images.float()
        return self.vae.encode(images.to(self.dtype)).latent_dist.mean.float() * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def adaln_modulation(self, layer: int, timesteps: torch.Tensor) -> torch.Tensor:
        """adaLN-single: one timestep MLP for the whole model, plus each block's learned table. Block L+1
        normalises block L's output and applies (shift_msa, scale_msa) = its scale_shift_table rows 0, 1 plus
        the shared embedding's; after the last block the output norm applies the model's own table."""
        self.check_site(layer, "resid")
        t = timesteps.to(self.device)
        emb, embedded = self.transformer.adaln_single(t, self._added_conditions(len(t)), batch_size=len(t),
                                                      hidden_dtype=self.dtype)  # [T, 6d], [T, d]
        blocks = self.blocks()
        if layer + 1 < len(blocks):
            mod = blocks[layer + 1].scale_shift_table[None] + emb.reshape(len(t), 6, -1)  # [T, 6, d]
            shift, scale = mod[:, 0], mod[:, 1]
        else:
            mod = self.transformer.scale_shift_table[None] + embedded[:, None]  # [T, 2, d]
            shift, scale = mod[:, 0], mod[:, 1]
        return torch.cat([scale, shift], dim=1).float().cpu()  # [T, 2d]

    def provenance(self) -> dict:
        return {**super().provenance(), "resolution": [self.height, self.width]}


def _vae_factor(source: Path) -> int:
    cfg = source / "vae" / "config.json"
    if source.is_dir() and not (source / "vae").is_dir():
        return 1  # pixel space
    if not cfg.is_file():
        return VAE_FACTOR
    return 2 ** (len(json.loads(cfg.read_text()).get("block_out_channels", [0] * 4)) - 1)


def _tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, subfolder="tokenizer")


@torch.no_grad()
def _embed(tokenizer, encoder: nn.Module, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings [N, L, C] and attention masks [N, L] of texts, padded or truncated to L = max_tokens, as
    PixArt's pipelines make them."""
    device = next(encoder.parameters()).device
    embeds, masks = [], []
    for i in range(0, len(texts), EMBED_BATCH):
        tok = tokenizer(texts[i:i + EMBED_BATCH], padding="max_length", max_length=max_tokens, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(device)  # [b, L]
        embeds.append(encoder(tok.input_ids.to(device), attention_mask=mask)[0].float().cpu())  # [b, L, C]
        masks.append(mask.cpu())
    return torch.cat(embeds), torch.cat(masks)

