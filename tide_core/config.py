"""The run config: one validated TOML file (default ``tide.toml``) with a section per stage.

Every field has a default and a docstring (shown by ``tide config --explain``). Loading is strict and pure:
unknown keys, wrong types and out-of-range values fail here, before any training or sampling, with one
message naming the field and what it accepts. Nothing here touches the disk except reading the file and
resolving its relative paths (once, against the file's folder): what the environment must provide (the
model's files, its depth, a device) is checked by the preflight step, not by validators.

The SAE settings are the SAE library's own models (``tide_core.sae.spec``), embedded as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tide_core.edit_windows import StepWindow
from tide_core.sae.spec import VARIANTS, SAEDesign, SAETrainConfig

CONFIG_ENV = "TIDE_CONFIG"
DEFAULT_CONFIG_NAME = "tide.toml"
DIGITS_SOURCE = "digits"
SITES = ("resid", "attn", "mlp")
Site = Literal[SITES]  # a tuple subscript spells every member, so the names live in one place
Variant = Literal[VARIANTS]


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DigitsDiTConfig(_Section):
    """Architecture and training recipe of the embedded default DiT (``model.source = "digits"``)."""

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

    @model_validator(mode="after")
    def _patch_divides(self) -> DigitsDiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.digits.patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        return self

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (not where they are stored)."""
        payload = self.model_dump(exclude={"checkpoint_dir"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class JudgeConfig(_Section):
    """The classifier that judges generated images (for model families that have one)."""

    epochs: int = Field(40, ge=1)
    """Training epochs over the judge's training split."""
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """Held-out fraction of the judge's data used to report its accuracy."""
    seed: int = 0
    """Seed of the split, init and batch order."""
    quality_samples: int = Field(500, ge=10)
    """Generated images used to measure class accuracy and Frechet distance of the DiT."""


class ModelConfig(_Section):
    """Which DiT to run."""

    source: str = DIGITS_SOURCE
    """"digits" (the embedded default, trained locally), a hub id (e.g. "facebook/DiT-XL-2-256") or a
    local diffusers directory with transformer/ (and vae/, scheduler/), relative to the config file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: auto picks CUDA when present."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute dtype of the DiT (half precision only makes sense on CUDA)."""
    digits: DigitsDiTConfig = Field(default_factory=DigitsDiTConfig)
    """The embedded default DiT."""
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """The judge of generated images."""

    @field_validator("source")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('model.source is empty: use "digits", a hub id or a local diffusers directory')
        return v


class SamplingConfig(_Section):
    """How images are sampled (and activations captured along the way)."""

    scheduler: Literal["ddim", "ddpm"] = "ddim"
    """Sampler: deterministic DDIM (eta=0) or ancestral DDPM."""
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
    classes: list[int] | None = None
    """Classes to sample, assigned round-robin by sample_id; default all classes of the model."""


class CaptureConfig(_Section):
    """Which activations are stored."""

    layers: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)
    """Transformer block indices (0-based) to capture."""
    sites: list[Site] = Field(default_factory=lambda: ["resid"], min_length=1)
    """Where in the block: resid = block output; attn / mlp = attention / feed-forward output. Every captured
    site gets its own SAEs, feature tables and dashboard pages."""
    steps: list[int] | None = None
    """Sampling steps to capture (0 = noisiest); default all."""
    token_fraction: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of image tokens stored per image and step (TIDE trains on 1/16); 1 = all tokens."""
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
        return self


class SAEConfig(_Section):
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

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"sae.variants={v} has duplicates")
        return v


class FeaturesConfig(_Section):
    """Feature statistics and top-activating images."""

    top_n: int = Field(16, ge=1, le=1000)
    """Top-activating images kept per feature and scope (overall, and at the feature's peak step)."""
    neighbors: int = Field(8, ge=1, le=100)
    """Nearest features by decoder cosine kept per feature (`feature_neighbors`)."""
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


class EditConfig(_Section):
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
    """Edit the n_features latents most selective for this class (read from the `features` table)."""
    feature_ids: list[int] | None = None
    """Explicit latents to edit instead of target_class's most selective ones."""
    n_features: int = Field(8, ge=1, le=4096)
    """How many of target_class's most selective latents are edited."""
    min_fire_rate: float = Field(0.001, ge=0.0, le=1.0)
    """Latents firing on fewer tokens than this are never picked by class (their selectivity is noise)."""
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


class WarehouseConfig(_Section):
    """Where results are written."""

    root: str = "warehouse"
    """Local directory for the DuckDB file, the Dagster instance (.dagster), the judge, SAEs, plots and
    dashboards (relative paths are relative to the config file's folder)."""
    store_url: str | None = None
    """Where the Zarr activation store goes: a local path or any fsspec URL (s3://..., memory://...).
    Default: <root>/activations.zarr."""


class TideConfig(_Section):
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
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    """Output location."""

    @model_validator(mode="after")
    def _cross_section(self) -> TideConfig:
        if self.capture.steps is not None:
            bad = [s for s in self.capture.steps if not 0 <= s < self.sampling.num_steps]
            if bad:
                raise ValueError(
                    f"capture.steps contains {bad}: sampling.num_steps={self.sampling.num_steps}, "
                    f"so steps must be in 0..{self.sampling.num_steps - 1}"
                )
        self._check_edit()
        return self

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


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `tide config --explain` lists every field)"
        got = "" if e["type"] in ("extra_forbidden", "value_error") else f" (got {e.get('input')!r})"
        lines.append(f"  {where}: {msg}{got}")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def parse_config(data: dict, origin: str = "<dict>") -> TideConfig:
    """Validate a config mapping; raise ConfigError naming each bad field. Paths stay as given."""
    try:
        return TideConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def resolve_config_path(path: str | os.PathLike | None = None) -> Path | None:
    """The config file in force: the argument, else $TIDE_CONFIG, else ./tide.toml if present."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.exists() else None


def is_local_source(source: str, base_dir: Path) -> bool:
    """Whether model.source names a local directory (else "digits" or a hub id): it exists relative to the
    config's folder, or it is written as a path (absolute, ./, ../ or ~)."""
    if source == DIGITS_SOURCE:
        return False
    return (base_dir / source).expanduser().exists() or source.startswith(("/", "./", "../", "~"))


def resolve_paths(cfg: TideConfig, base_dir: Path) -> TideConfig:
    """The config with every relative path made absolute against ``base_dir`` (the config file's folder):
    warehouse.root, a local warehouse.store_url, model.digits.checkpoint_dir and a local model.source."""

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base_dir / q).resolve())

    data = cfg.model_dump()
    data["warehouse"]["root"] = absolute(cfg.warehouse.root)
    url = cfg.warehouse.store_url
    if url is not None and "://" not in url:
        data["warehouse"]["store_url"] = absolute(url)
    data["model"]["digits"]["checkpoint_dir"] = absolute(cfg.model.digits.checkpoint_dir)
    if is_local_source(cfg.model.source, base_dir):
        data["model"]["source"] = absolute(cfg.model.source)
    return TideConfig.model_validate(data)


def load_config(path: str | os.PathLike | None = None) -> TideConfig:
    """Load and validate the run config (see resolve_config_path for which file), its relative paths
    resolved against the file's folder (the working directory when no file is in force)."""
    resolved = resolve_config_path(path)
    if resolved is None:
        return resolve_paths(TideConfig(), Path.cwd())
    if not resolved.is_file():
        raise ConfigError(f"config file {resolved} does not exist (set --config or ${CONFIG_ENV})")
    try:
        text = resolved.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {resolved} is not UTF-8 text: point --config at a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {resolved} is not valid TOML: {err}") from None
    return resolve_paths(parse_config(data, origin=str(resolved)), resolved.resolve().parent)


def explain(model: type[BaseModel] = TideConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default, docstring (for `tide config --explain`)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"[{dotted}]  {field.description or ''}")
            out.extend(explain(ann, dotted + "."))
        else:
            default = field.get_default(call_default_factory=True)
            out.append(f"  {dotted} = {default!r}  # {field.description or ''}")
    return out
