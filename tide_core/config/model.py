"""``[model]``: which DiT to run, and the sections of the families that are built or trained here."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tide_core.config.base import DIGITS_SOURCE, Section


class PixelDiTConfig(Section):
    """The shape of a pixel-space DiT trained here on the digits, and its identity: what the families that
    train their own weights (digits, styled-digits) share."""

    image_size: int = Field(16, ge=8, le=64)
    """Side of the square pixel-space images the DiT sees (the 8x8 digits are upsampled to this)."""
    patch_size: int = Field(2, ge=1, le=8)
    """Patch side in pixels; the token grid is (image_size / patch_size) squared."""
    num_layers: int = Field(6, ge=1, le=48)
    """Number of transformer blocks."""
    num_heads: int = Field(4, ge=1, le=32)
    """Attention heads per block."""
    head_dim: int = Field(32, ge=8, le=256)
    """Channels per head; the residual width is num_heads * head_dim."""
    resume_every: int = Field(200, ge=1)
    """Training steps between saves of the loop's state beside the checkpoint (``.<name>.resume.pt``),
    from which a killed training goes on; not part of the recipe (the weights do not depend on it)."""

    @model_validator(mode="after")
    def _patch_divides(self) -> PixelDiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        return self

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    # where the weights are stored and how often training saves its state: not what the weights are
    NOT_RECIPE: ClassVar[frozenset[str]] = frozenset({"checkpoint_dir", "resume_every"})

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (``NOT_RECIPE`` left out)."""
        payload = self.model_dump(exclude=set(self.NOT_RECIPE))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class DigitsDiTConfig(PixelDiTConfig):
    """Architecture and training recipe of the embedded default DiT (``model.source = "digits"``)."""

    train_steps: int = Field(5000, ge=1)
    """Optimizer steps of DiT training."""
    batch_size: int = Field(64, ge=1)
    """Images per optimizer step."""
    lr: float = Field(1e-3, gt=0, le=1.0)
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = Field(200, ge=0)
    """Linear warm-up length in optimizer steps."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """Decay of the exponential moving average of weights; the EMA weights are what is saved."""
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability of replacing the class by the null class in training (enables guidance)."""
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule of training and sampling (cosine suits small images)."""
    num_train_timesteps: int = Field(1000, ge=10)
    """Length of the diffusion process in training timesteps."""
    seed: int = 0
    """Seed of weight init, batch order and noise: the same seed gives the same checkpoint."""
    checkpoint_dir: str = "models/digits-dit"
    """Where the checkpoint lives (diffusers layout), relative to the config file's folder or absolute."""


class StyledDigitsConfig(PixelDiTConfig):
    """The styled-digits PixArt (pixel space, a small T5 trained with it): architecture and training recipe.
    Trained by ``tide_core.train_styled`` on renders of the digits outside the judge's held-out split; its
    blocks are PixArt's (self-attention, cross-attention to the text, MLP; adaLN-single)."""

    image_size: int = Field(32, ge=8, le=64)
    """Side of the square RGB renders the DiT denoises (pixel space)."""
    patch_size: int = Field(4, ge=1, le=8)
    """Patch side in pixels: 4 gives an 8 x 8 token grid, the digits DiT's 64 tokens (patches of 2 cost 3x
    the time per step on 2 cores)."""
    text_width: int = Field(64, ge=8)
    """Width of the T5 encoder trained with the DiT."""
    text_layers: int = Field(2, ge=1)
    """T5 encoder layers."""
    max_prompt_tokens: int = Field(12, ge=4)
    """Caption tokens the text encoder sees in training (the longest template caption is 10 with </s>)."""
    train_steps: int = Field(4000, ge=1)
    """Optimizer steps."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """What the DiT predicts: v (sqrt(a) noise - sqrt(1 - a) image, which near pure noise is the image, so the
    prompt decides it) or the noise (then the first sampling steps barely depend on the prompt, and a model
    trained so ignores it: chance accuracy after 6,000 steps)."""
    batch_size: int = Field(64, ge=1)
    """Renders per optimizer step (new styles drawn for every batch)."""
    lr: float = Field(1e-3, gt=0, le=1.0)
    """Peak AdamW learning rate of the DiT and the text encoder (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = Field(300, ge=0)
    """Linear warm-up length in optimizer steps."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """Decay of the weights' moving average; the EMA weights (DiT and text encoder) are saved."""
    factor_drop: float = Field(0.25, ge=0.0, lt=1.0)
    """Probability that a caption leaves out each style factor, so the model learns to fill it in."""
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability of training on the empty caption (the null condition of classifier-free guidance)."""
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """Digits held out for the factor judge's test (never seen by the DiT), as the digits judge's split."""
    seed: int = 0
    """Seed of init, digits, styles, captions, timesteps and noise: the same seed gives the same weights."""
    checkpoint_dir: str = "models/styled-digits"
    """Where the model lives (diffusers layout), relative to the config file's folder or absolute."""


class JudgeConfig(Section):
    """The classifier that judges generated images (for model families that have one)."""

    epochs: int = Field(40, ge=1)
    """Training epochs over the judge's training split."""
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """Held-out fraction of the judge's data used to report its accuracy."""
    seed: int = 0
    """Seed of the split, init and batch order."""
    quality_samples: int = Field(500, ge=10)
    """Generated images used to measure class accuracy and Frechet distance of the DiT."""


class TinyPixArtConfig(Section):
    """A tiny random-weight PixArt (``model.source = "tiny-pixart"``): the text-conditional path at a size a
    laptop samples in seconds, built on first use and then loaded like any PixArt directory."""

    num_layers: int = Field(6, ge=1, le=28)
    """Transformer blocks."""
    num_heads: int = Field(4, ge=1, le=16)
    """Attention heads per block."""
    head_dim: int = Field(16, ge=4, le=128)
    """Channels per head; the residual width is num_heads * head_dim."""
    sample_size: int = Field(32, ge=4, le=64)
    """Latent side in VAE latents (images are 2x larger: the tiny VAE has two blocks; patches of 2 make
    the token grid sample_size / 2 on a side)."""
    text_layers: int = Field(2, ge=1, le=12)
    """Blocks of the tiny T5 text encoder."""
    text_width: int = Field(32, ge=8, le=512)
    """Width of the tiny T5 text encoder (the transformer's caption input)."""
    seed: int = 0
    """Seed of every random weight: the same seed builds the same directory."""
    checkpoint_dir: str = "models/tiny-pixart"
    """Where it is built (diffusers layout), relative to the config file's folder or absolute."""


class TinyFlowConfig(Section):
    """A tiny random-weight flow-matching DiT with two token streams (SD3's MMDiT, FLUX), built on first use
    and then loaded like a downloaded directory of its family."""

    num_layers: int = Field(4, ge=1, le=24)
    """Joint blocks (SD3) or double-stream blocks (FLUX): image and text tokens in two streams."""
    num_heads: int = Field(4, ge=1, le=16)
    """Attention heads per block."""
    head_dim: int = Field(16, ge=4, le=128, multiple_of=2)
    """Channels per head, even (FLUX's rotary embedding splits them into even parts); the residual width is
    num_heads * head_dim."""
    sample_size: int = Field(32, ge=4, le=64)
    """Latent side in VAE latents (images are 2x larger: the tiny VAE has two blocks)."""
    text_layers: int = Field(2, ge=1, le=12)
    """Blocks of each tiny text encoder (CLIP and T5)."""
    text_width: int = Field(32, ge=8, le=512)
    """Width of each tiny text encoder."""
    seed: int = 0
    """Seed of every random weight: the same seed builds the same directory."""


class TinySD3Config(TinyFlowConfig):
    """A tiny random SD3 (``model.source = "tiny-sd3"``): MMDiT joint blocks, two CLIP encoders and T5."""

    checkpoint_dir: str = "models/tiny-sd3"
    """Where it is built (diffusers layout), relative to the config file's folder or absolute."""


class TinyFluxConfig(TinyFlowConfig):
    """A tiny random FLUX (``model.source = "tiny-flux"``): double-stream blocks, then single-stream blocks
    over the concatenated tokens; CLIP for the pooled vector, T5 for the sequence."""

    num_single_layers: int = Field(4, ge=0, le=48)
    """Single-stream blocks after the double-stream ones (their layers follow: num_layers, num_layers + 1,
    ...)."""
    guidance_embeds: bool = True
    """FLUX-dev's guidance embedding (sampling.guidance_scale is a model input, one pass a step); false is
    FLUX-schnell's, which takes no guidance."""
    checkpoint_dir: str = "models/tiny-flux"
    """Where it is built (diffusers layout), relative to the config file's folder or absolute."""


class ModelConfig(Section):
    """Which DiT to run."""

    source: str = DIGITS_SOURCE
    """"digits" (the embedded default, trained locally), "styled-digits" (a text-conditional PixArt trained
    locally on styled digits, with a judge of every factor), "tiny-pixart" / "tiny-sd3" / "tiny-flux" (tiny random
    text-conditional models, built locally), a hub id (e.g. "facebook/DiT-XL-2-256",
    "PixArt-alpha/PixArt-XL-2-512x512", "stabilityai/stable-diffusion-3-medium-diffusers",
    "black-forest-labs/FLUX.1-schnell") or a local diffusers directory with transformer/ (and vae/, scheduler/,
    text_encoder/, tokenizer/, ...), relative to the config file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: auto picks CUDA when present."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute dtype of the DiT (half precision only makes sense on CUDA)."""
    height: int | None = Field(None, ge=8)
    """Image height in pixels (text-conditional families); default the model's native size. Must be a
    multiple of the VAE's factor times the patch size."""
    width: int | None = Field(None, ge=8)
    """Image width in pixels (text-conditional families); default the model's native size."""
    max_prompt_tokens: int = Field(120, ge=1, le=4096)
    """T5 tokens a prompt is padded or truncated to (PixArt-α trains with 120, PixArt-Σ with 300, SD3 with 256,
    FLUX-schnell 256 and FLUX-dev 512); truncated prompts are counted in the `prompts` table. CLIP encoders
    (SD3, FLUX) always take their own 77."""
    use_t5: bool = True
    """SD3: embed prompts with its T5 encoder too (text_encoder_3). false runs on the two CLIP encoders alone,
    as diffusers allows (T5's part of the text sequence is zeros): saves T5-XXL's ~9 GB at some cost in
    prompt following. Also false when the directory has no text_encoder_3/."""
    text_encoder_device: Literal["auto", "cpu"] = "auto"
    """Where the text encoder embeds the prompts (auto = model.device; cpu keeps it off the GPU). It embeds
    every prompt once, when the model loads, and is freed right after."""
    digits: DigitsDiTConfig = Field(default_factory=DigitsDiTConfig)
    """The embedded default DiT."""
    styled_digits: StyledDigitsConfig = Field(default_factory=StyledDigitsConfig)
    """The styled-digits PixArt of model.source = "styled-digits" (trained here; the repo ships the default's)."""
    tiny_pixart: TinyPixArtConfig = Field(default_factory=TinyPixArtConfig)
    """The tiny random PixArt of model.source = "tiny-pixart"."""
    tiny_sd3: TinySD3Config = Field(default_factory=TinySD3Config)
    """The tiny random SD3 of model.source = "tiny-sd3"."""
    tiny_flux: TinyFluxConfig = Field(default_factory=TinyFluxConfig)
    """The tiny random FLUX of model.source = "tiny-flux"."""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The judge of generated images."""

    @field_validator("source")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('model.source is empty: use "digits", a hub id or a local diffusers directory')
        return v
