"""The stages' sections (``[sampling]``, ``[capture]``, ``[sae]``, ``[features]``, ``[edit]``,
``[warehouse]``) and ``TideConfig``, the whole run config."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tide_core.config.base import TEXT_SITES, Section, Site, Variant
from tide_core.config.model import ModelConfig
from tide_core.edit_windows import StepWindow
from tide_core.sae.spec import SAEDesign, SAETrainConfig


class SamplingConfig(Section):
    """How images are sampled (and activations captured along the way)."""

    scheduler: Literal["ddim", "ddpm", "dpm", "euler"] = "ddim"
    """Sampler: deterministic DDIM (eta=0), ancestral DDPM, or DPM-Solver++ (multistep, deterministic: what
    PixArt samples with, about 20 steps) for DDPM-family models; euler (flow-matching Euler, with the
    model's own time shift) for SD3 and FLUX, which take no other."""
    num_steps: int = Field(50, ge=1, le=1000)
    """Denoising steps; step 0 is the noisiest."""
    guidance_scale: float = Field(2.0, ge=1.0, le=50.0)
    """Classifier-free guidance scale; 1 disables guidance (one forward pass per step)."""
    num_samples: int = Field(512, ge=1)
    """Images in the run; sample_id runs from 0 to num_samples-1."""
    shard_size: int = Field(64, ge=1)
    """Samples per shard: the unit of work, of Dagster partitions, of resume and of Zarr chunks."""
    batch_size: int = Field(64, ge=1)
    """Images per forward pass (results do not depend on it)."""
    seed: int = 0
    """Run seed: a sample's noise depends only on (seed, sample_id)."""
    classes: list[int] | None = Field(None, min_length=1)
    """Classes to sample (class-conditional families), assigned round-robin by sample_id; default all."""
    prompts: str | None = None
    """Prompt file of a text-conditional run (relative to the config file): one prompt a line (.txt), or a
    `prompt` column with optional `tags` (.csv, .parquet). Prompts are assigned round-robin by sample_id, so
    num_samples beyond the number of prompts gives several images (seeds) per prompt."""
    negative_prompt: str = ""
    """What classifier-free guidance contrasts each prompt with (text-conditional families)."""


class CaptureConfig(Section):
    """Which activations are stored."""

    layers: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)
    """Transformer block indices (0-based) to capture."""
    sites: list[Site] = Field(default_factory=lambda: ["resid"], min_length=1)
    """Where in the block: resid = block output; attn / mlp = (self-)attention / feed-forward output; cross =
    cross-attention output (text-conditional families); resid_text = the block output's text-stream tokens
    (SD3, FLUX: families with a text stream; every text position stored, padding masked out). Every captured
    site gets its own SAEs, feature tables and dashboard pages."""
    steps: list[int] | None = Field(None, min_length=1)
    """Sampling steps to capture (0 = noisiest); default all."""
    token_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of image tokens stored per image and step (TIDE trains on 1/16); 1 = all tokens. Text sites
    keep every position."""
    branch: Literal["cond", "uncond"] = "cond"
    """Under classifier-free guidance, which half of the batch is captured."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of activations."""
    compression: Literal["none", "lz4", "zstd"] = "none"
    """Chunk codec: real fp16 activations compress ~1.1-1.2x, so the default spends no CPU on it."""

    @model_validator(mode="after")
    def _unique(self) -> CaptureConfig:
        for name in ("layers", "sites"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"capture.{name}={values} has duplicates")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"capture.layers={self.layers}: layer indices start at 0")
        text = [s for s in self.sites if s in TEXT_SITES]
        if text and self.branch == "uncond":
            # the unconditional half's text stream is the negative prompt's, not the sample's prompt
            raise ValueError(f"capture.sites={self.sites} with capture.branch='uncond': the text sites {text} are "
                             "read from the conditional half (the sample's own prompt); set capture.branch = "
                             "'cond' or capture the text sites in a run of their own")
        return self


def heldout_shard_count(num_shards: int, heldout_fraction: float) -> int:
    """How many of the last shards are held out from SAE training (none of a run of one shard: it holds out
    the tail of its samples instead)."""
    return max(1, round(num_shards * heldout_fraction)) if num_shards >= 2 else 0


class SAEConfig(Section):
    """Sparse autoencoders trained on the captured activations (one per layer, site and variant)."""

    variants: list[Variant] = Field(default_factory=lambda: ["tide", "topk"], min_length=1)
    """tide = TopK with timestep modulation; topk = plain TopK; relu = ReLU + L1 baseline."""
    spec: SAEDesign = Field(default_factory=SAEDesign)
    """Architecture and loss of every SAE (tide_core.sae.spec.SAEDesign; the width of the activations, the
    variant and the model's time convention are filled in from the data)."""
    train: SAETrainConfig = Field(default_factory=SAETrainConfig)
    """How the SAEs of one layer and site are trained, all variants from one pass over the store
    (tide_core.sae.spec.SAETrainConfig)."""
    heldout_fraction: float = Field(0.125, gt=0.0, lt=1.0)
    """Fraction of shards (the last ones) never used in training: their seeds are the held-out split."""
    eval_tokens: int = Field(200_000, ge=1)
    """Tokens evaluated per split (train and held-out) for the per-step metrics."""
    splice_samples: int = Field(64, ge=0)
    """Held-out images resampled with the SAE spliced in (0 skips the spliced evaluation)."""
    checkpoint_every_tokens: int = Field(500_000, ge=1)
    """Training state is saved this often, so a killed `sae` partition resumes where it stopped."""
    stream: bool = False
    """Train from the sampler instead of the store: capture stores the images of every shard but the
    activations of the held-out shards only, and each `sae` partition samples the training shards again
    (same seeds, same bits) for its own layer and site. The store shrinks to the held-out fraction; sampling
    is repeated once per (layer, site) and epoch. The SAEs equal those trained from a full store with
    sae.shuffle_blocks = "shards". Needs at least 2 shards and no [sweep] (a sweep reads stored tokens)."""
    shuffle_blocks: Literal["samples", "shards"] | None = None
    """What training and the train-split evaluation read at a time before shuffling its tokens: `samples`, a
    shard's worth of samples drawn at random (blocks mix shards); `shards`, one whole shard, the shards in a
    random order each epoch (what sae.stream samples). Default: shards with sae.stream, else samples."""

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"sae.variants={v} has duplicates")
        return v

    @model_validator(mode="after")
    def _stream_reads_shards(self) -> SAEConfig:
        if self.stream and self.shuffle_blocks == "samples":
            raise ValueError('sae.stream = true samples whole shards again: set sae.shuffle_blocks = "shards" '
                             "(or leave it unset)")
        return self

    @property
    def block_order(self) -> Literal["samples", "shards"]:
        """The effective sae.shuffle_blocks."""
        return self.shuffle_blocks or ("shards" if self.stream else "samples")



# What a sweep's grid varies (or takes from [sae] when a list is empty), and what no sweep result depends on
# (a sweep reads stored tokens in sample blocks, whatever sae.stream and sae.shuffle_blocks say): left out of
# the sweep's identity and its code version, so adding a point keeps the points already run.
SWEEP_GRID_FIELDS = ("sae.checkpoint_every_tokens", "sae.splice_samples", "sae.stream", "sae.shuffle_blocks", "sae.train.lr",
                     "sae.train.variant_lr_scale", "sae.train.batch_size", "sae.train.total_tokens",
                     "sae.train.log_every", "sae.spec.k", "sae.spec.n_latents", "sweep.layers", "sweep.lrs",
                     "sweep.batch_sizes", "sweep.ks", "sweep.n_latents")


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep's grid."""

    layer: int
    lr: float
    batch_size: int
    k: int
    n_latents: int

    @property
    def key(self) -> str:
        """The point's Dagster partition key and `sae_sweep.point`."""
        return f"L{self.layer:02d}-lr{self.lr:g}-b{self.batch_size}-k{self.k}-n{self.n_latents}"


class SweepConfig(Section):
    """A grid of SAE training settings on one layer and site (the `sae_sweep` asset, one partition per
    point): every variant of sae.variants trained at each point with the rest of [sae] as configured, and
    scored on the held-out samples, so defaults are chosen from numbers."""

    layers: list[int] = Field(default_factory=lambda: [3], min_length=1)
    """Captured layers the sweep trains on (each point of the grid on each)."""
    site: Site = "resid"
    """The captured site the sweep trains on."""
    lrs: list[float] = Field(default_factory=lambda: [4e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], min_length=1)
    """Peak learning rates (sae.train.lr) to try."""
    batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes (tokens) to try; empty = sae.train.batch_size only."""
    ks: list[int] = Field(default_factory=list)
    """Active latents k to try; empty = sae.spec.k only."""
    n_latents: list[int] = Field(default_factory=list)
    """Dictionary widths to try; empty = sae.spec.n_latents only."""
    total_tokens: int = Field(1_000_000, ge=1)
    """Training tokens per point (warm-up is sae.train.warmup_tokens, capped at a tenth of this)."""

    @field_validator("layers", "lrs", "batch_sizes", "ks", "n_latents")
    @classmethod
    def _positive_unique(cls, v: list, info) -> list:
        if any(x < 0 or (x == 0 and info.field_name != "layers") for x in v) or len(set(v)) != len(v):
            raise ValueError(f"sweep.{info.field_name}={v}: values must be distinct and > 0 (layers >= 0)")
        return v

    def points(self, sae: SAEConfig) -> list[SweepPoint]:
        """The grid in a stable order (lr fastest); an empty list means the [sae] value."""
        grid = itertools.product(self.layers, self.n_latents or [sae.spec.n_latents], self.ks or [sae.spec.k],
                                 self.batch_sizes or [sae.train.batch_size], self.lrs)
        return [SweepPoint(layer=layer, lr=lr, batch_size=b, k=k, n_latents=n) for layer, n, k, b, lr in grid]


class FeaturesConfig(Section):
    """Feature statistics and top-activating images."""

    top_n: int = Field(16, ge=1, le=1000)
    """Top-activating images kept per feature and scope (overall, and at the feature's peak step)."""
    neighbors: int = Field(8, ge=1, le=100)
    """Nearest features by decoder cosine kept per feature (`feature_neighbors`)."""
    concepts_per_feature: int = Field(64, ge=1, le=10_000)
    """Concepts kept per feature in `feature_concepts` (highest lift first): a run with many prompts has
    thousands of words, most of them noise for any one feature."""
    probe_steps: int = Field(10, ge=0, le=1000)
    """Diffusion steps at which `factor_probes` probes each factor (evenly spaced from the first captured
    step to the last; 0: no probes). Only for families whose judge knows factors (the styled digits)."""
    probe_folds: int = Field(5, ge=2, le=20)
    """Cross-validation folds of each probe: every image is held out once."""
    scheduler: str | None = None
    """dask.distributed scheduler address (e.g. "tcp://10.0.0.5:8786") for the statistics pass; unset runs
    it on local threads. The workers must be able to read the activation store's URL."""
    workers: int = Field(0, ge=0, le=512)
    """Local threads for the statistics pass when no scheduler is set; 0 = one per CPU core."""

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s]+$", v):
            raise ValueError(f"features.scheduler={v!r} is not a dask scheduler address; use e.g. "
                             '"tcp://127.0.0.1:8786", or leave it unset to run on local threads')
        return v


class EditConfig(Section):
    """Feature-guided editing: what the `edits` asset renders, and the defaults of `tide edit`."""

    sae_id: str | None = None
    """The SAE to edit with (see `tide sql "SELECT sae_id FROM saes"`); overrides layer and variant."""
    layer: int | None = None
    """Block whose SAE is edited (one of capture.layers); default the middle captured layer."""
    variant: Variant | None = None
    """Which SAE of that layer (one of sae.variants); default the first variant."""
    op: Literal["add", "scale", "clamp", "zero", "style"] = "add"
    """add: raise the features at every token; clamp: set them at every token; scale: multiply them where
    they fire; zero: ablate them; style: move latents towards a reference image's (README, Editing)."""
    target_class: int | None = 0
    """Edit the n_features latents most selective for this class (read from the `features` table). In a
    text-conditional run the conditions are the prompts: this is a prompt's position in the prompt file."""
    concept: str | None = None
    """Edit the n_features latents most associated with this concept instead of target_class's: a class
    name, a prompt word or tag, or a factor value ("red"; "colour:red" where a name has several kinds), as
    `feature_concepts` lists them (highest lift first). Where the judge scores the concept (a class, a
    styled factor value), each `edits` row says whether it shows before and after the edit."""
    feature_ids: list[int] | None = None
    """Explicit latents to edit instead of target_class's (or concept's) most selective ones."""
    n_features: int = Field(8, ge=1, le=4096)
    """How many of target_class's most selective latents (or concept's) are edited."""
    min_fire_rate: float = Field(0.001, ge=0.0, le=1.0)
    """Latents firing on fewer tokens than this (of the concept's images' tokens, for a concept) are never
    picked by class or concept (their selectivity is noise)."""
    strengths: list[float] = Field(default_factory=lambda: [16.0, 64.0], min_length=1)
    """Strengths shown side by side. add / clamp: multiples of each feature's unit (see units); scale: a
    factor; style: the fraction of the way to the reference's latents (1 = copy); zero ignores it."""
    windows: list[str] = Field(default_factory=lambda: ["early", "all"], min_length=1)
    """Step windows edited: early / middle / late thirds of the schedule, all, or START-END (inclusive)."""
    spatial: bool = True
    """add / clamp: weight each feature per token by where it usually fires (the mean heatmap of its top
    images, peak 1) instead of changing every token alike (which turns digits into texture first)."""
    units: Literal["mean_act", "absolute"] = "mean_act"
    """Unit of add / clamp strengths: each feature's mean activation when it fires (`features` table), or
    raw SAE latent units."""
    n_samples: int = Field(8, ge=1, le=512)
    """Held-out samples edited: of other classes than target_class when boosting, of it when zeroing."""
    sample_ids: list[int] | None = None
    """Explicit sample ids of the run to edit instead of n_samples held-out ones."""
    reference_ids: list[int] | None = None
    """style only: reference sample ids (one for all, or one per edited sample); default the next held-out
    samples, one per edited sample."""
    pooled: bool = False
    """style only: match each feature's mean over the image's tokens to the reference's (the target keeps
    its layout) instead of copying the reference's latents token by token."""
    branch: Literal["both", "cond"] = "both"
    """CFG halves edited: both (the edit survives guidance as is) or the conditional one only."""
    unconditional: bool = True
    """Sample with the null class and no guidance, so the digit comes from the noise and the features, not
    from a label every block is conditioned on (the samples' seeds stay the run's). Class-conditional
    samples barely respond to feature edits (docs/FINDINGS.md)."""
    cfg_renorm: float | None = Field(None, gt=0.0)
    """If set, cap each image's guided noise prediction at this times the conditional one's norm (before
    and after images alike); unset = off."""

    @model_validator(mode="after")
    def _one_feature_choice(self) -> EditConfig:
        if self.concept is not None and self.feature_ids:
            raise ValueError(f"edit.concept={self.concept!r} and edit.feature_ids={self.feature_ids} both pick the "
                             "latents: keep one")
        return self


class WarehouseConfig(Section):
    """Where results are written."""

    root: str = "warehouse"
    """Local directory for the DuckDB file, the Dagster instance (.dagster), the judge, SAEs, plots and
    dashboards (relative paths are relative to the config file's folder)."""
    store_url: str | None = None
    """Where the Zarr activation store goes: a local path or any fsspec URL (s3://..., gs://..., memory://...;
    the filesystem's package installed, e.g. s3fs; endpoint and credentials as that package reads them).
    Default: <root>/activations.zarr."""

    @field_validator("root")
    @classmethod
    def _local_root(cls, v: str) -> str:
        if "://" in v and not v.startswith("file://"):
            raise ValueError(f"warehouse.root={v!r} must be a local folder: DuckDB and the Dagster instance need "
                             "local files with locks. Put the activation store (the bulk) at that URL with "
                             f"warehouse.store_url = \"{v.rstrip('/')}/activations.zarr\" and keep root local")
        return v


class TideConfig(Section):
    """The whole run config."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Which DiT to run."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """How images are sampled."""
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    """Which activations are stored."""
    sae: SAEConfig = Field(default_factory=SAEConfig)
    """Sparse autoencoders."""
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    """Feature statistics."""
    edit: EditConfig = Field(default_factory=EditConfig)
    """Feature-guided editing."""
    sweep: SweepConfig | None = None
    """An SAE training sweep (the `sae_sweep` asset exists only when this section is present)."""
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    """Output location."""

    @model_validator(mode="after")
    def _cross_section(self) -> TideConfig:
        if self.sampling.prompts is not None and self.sampling.classes is not None:
            raise ValueError("sampling.prompts and sampling.classes exclude each other: prompts condition a "
                             "text-conditional model, classes a class-conditional one")
        if self.capture.steps is not None:
            bad = [s for s in self.capture.steps if not 0 <= s < self.sampling.num_steps]
            if bad:
                raise ValueError(
                    f"capture.steps contains {bad}: sampling.num_steps={self.sampling.num_steps}, "
                    f"so steps must be in 0..{self.sampling.num_steps - 1}"
                )
        self._check_edit()
        self._check_stream()
        if self.sweep is not None:
            bad = [layer for layer in self.sweep.layers if layer not in self.capture.layers]
            if bad or self.sweep.site not in self.capture.sites:
                raise ValueError(f"sweep.layers={self.sweep.layers}, sweep.site={self.sweep.site!r}: not captured; "
                                 f"use capture.layers {self.capture.layers} and one of capture.sites "
                                 f"{self.capture.sites}")
            bad = [k for k in self.sweep.ks if k > min(self.sweep.n_latents or [self.sae.spec.n_latents])]
            if bad:
                raise ValueError(f"sweep.ks contains {bad}: k must be at most the narrowest width "
                                 f"{min(self.sweep.n_latents or [self.sae.spec.n_latents])}")
        return self

    @property
    def num_shards(self) -> int:
        return -(-self.sampling.num_samples // self.sampling.shard_size)

    def first_act_shard(self) -> int:
        """The first shard whose activations the store keeps: 0, or with sae.stream the first held-out one."""
        if not self.sae.stream:
            return 0
        return self.num_shards - heldout_shard_count(self.num_shards, self.sae.heldout_fraction)

    def _check_stream(self) -> None:
        if not self.sae.stream:
            return
        if self.num_shards < 2:
            raise ValueError(f"sae.stream = true stores only the held-out shards' activations, so it needs at "
                             f"least 2 shards: sampling.num_samples={self.sampling.num_samples} with "
                             f"shard_size={self.sampling.shard_size} is one; lower sampling.shard_size")
        if self.sweep is not None:
            raise ValueError("a [sweep] trains from the training shards' stored activations, and sae.stream = true "
                             "keeps them out of the store: remove the [sweep] section or set sae.stream = false")

    def _check_edit(self) -> None:
        e = self.edit
        if e.layer is not None and e.layer not in self.capture.layers:
            raise ValueError(f"edit.layer={e.layer} has no SAE: it must be one of capture.layers "
                             f"{self.capture.layers}")
        if e.variant is not None and e.variant not in self.sae.variants:
            raise ValueError(f"edit.variant={e.variant!r} is not trained: use one of sae.variants {self.sae.variants}")
        for w in e.windows:  # the parser editing uses, against this schedule; its errors name the fix
            try:
                StepWindow.parse(w, self.sampling.num_steps)
            except ValueError as err:
                raise ValueError(f"edit.windows: {err}") from None
        if e.target_class is None and not e.feature_ids:
            raise ValueError("edit needs target_class (pick its most selective features) or feature_ids")
        if e.pooled and e.op != "style":
            raise ValueError(f"edit.pooled applies to op 'style' only, not {e.op!r}")

    def section_hash(self, *paths: str, exclude: tuple[str, ...] = ()) -> str:
        """A short hash of some dotted sections or fields (e.g. "sampling", "model.digits"), without the
        dotted fields in ``exclude``: what a result computed from exactly those settings depends on."""
        data = self.model_dump(mode="json")
        for path in exclude:
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                node = node[part]
            node.pop(leaf)
        picked = {}
        for path in paths:
            value = data
            for part in path.split("."):
                value = value[part]
            picked[path] = value
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]
