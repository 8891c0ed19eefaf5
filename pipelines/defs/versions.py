"""Code versions: what each asset's result depends on besides its inputs, declared once.

An asset's code version is its stage revision (bumped by hand when the stage's code changes what it
produces) plus a hash of the config fields it reads. Dagster compares it with the version recorded at the
last materialization: a change makes the asset stale in the UI, and `tide run` and the automation sensor
materialize it again. Settings that cannot change a result (batch sizes of forward passes, devices, worker
counts) are left out, so changing them redoes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.project import content_key
from tide_core.config import STYLED_DIGITS_SOURCE, SWEEP_GRID_FIELDS, DigitsDiTConfig, TideConfig
from tide_core.sae.spec import BATCH_CONFIG_PATHS, batch_settings

BUILT_MODELS = ("model.digits", "model.tiny_pixart", "model.tiny_sd3", "model.tiny_flux")
CAPTURE_FIELDS = ("model.source", "model.dtype", *BUILT_MODELS, "model.height", "model.width",
                  "model.max_prompt_tokens", "model.use_t5", "sampling.scheduler", "sampling.num_steps",
                  "sampling.guidance_scale", "sampling.num_samples", "sampling.shard_size", "sampling.seed",
                  "sampling.classes", "sampling.prompts", "sampling.negative_prompt", "capture")


@dataclass(frozen=True)
class Version:
    """One asset's code version: its stage revision and the config fields it reads."""

    revision: int
    config: tuple[str, ...] = ()
    # where a result is kept is not what it is (nor, for a DiT trained here, the rest of its NOT_RECIPE)
    exclude: tuple[str, ...] = (*(f"{m}.checkpoint_dir" for m in BUILT_MODELS if m != "model.digits"),
                                *(f"model.digits.{f}" for f in sorted(DigitsDiTConfig.NOT_RECIPE)))
    # a setting hashed only when it is away from its default, so a config that leaves it alone keeps the
    # versions it had before the setting existed ("" at the default)
    extra: Callable[[TideConfig], str] | None = None


def _styled(cfg: TideConfig) -> str:
    """The styled-digits section, only when it is the model: it was added after warehouses of the other
    families existed, whose versions it must not change."""
    if cfg.model.source != STYLED_DIGITS_SOURCE:
        return ""
    return f"styled-{cfg.model.styled_digits.fingerprint()[:8]}"


def _probes(cfg: TideConfig) -> str:
    """The factor probes' settings, only for the family whose judge knows factors (nobody else has probes)."""
    if cfg.model.source != STYLED_DIGITS_SOURCE:
        return ""
    return f"probes-{content_key(cfg.features.model_dump(include={'probe_steps', 'probe_folds'}))[:8]}"


def _acts_kept(cfg: TideConfig) -> str:
    """A streaming run's store keeps the activations of its held-out shards only."""
    return f"acts-from{cfg.first_act_shard()}" if cfg.first_act_shard() else ""


def _capture(cfg: TideConfig) -> str:
    return "-".join(p for p in (_styled(cfg), _acts_kept(cfg)) if p)


def _concept(cfg: TideConfig) -> str:
    """edit.concept, only when set (it was added after warehouses with edits existed)."""
    return "" if cfg.edit.concept is None else f"concept-{content_key(cfg.edit.concept)[:8]}"


def _block_order(cfg: TideConfig) -> str:
    """The SAEs depend on the token order, not on whether the tokens were read or sampled (sae.stream)."""
    return "" if cfg.sae.block_order == "samples" else f"blocks-{cfg.sae.block_order}"


def _batch(cfg: TideConfig) -> str:
    """BatchTopK's and Matryoshka's settings, away from their defaults."""
    settings = batch_settings(cfg.sae.spec)
    return f"batch-{content_key(settings)[:8]}" if settings else ""


def _sae(cfg: TideConfig) -> str:
    return "-".join(p for p in (_block_order(cfg), _batch(cfg)) if p)


VERSIONS: dict[str, Version] = {
    "dit_model": Version(1, ("model.source", *BUILT_MODELS), extra=_styled),
    "prompts": Version(1, ("sampling.prompts", "model.max_prompt_tokens")),
    "judge": Version(1, ("model.judge.epochs", "model.judge.test_fraction", "model.judge.seed",
                         "model.digits.image_size"), extra=_styled),
    # 2: accuracy per factor and value, a grid per factor
    "sample_quality": Version(2, ("sampling.scheduler", "sampling.num_steps", "sampling.guidance_scale",
                                  "sampling.seed", "model.judge.quality_samples")),
    "activation_store": Version(1, CAPTURE_FIELDS, extra=_capture),
    "activations": Version(1, CAPTURE_FIELDS, extra=_capture),
    "samples": Version(2),  # 2: the steps table
    # checkpoints: resume granularity only; stream and shuffle_blocks: through _block_order
    "sae": Version(1, ("sae",), exclude=("sae.checkpoint_every_tokens", "sae.stream", "sae.shuffle_blocks",
                                         *BATCH_CONFIG_PATHS), extra=_sae),
    "sae_metrics": Version(1),
    # the grid's own settings are partitions, not versions: adding a point or adopting a point's values as
    # the [sae] defaults leaves the points already run fresh
    "sae_sweep": Version(1, ("sae", "sweep"), exclude=(*SWEEP_GRID_FIELDS, *BATCH_CONFIG_PATHS),
                         extra=_batch),
    "feature_stats": Version(2, ("features.top_n", "features.neighbors", "features.concepts_per_feature"),
                             extra=_probes),
    "top_images": Version(1, ("features.top_n",)),
    "edits": Version(1, ("edit",), exclude=("edit.concept",), extra=_concept),
    "feature_dashboard": Version(1),
}


def code_version(asset: str, cfg: TideConfig, inputs: str = "") -> str:
    """``inputs``: what else the result depends on that lives outside the config (the prompt file's hash)."""
    v = VERSIONS[asset]
    version = f"r{v.revision}" + (f"-{cfg.section_hash(*v.config, exclude=v.exclude)}" if v.config else "")
    if v.extra is not None and (extra := v.extra(cfg)):
        version += f"-{extra}"
    return version + (f"-{inputs}" if inputs else "")
