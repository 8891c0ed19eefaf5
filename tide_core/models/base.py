"""The model-adapter protocol: one class per DiT family, so generic stages never name a model.

A family class answers two kinds of question:

* without weights (class methods, cheap, for preflight and for building the asset graph): ``describe`` reads
  the model's config files into a ``ModelInfo`` (depth, width, sites); ``prepare`` makes the weights
  available (trains the embedded default, or checks that a hub id or local directory is there) and returns
  their identity; ``judge`` is the family's optional judge of generated images.
* with weights (an instance, from ``load``): the conditioning (a condition index per image: a class id, a
  prompt id), the denoiser call, the blocks and the hook point of every site, the token grid, the time
  convention, decoding to images, and TIDE's adaLN target.

Conventions every family keeps: images are float [N, C, H, W] in [-1, 1]; site outputs are read as
[B, T, D] image tokens in the token grid's row-major order, except a family's ``text_sites``, read as
[B, L, D] text-stream tokens in the order of its text sequence (``text_sequences``); the sampler passes
conditions as int64 indices, ``null_condition`` being the one classifier-free guidance contrasts with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from tide_core.config import ModelConfig, TideConfig
from tide_core.factors import ConditionFactors, class_factors
from tide_core.models.registry import ModelError
from tide_core.prompts import PromptSet

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

Log = Callable[[str], None]
# How a family takes sampling.guidance_scale: "cfg" = classifier-free guidance against the null condition
# (two forward passes a step); "embedded" = the model reads the scale as an input (FLUX-dev's distilled
# guidance; one pass); "none" = the model takes no guidance (FLUX-schnell), so the scale must be 1.
GuidanceMode = Literal["cfg", "embedded", "none"]


@dataclass(frozen=True)
class TokenGrid:
    """The image-token grid of one image: token = row * w + col."""

    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class TimeConvention:
    """What the denoiser reads as time, and what TIDE's modulation and the tables store per step.

    discrete: DDPM-family integer timesteps 0..num_train_timesteps-1 (DiT, PixArt); the model reads them as
    they are. flow: flow matching on continuous time (SD3, FLUX): the model's own time value is sigma in
    (0, 1] (x_t = (1 - sigma) x_0 + sigma noise), scheduled as t = 1000 sigma; the store, the tables and TIDE's
    modulation keep the integer round(t), and the provenance keeps every captured sigma exactly.

    The one time input of TIDE's modulation, for every family: the stored integer timestep, embedded as
    timestep * 1000 / num_train_timesteps, so its frequencies mean the same whatever the schedule length.
    """

    kind: Literal["discrete", "flow"]
    num_train_timesteps: int  # flow: 1000, and the stored timestep lies in [0, 1000] (sigma = 1 is 1000)

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser's ``timesteps`` argument carries for scheduler timesteps: int64 for discrete
        families, float32 for flow matching (whose timesteps are fractional)."""
        return timesteps.round().long() if self.kind == "discrete" else timesteps.float()

    def label(self, timestep) -> int:
        """The integer timestep the store and the tables keep for a scheduler timestep."""
        return int(round(float(timestep)))


@dataclass(frozen=True)
class TextSequence:
    """One prompt's text stream, position by position, as the transformer sees it (families with a text
    stream): which token each position holds and whether it is one of the prompt's."""

    tokens: list[str]  # [L] each position's token as text ("red", "</s>"; "" where no tokenizer put one)
    pieces: list[str]  # [L] the tokenizer's own piece ("red</w>", "▁red"; "" where none)
    valid: list[bool]  # [L] the tokenizer's attention mask: False for padding and for an encoder left out
    part: list[str]  # [L] the tokenizer that made the position ("clip", "t5")


@dataclass(frozen=True)
class ModelInfo:
    """A model as its config files describe it, no weights loaded."""

    family: str
    source: str
    num_layers: int
    hidden_size: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class ModelStatus:
    """The weights in force after ``prepare``: where, whether this call trained them, and their identity."""

    path: str
    trained_now: bool
    fingerprint: str  # identity of the weights: equal fingerprints, equal model
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on images."""

    pred: np.ndarray  # int64 [N] predicted class (the first factor's value code)
    confidence: np.ndarray  # float32 [N] probability of pred
    features: np.ndarray  # float32 [N, D] the judge's feature space (Frechet distances live there)
    factors: np.ndarray | None = None  # int64 [N, F] value code per factor; None: the class is the only one

    @property
    def factor_pred(self) -> np.ndarray:
        """int64 [N, F]: the predicted value of every factor the judge scores."""
        return self.pred[:, None] if self.factors is None else self.factors


class Judge(ABC):
    """A family's judge of generated images: trained on the family's own data, predicts the condition an
    image was generated for, and embeds images in a feature space for Frechet distances."""

    name: ClassVar[str]  # the asset's name in the graph
    class_names: ClassVar[tuple[str, ...]]  # what each value of Judgement.pred means, in code order

    @classmethod
    @abstractmethod
    def settings(cls, cfg: TideConfig) -> dict:
        """Everything the trained judge depends on (a change retrains it)."""

    @classmethod
    @abstractmethod
    def train(cls, cfg: TideConfig, out_dir: Path, log: Log) -> dict:
        """Train and save into out_dir; returns its record (test_accuracy, train_accuracy, ...)."""

    @classmethod
    @abstractmethod
    def load(cls, out_dir: Path) -> Judge:
        """The judge saved in out_dir."""

    @classmethod
    @abstractmethod
    def reference_images(cls, cfg: TideConfig) -> tuple[np.ndarray, np.ndarray]:
        """Real images [N, C, H, W] in [-1, 1] to measure generated ones against: (train split, held-out
        split); the distance between the two is the floor of a Frechet distance at this sample size."""

    @abstractmethod
    def judge(self, images: np.ndarray) -> Judgement:
        """The verdict on float images [N, C, H, W] in [-1, 1]."""

    @classmethod
    def condition_factors(cls, condition_names: list[str]) -> ConditionFactors:
        """What each condition (a class name or a prompt) asks of each factor the judge scores; by default
        the class alone, condition c being class c."""
        return class_factors(condition_names)

    @classmethod
    def asked_classes(cls, condition_names: list[str]) -> np.ndarray:
        """int64 [C]: the class (a ``Judgement.pred`` code) each condition asks for, UNASKED where it names
        none; a class run's condition c asks for class c, a prompt for the class it names."""
        return cls.condition_factors(condition_names).codes[:, 0]


class DiTAdapter(ABC):
    """One DiT family: class methods describe and prepare it, an instance is the loaded model."""

    family: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]
    text_sites: ClassVar[tuple[str, ...]] = ()  # sites read from the text stream (a token axis of text positions)
    judge_class: ClassVar[type[Judge] | None] = None
    schedulers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm", "dpm")  # what sampling.scheduler may name

    # --- without weights -------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        """Depth, width and sites from the config files alone; ModelError when they are not available."""

    @classmethod
    def prepare(cls, cfg: ModelConfig, log: Log, force: bool = False) -> ModelStatus:
        """Make the weights available (default: they must already be; the embedded family trains them,
        again when ``force``)."""
        info = cls.describe(cfg)
        return ModelStatus(path=info.source, trained_now=False, fingerprint=cls.fingerprint_of(cfg))

    @classmethod
    def guidance_mode(cls, cfg: ModelConfig) -> GuidanceMode:
        """How sampling.guidance_scale reaches the model (read from config files, no weights)."""
        return "cfg"

    @classmethod
    def site_problem(cls, num_layers: int, layer: int, site: str) -> str | None:
        """Why block ``layer`` lacks ``site`` although the family has it (SD3's last joint block returns no
        text stream), or None. Checked before sampling."""
        return None

    @classmethod
    def text_sequences(cls, cfg: ModelConfig, texts: list[str]) -> list[TextSequence]:
        """Each text's text stream position by position, from the tokenizers alone (no weights)."""
        raise ModelError(f"the {cls.family} family has no text stream: capture.sites may name {cls.sites}")

    @classmethod
    @abstractmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        """Identity of the weights the config names, read without loading them."""

    @classmethod
    @abstractmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> DiTAdapter:
        """The model with its weights on cfg.device in cfg.dtype, in eval mode, gradients off; a
        text-conditional family also embeds the prompts (its conditions) and the negative prompt."""

    # --- the loaded model ------------------------------------------------------------------------

    transformer: nn.Module
    source: str
    fingerprint: str
    condition_names: list[str]  # one name per condition index (class names); null_condition excluded
    time: TimeConvention
    token_grid: TokenGrid
    guidance: GuidanceMode = "cfg"  # set at load from guidance_mode(cfg)
    guidance_scale: float = 1.0  # what an "embedded" guidance mode feeds the model (the sampler sets it)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.inner_dim)  # every diffusers DiT transformer names its width so

    @property
    def null_condition(self) -> int:
        """The condition index classifier-free guidance contrasts with: the row after the conditions (the null
        class diffusers' LabelEmbedding appends; the negative prompt's embedding)."""
        return len(self.condition_names)

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser works on (pixels or VAE latents)."""

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of decoded images."""

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, indexed by layer."""

    @abstractmethod
    def site_module(self, layer: int, site: str) -> nn.Module:
        """The module whose forward output is ``site`` of block ``layer``."""

    def read_site(self, site: str, output) -> torch.Tensor:
        """The image tokens [B, T, D] in a site module's forward output."""
        return output[0] if isinstance(output, tuple) else output

    def write_site(self, site: str, output, tokens: torch.Tensor):
        """The forward output with its image tokens replaced by ``tokens`` (for splicing and editing)."""
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    @abstractmethod
    def predict_noise(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The denoiser's output [B, C, H, W] (float32) for x [B, C, H, W] at timesteps [B] (as
        ``time.model_time`` gives them) under condition indices [B]: the noise eps for DDPM-family models, the
        velocity noise - x_0 for flow matching; either way what the scheduler's step takes, and what guidance
        mixes linearly."""

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noised input, target of predict_noise) for clean x0 [B, C, H, W] at integer timesteps [B]: how the
        denoiser loss of a splice is measured, as the model was trained."""
        if self.time.kind == "flow":
            sigma = (timesteps.float() / self.time.num_train_timesteps)[:, None, None, None]  # [B, 1, 1, 1]
            return (1 - sigma) * x0 + sigma * noise, noise - x0
        sched = self.training_scheduler()
        noised = sched.add_noise(x0, noise, timesteps.long())
        if sched.config.get("prediction_type") == "v_prediction":  # a v-prediction model (the styled digits)
            return noised, sched.get_velocity(x0, noise, timesteps.long())
        return noised, noise

    @abstractmethod
    def make_scheduler(self, name: str, num_steps: int) -> SchedulerMixin:
        """A fresh sampling scheduler (``sampling.scheduler``) set to num_steps."""

    @abstractmethod
    def training_scheduler(self) -> SchedulerMixin:
        """The noise schedule the model was trained with (for noising data in loss evaluations)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] from what the denoiser produces."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What the denoiser works on for images [B, C, H, W] in [-1, 1] (the inverse of decode)."""

    def adaln_modulation(self, layer: int, timesteps: torch.Tensor) -> torch.Tensor:
        """(scale, shift) [T, 2 * d] the model applies, at these timesteps, to the output of block ``layer``:
        the target TIDE's modulation MLP can start from (sae.spec.time_init = "adaln")."""
        raise ModelError(f"the {self.family} family has no adaLN target for TIDE's modulation: set "
                         'sae.spec.time_init = "identity"')

    def provenance(self) -> dict:
        """What identifies the model in a store's provenance."""
        return {"family": self.family, "source": self.source, "config_hash": self.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "num_conditions": len(self.condition_names)}

    def check_site(self, layer: int, site: str) -> None:
        if not 0 <= layer < self.num_layers:
            raise ModelError(f"layer {layer} does not exist: the model has layers 0..{self.num_layers - 1}")
        if site not in self.sites:
            raise ModelError(f"the {self.family} family has no site {site!r}: use one of {self.sites}")
        if problem := self.site_problem(self.num_layers, layer, site):
            raise ModelError(problem)

    def text_mask(self, conditions) -> np.ndarray:
        """bool [B, L]: which text-stream positions of each condition hold a prompt token (families with a
        text stream; set at load from ``text_sequences``)."""
        raise ModelError(f"the {self.family} family has no text stream")


def resolve_device(device: str) -> str:
    """model.device as a torch device name; a clear error when CUDA is asked for but absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device='cuda' but torch sees no CUDA device; set model.device='auto' or 'cpu'")
    return device
