"""Flow-matching DiTs with two token streams: what SD3 (``sd3.py``) and FLUX (``flux.py``) share.

Both come in the diffusers pipeline layout (transformer/, vae/, scheduler/, text_encoder*/, tokenizer*/),
from the hub or a local directory, and load through diffusers' and transformers' own classes. Both are trained
with flow matching: x_t = (1 - sigma) x_0 + sigma noise, the model predicts the velocity noise - x_0, and the
sampler is diffusers' ``FlowMatchEulerDiscreteScheduler`` with the model's own time shift. Time is continuous:
the store keeps round(1000 sigma) per step and the provenance keeps sigma (``TimeConvention``).

Every block returns (text tokens, image tokens): SD3's joint blocks and FLUX's double- and single-stream
blocks alike (a FLUX single block splits the concatenated sequence back before returning). So the sites are
read the same way for both: ``resid`` = the block's image tokens [B, T, D], in the token grid's row-major
order; ``resid_text`` = its text tokens [B, L, D], in the order of the text sequence, whose positions
``text_sequences`` names from the tokenizers (the same calls that embed the prompts): padding positions are
in the stream, as in diffusers' pipelines, and ``text_mask`` marks them.

Conditions are the run's prompts, embedded once when the model loads (the text encoders are freed right
after): a sequence embedding per prompt [L, C] and a pooled vector [P]; the null condition is the negative
prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from tide_core.config import ModelConfig
from tide_core.models.base import (
    DiTAdapter,
    ModelInfo,
    TextSequence,
    TimeConvention,
    TokenGrid,
    resolve_device,
)
from tide_core.models.dit import directory_fingerprint, transformer_config
from tide_core.models.pixart import TokenCount
from tide_core.models.registry import ModelError
from tide_core.prompts import PromptSet

SITES = ("resid", "resid_text")
TEXT_SITES = ("resid_text",)
FLOW_TIMESTEPS = 1000  # the schedulers' t = 1000 sigma
EMBED_BATCH = 32  # prompts embedded per text-encoder call


@dataclass(frozen=True)
class TextConditions:
    """Every condition's text inputs to the transformer: the prompts', then the negative prompt's."""

    embeds: torch.Tensor  # [N + 1, L, C] the text sequence (the text stream's input)
    pooled: torch.Tensor  # [N + 1, P] the pooled vector (added to the timestep embedding)


def require_parts(source: Path, parts: tuple[str, ...], family: str) -> None:
    missing = [p for p in parts if not (source / p).is_dir()]
    if missing:
        raise ModelError(f"model.source={str(source)!r} lacks {', '.join(p + '/' for p in missing)}: a {family} "
                         f"directory needs {', '.join(p + '/' for p in parts)} (the diffusers pipeline layout, as "
                         "save_pretrained or a hub download writes it)")


def tokenizer(source: str, subfolder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, subfolder=subfolder)


def padded_ids(tok, texts: list[str], max_length: int):
    """The tokenizer's ids and attention masks [N, max_length], padded or cut to max_length as the SD3 and
    FLUX pipelines tokenize (one call for embedding and for naming the positions, so they cannot differ)."""
    return tok(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)


def sequences(tok, texts: list[str], max_length: int, part: str) -> list[TextSequence]:
    """Each text's positions under one tokenizer: its pieces, their text and the attention mask."""
    enc = padded_ids(tok, texts, max_length)
    out = []
    for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True):
        out.append(TextSequence(tokens=[tok.decode([i]).strip() for i in ids], pieces=tok.convert_ids_to_tokens(ids),
                                valid=[bool(m) for m in mask], part=[part] * len(ids)))
    return out


def blank(n: int, length: int, part: str) -> list[TextSequence]:
    """Positions no tokenizer fills (SD3's T5 part without T5: zeros in the stream)."""
    return [TextSequence([""] * length, [""] * length, [False] * length, [part] * length) for _ in range(n)]


def joined(*parts: list[TextSequence]) -> list[TextSequence]:
    """Per text, the parts' positions one after the other (SD3: CLIP's 77, then T5's)."""
    return [TextSequence(*(sum((getattr(s, f) for s in seqs), []) for f in ("tokens", "pieces", "valid", "part")))
            for seqs in zip(*parts, strict=True)]


@torch.no_grad()
def clip_embed(tok, encoder: nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [N, 77, C], pooled output [N, P]) of a CLIP text encoder, padded to its
    77 tokens, as the SD3 and FLUX pipelines take them (the pooled output: CLIPTextModelWithProjection's
    projected text_embeds, CLIPTextModel's pooler output)."""
    device = next(encoder.parameters()).device
    hidden, pooled = [], []
    for i in range(0, len(texts), EMBED_BATCH):
        ids = torch.tensor(padded_ids(tok, texts[i:i + EMBED_BATCH], tok.model_max_length).input_ids,
                           device=device)  # [b, 77]
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].float().cpu())  # [b, 77, C]
        pooled.append(out[0].float().cpu() if out[0].ndim == 2 else out.pooler_output.float().cpu())  # [b, P]
    return torch.cat(hidden), torch.cat(pooled)


@torch.no_grad()
def t5_embed(tok, encoder: nn.Module, texts: list[str], max_tokens: int) -> torch.Tensor:
    """T5 embeddings [N, L, C] padded or truncated to L = max_tokens. The SD3 and FLUX pipelines pass no
    attention mask to T5 or to the transformer, so neither does this."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(texts), EMBED_BATCH):
        ids = torch.tensor(padded_ids(tok, texts[i:i + EMBED_BATCH], max_tokens).input_ids, device=device)  # [b, L]
        out.append(encoder(ids)[0].float().cpu())  # [b, L, C]
    return torch.cat(out)


class FlowDiT(DiTAdapter):
    """A flow-matching transformer with its text conditions, VAE and flow-matching schedule."""

    sites: ClassVar[tuple[str, ...]] = SITES
    text_sites: ClassVar[tuple[str, ...]] = TEXT_SITES
    schedulers: ClassVar[tuple[str, ...]] = ("euler",)
    transformer_class: ClassVar[str]  # the diffusers class in transformer/config.json
    parts: ClassVar[tuple[str, ...]]  # the subfolders a local directory needs
    t5_tokenizer: ClassVar[str]  # the subfolder of the T5 tokenizer (prompt token counts)
    patch: ClassVar[int] = 2  # latent pixels per token side (SD3's patch embedding; FLUX's 2x2 packing)
    native_side: ClassVar[int] = 1024
    known_hub_models: ClassVar[dict[str, ModelInfo]] = {}

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler_config: dict, *, source: str,
                 fingerprint: str, prompts: PromptSet, text: TextConditions, height: int, width: int):
        self.transformer, self.vae = transformer, vae
        self.scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        self.source, self.fingerprint = source, fingerprint
        self.prompts = prompts
        self.condition_names = prompts.texts
        self.text = text
        self.text_valid = np.zeros(text.embeds.shape[:2], bool)  # [N + 1, L]; load sets it from the tokenizers
        self.height, self.width = height, width
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.token_grid = TokenGrid(height // self.vae_factor // self.patch, width // self.vae_factor // self.patch)
        self.time = TimeConvention("flow", FLOW_TIMESTEPS)

    # --- without weights -------------------------------------------------------------------------

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        if cfg.source in cls.known_hub_models:
            info = cls.known_hub_models[cfg.source]
        else:
            require_parts(Path(cfg.source), cls.parts, cls.family)
            info = cls.info_from(transformer_config(cfg.source), cfg.source)
        cls.check_resolution(cfg)
        return info

    @classmethod
    def info_from(cls, tc: dict, source: str) -> ModelInfo:
        """Depth and width from a transformer config."""
        width = int(tc["num_attention_heads"]) * int(tc["attention_head_dim"])
        return ModelInfo(family=cls.family, source=source, num_layers=cls.depth(tc), hidden_size=width,
                         sites=cls.sites)

    @classmethod
    def depth(cls, tc: dict) -> int:
        return int(tc["num_layers"])

    @classmethod
    def vae_factor_of(cls, cfg: ModelConfig) -> int:
        path = Path(cfg.source) / "vae" / "config.json"
        if not path.is_file():
            return 8  # the hub models' VAEs
        return 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1)

    @classmethod
    def check_resolution(cls, cfg: ModelConfig) -> None:
        multiple = cls.vae_factor_of(cfg) * cls.patch
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and value % multiple:
                raise ModelError(f"model.{name}={value} is not a multiple of {multiple} (the VAE's factor times the "
                                 f"patch size): try {max(multiple, round(value / multiple) * multiple)}")

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        return directory_fingerprint(cfg.source)

    @classmethod
    def count_tokens(cls, cfg: ModelConfig, texts: list[str]) -> list[TokenCount]:
        """How each prompt tokenizes for T5 (the sequence max_prompt_tokens cuts; CLIP's 77 are apart)."""
        ids = tokenizer(cfg.source, cls.t5_tokenizer)(texts, add_special_tokens=True).input_ids
        return [TokenCount(len(i), len(i) > cfg.max_prompt_tokens) for i in ids]

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> FlowDiT:
        """The transformer and VAE on model.device; the prompts embedded by the text encoders (on
        model.text_encoder_device), which are then freed."""
        import diffusers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers.utils import logging as transformers_logging

        if prompts is None:
            raise ModelError(f"model.source={cfg.source!r} is text-conditional: set sampling.prompts to a prompt file")
        cls.describe(cfg)  # the directory's parts and the resolution, before any weights load
        device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        transformers_logging.disable_progress_bar()
        whole = {"torch_dtype": dtype, "low_cpu_mem_usage": False}  # without accelerate: no lazy loading
        src = cfg.source
        transformer = getattr(diffusers, cls.transformer_class).from_pretrained(src, subfolder="transformer", **whole)
        transformer = transformer.to(device).eval().requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **whole).to(device).eval().requires_grad_(False)
        sched = dict(FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler"))
        text_device = device if cfg.text_encoder_device == "auto" else "cpu"
        text = cls.embed_prompts(cfg, [*prompts.texts, negative_prompt], text_device, dtype, transformer)
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = int(getattr(transformer.config, "sample_size", 0) or cls.native_side // vae_factor) * vae_factor
        model = cls(transformer, vae, sched, source=src, fingerprint=cls.fingerprint_of(cfg), prompts=prompts,
                    text=TextConditions(text.embeds.to(device, dtype), text.pooled.to(device, dtype)),
                    height=cfg.height or side, width=cfg.width or side)
        model.guidance = cls.guidance_mode(cfg)
        model.text_valid = cls.text_valid_of(cfg, [*prompts.texts, negative_prompt], text.embeds.shape[1])
        return model

    @classmethod
    def text_valid_of(cls, cfg: ModelConfig, texts: list[str], length: int) -> np.ndarray:
        """bool [len(texts), L]: the positions of each text's stream that hold its tokens."""
        valid = np.array([s.valid for s in cls.text_sequences(cfg, texts)], bool)
        if valid.shape != (len(texts), length):
            raise ModelError(f"the {cls.family} text sequence has {valid.shape[1]} positions but the embeddings "
                             f"{length}: the tokenizers and the text encoders disagree")
        return valid

    @classmethod
    def embed_prompts(cls, cfg: ModelConfig, texts: list[str], device: str, dtype: torch.dtype,
                      transformer: nn.Module) -> TextConditions:
        """The family's text conditions of texts, computed by its text encoders (loaded here, then freed)."""
        raise NotImplementedError

    # --- the loaded model ------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_channels, self.height // self.vae_factor, self.width // self.vae_factor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.height, self.width, int(self.vae.config.out_channels)

    def site_module(self, layer: int, site: str) -> nn.Module:
        self.check_site(layer, site)
        return self.blocks()[layer]

    def read_site(self, site: str, output) -> torch.Tensor:
        # (text tokens [B, L, D], image tokens [B, T, D])
        return output[0] if site in self.text_sites else output[1]

    def write_site(self, site: str, output, tokens: torch.Tensor):
        return (tokens, output[1]) if site in self.text_sites else (output[0], tokens)

    def text_mask(self, conditions) -> np.ndarray:
        return self.text_valid[np.asarray(conditions, np.int64)]  # [B, L]

    @property
    def text_length(self) -> int:
        """L: positions of the text stream."""
        return int(self.text.embeds.shape[1])

    def make_scheduler(self, name: str, num_steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name not in self.schedulers:
            raise ModelError(f"sampling.scheduler={name!r}: the {self.family} family samples with flow matching; "
                             "set sampling.scheduler = 'euler'")
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        self.set_timesteps(sched, num_steps)
        return sched

    def set_timesteps(self, sched, num_steps: int) -> None:
        sched.set_timesteps(num_steps)

    def training_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def _vae_shift(self) -> tuple[float, float]:
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._vae_shift()
        return self.vae.decode((latents / scale + shift).to(self.dtype)).sample.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._vae_shift()
        return (self.vae.encode(images.to(self.dtype)).latent_dist.mean.float() - shift) * scale

    def provenance(self) -> dict:
        return {**super().provenance(), "resolution": [self.height, self.width], "guidance": self.guidance}
