"""The SAE settings, plain pydantic models: ``SAEDesign`` (the architecture and loss a user chooses),
``SAESpec`` (a design bound to the data it reads: width, variant, diffusion schedule; what ``cfg.json``
stores) and ``SAETrainConfig`` (how SAEs are trained).

A run config holds one ``SAEDesign`` and one ``SAETrainConfig`` for all the SAEs it trains; each SAE gets
its ``SAESpec`` from ``design.bind(d_in, variant, num_train_timesteps)`` once the activations are known.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A variant is a selection rule, optionally with TIDE's timestep modulation of the encoder input ("tide" is
# TopK with it, as in the paper; "tide_<rule>" the other rules with it).
Variant = Literal["tide", "topk", "relu", "batchtopk", "matryoshka", "tide_batchtopk", "tide_matryoshka"]
VARIANTS: tuple[str, ...] = get_args(Variant)
TOPK_VARIANTS: tuple[str, ...] = ("tide", "topk")  # k latents per token, the same at training and inference
BATCH_VARIANTS: tuple[str, ...] = ("batchtopk", "matryoshka", "tide_batchtopk", "tide_matryoshka")
MODULATED_VARIANTS: tuple[str, ...] = ("tide", "tide_batchtopk", "tide_matryoshka")
Selection = Literal["topk", "batchtopk", "relu"]
TimeInit = Literal["identity", "adaln"]


class SAEDesign(BaseModel):
    """The architecture and loss of a sparse autoencoder, independent of the activations it will read."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    n_latents: int = Field(1024, ge=1)
    """Dictionary size: number of latents (features)."""
    k: int = Field(32, ge=1)
    """Active latents per token: exactly k for tide and topk; k on average over a training batch for the
    batch variants (BatchTopK keeps the batch's B * k largest); relu ignores it (its l1_coeff sets L0)."""
    aux_k: int | None = Field(None, ge=1)
    """Dead latents used by the AuxK loss; default min(n_latents, max(k, d_in // 2)) (OpenAI: ~d_in / 2),
    resolved once d_in is known."""
    aux_coeff: float = Field(0.5, ge=0.0)
    """Weight of the AuxK loss on dead latents; 0 disables it. OpenAI uses 1/32; 1/2 together with
    dead_tokens_threshold=10_000 is this project's tuned default (the sweep in docs/DECISIONS.md)."""
    dead_tokens_threshold: int = Field(10_000, ge=1)
    """A latent is dead once it has not fired on any of this many consecutive training tokens (counted
    in tokens, not steps); AuxK then trains it to reconstruct the residual."""
    l1_coeff: float = Field(0.006, ge=0.0)
    """relu only: weight of sum_i z_i * ||W_dec row i|| against the per-channel MSE (both in the scaled space
    where mean ||x|| = sqrt(d_in)). 0.006 gives held-out L0 34 on the default run's layer 3 at lr 2e-3 and 2M
    tokens (bench/time_norm.py --relu-sweep); L0 keeps falling as training goes on, so retune it towards
    the TopK variants' k for another width or budget."""
    threshold_rate: float = Field(0.01, gt=0.0, le=1.0)
    """Batch variants: weight of each training batch in the running average of the batch's selection
    threshold (its B*k-th largest pre-activation). Inference keeps the latents above that threshold, so
    encoding one image does not depend on the other images of its batch (BatchTopK, Bussmann et al. 2024)."""
    matryoshka_widths: list[int] | None = None
    """matryoshka variants: the nested dictionary prefixes, ascending, the last = n_latents; each prefix
    alone reconstructs the input and the loss is the mean of their MSEs. Default n/16, n/8, n/4, n/2, n
    (at least k each)."""
    time_embed_dim: int = Field(64, ge=2)
    """tide only: width of the sinusoidal timestep embedding (even: a cos and a sin half)."""
    time_hidden: int = Field(128, ge=1)
    """tide only: hidden width of the MLP mapping the embedding to (scale, shift)."""
    time_init: TimeInit = "identity"
    """tide only: how the modulation MLP starts. identity: zero last layer, so a fresh tide SAE computes
    what a topk SAE with the same weights computes. adaln: fitted to the DiT's own adaLN (scale, shift)
    by the caller, who calls ``SparseAutoencoder.fit_time_mlp`` before training (the SAE itself is built
    at the identity either way; this field records which start the checkpoint had)."""

    @model_validator(mode="after")
    def _check_design(self) -> SAEDesign:
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} must be <= n_latents={self.n_latents}: lower k or widen the "
                             "dictionary")
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim={self.time_embed_dim} must be even (a cos and a sin half): "
                             f"use {self.time_embed_dim + 1}")
        widths = self.matryoshka_widths
        if widths is not None and (not widths or widths[-1] != self.n_latents or widths[0] < 1
                                   or any(b <= a for a, b in zip(widths, widths[1:], strict=False))):
            raise ValueError(f"matryoshka_widths={widths} must be ascending prefix sizes >= 1 ending at "
                             f"n_latents={self.n_latents}, e.g. {default_widths(self.n_latents, self.k)}")
        if self.aux_k is not None and self.aux_k > self.n_latents:
            raise ValueError(f"aux_k={self.aux_k} must be <= n_latents={self.n_latents}: lower aux_k, or "
                             "leave it unset for the default min(n_latents, max(k, d_in // 2))")
        return self

    def bind(self, d_in: int, variant: Variant = "tide", num_train_timesteps: int = 1000) -> SAESpec:
        """The spec of an SAE of this design on activations of width ``d_in`` (validated)."""
        fields: dict[str, Any] = self.model_dump()
        fields.update(d_in=d_in, variant=variant, num_train_timesteps=num_train_timesteps)
        return SAESpec.model_validate(fields)


class SAESpec(SAEDesign):
    """A design bound to its data: everything needed to rebuild one SAE (what ``cfg.json`` stores)."""

    d_in: int = Field(ge=1)
    """Width of the activations (channels per token)."""
    variant: Variant = "tide"
    """tide = TopK with timestep modulation of the input; topk = plain TopK; batchtopk = the top B*k of a
    training batch, a threshold at inference; matryoshka = batchtopk whose nested prefixes each reconstruct;
    tide_batchtopk / tide_matryoshka = those with the modulation; relu = ReLU + L1 baseline."""
    num_train_timesteps: int = Field(1000, ge=1)
    """tide only: length of the DiT's diffusion schedule; timesteps must lie in [0, num_train_timesteps] (the
    end point is flow matching's sigma = 1)."""

    @model_validator(mode="after")
    def _resolve_defaults(self) -> SAESpec:
        if self.aux_k is None:
            self.aux_k = min(self.n_latents, max(self.k, self.d_in // 2))
        if self.matryoshka_widths is None and self.variant.endswith("matryoshka"):
            self.matryoshka_widths = default_widths(self.n_latents, self.k)
        return self

    @property
    def is_topk(self) -> bool:
        """k latents per token by a per-token top-k (tide, topk): the compiled feature-pass path applies."""
        return self.variant in TOPK_VARIANTS

    @property
    def selection(self) -> Selection:
        """How latents are chosen: per-token top-k, batch top-k (a threshold at inference), or ReLU."""
        if self.variant in TOPK_VARIANTS:
            return "topk"
        return "batchtopk" if self.variant in BATCH_VARIANTS else "relu"

    @property
    def sparse(self) -> bool:
        """Trained through the sparse selection path with AuxK (every variant but relu)."""
        return self.selection != "relu"

    @property
    def modulated(self) -> bool:
        """Has TIDE's timestep modulation (needs the timestep of every token)."""
        return self.variant in MODULATED_VARIANTS

    @property
    def nested_widths(self) -> list[int]:
        """The prefixes whose reconstructions the loss averages: the matryoshka widths, else the whole."""
        return list(self.matryoshka_widths) if self.variant.endswith("matryoshka") else [self.n_latents]

    @property
    def design(self) -> SAEDesign:
        """The design part (with aux_k resolved for this d_in)."""
        return SAEDesign.model_validate(self.model_dump(include=set(SAEDesign.model_fields)))


# Design fields only the batch variants read: code versions and sweep ids hash them only away from their
# defaults (``batch_settings``), so a run without batch variants keeps the identities it had.
BATCH_FIELDS = ("threshold_rate", "matryoshka_widths")
BATCH_CONFIG_PATHS = tuple(f"sae.spec.{f}" for f in BATCH_FIELDS)  # where a run config ([sae.spec]) holds them


def batch_settings(design: SAEDesign) -> dict[str, Any]:
    """The batch variants' settings that differ from their defaults ({} when none does)."""
    default = SAEDesign.model_fields
    return {f: getattr(design, f) for f in BATCH_FIELDS if getattr(design, f) != default[f].default}


def default_widths(n_latents: int, k: int) -> list[int]:
    """Matryoshka's default prefixes: n/16, n/8, n/4, n/2, n, keeping those of at least k latents."""
    widths = sorted({max(k, n_latents >> shift) for shift in (4, 3, 2, 1, 0)})
    return [w for w in widths if w <= n_latents]


class SAETrainConfig(BaseModel):
    """How SAEs are trained (shared by all SAEs trained in one pass)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    total_tokens: int = Field(2_000_000, ge=1)
    """Training tokens per SAE; training stops there (or earlier if the stream runs out)."""
    batch_size: int = Field(1024, ge=1)
    """Tokens per optimizer step."""
    lr: float = Field(2e-3, gt=0.0)
    """Peak AdamW learning rate (topk's best with under 5% dead latents on every layer of the default run's
    sweep; see docs/DECISIONS.md)."""
    variant_lr_scale: dict[Variant, Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=lambda: {"tide": 0.5})
    """A variant's peak learning rate as a multiple of lr: variants trained in one pass share the batches and
    the schedule's shape, not necessarily its peak (tide keeps under 5% dead latents on every layer of the
    default run at half of topk's best lr). tide_batchtopk and tide_matryoshka without an entry of their
    own take tide's."""
    time_lr_scale: float = Field(1.0, gt=0.0)
    """TIDE's timestep MLP learns at this multiple of its SAE's learning rate."""
    warmup_tokens: int = Field(50_000, ge=0)
    """Length of the linear learning-rate warm-up, in tokens (must be < total_tokens)."""
    decay: Literal["cosine", "linear"] = "cosine"
    """Shape of the decay from the peak to final_lr_frac * lr after warm-up."""
    final_lr_frac: float = Field(0.1, ge=0.0, le=1.0)
    """Learning rate at the end of training, as a fraction of the peak."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay (0: sparsity, not decay, is the regulariser)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Max global gradient norm per SAE; 0 disables clipping."""
    init_tokens: int = Field(16_384, ge=1)
    """Tokens at the start of the stream used to set the input scale and b_dec of fresh SAEs (must be <=
    total_tokens)."""
    seed: int = 0
    """Seed of the weights of SAEs built from specs; all get the same seed, so variants start alike."""
    log_every: int = Field(50, ge=1)
    """Optimizer steps per logged (averaged) record."""

    @model_validator(mode="after")
    def _fits_in_training(self) -> SAETrainConfig:
        if self.warmup_tokens >= self.total_tokens:
            raise ValueError(
                f"warmup_tokens={self.warmup_tokens} must be < total_tokens={self.total_tokens}: "
                "shorten the warm-up (a few % of training is typical)"
            )
        if self.init_tokens > self.total_tokens:
            raise ValueError(
                f"init_tokens={self.init_tokens} must be <= total_tokens={self.total_tokens}: the init sample "
                f"is the start of the training stream; set init_tokens to at most {self.total_tokens}"
            )
        return self

    def lr_scale(self, variant: str) -> float:
        """``variant``'s multiple of lr (a modulated variant without an entry takes tide's)."""
        if variant in self.variant_lr_scale:
            return self.variant_lr_scale[variant]
        return self.variant_lr_scale.get("tide", 1.0) if variant in MODULATED_VARIANTS else 1.0

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_size)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_tokens / self.batch_size)
