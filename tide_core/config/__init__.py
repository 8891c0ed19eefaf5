"""The run config: one validated TOML file (default ``tide.toml``) with a section per stage.

Every field has a default and a docstring (shown by ``tide config --explain``). Loading is strict and pure:
unknown keys, wrong types and out-of-range values fail here, before any training or sampling, with one
message naming the field and what it accepts. Nothing here touches the disk except reading the file and
resolving its relative paths (once, against the file's folder): what the environment must provide (the
model's files, its depth, a device, the prompt file's contents) is checked by the preflight step, not by
validators.

Modules: ``base`` (the section base class and shared names), ``model`` (``[model]`` and its families'
sections), ``run`` (the stages' sections and ``TideConfig``), ``load`` (reading, path resolution,
``explain``), ``numbers`` (true/false refused where a number is declared). The SAE settings are the SAE library's own models (``tide_core.sae.spec``), embedded as they
are.
"""

from tide_core.config.base import (
    BUILT_HERE,
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DIGITS_SOURCE,
    SITES,
    STYLED_DIGITS_SOURCE,
    TEXT_SITES,
    TINY_FLUX_SOURCE,
    TINY_PIXART_SOURCE,
    TINY_SD3_SOURCE,
    ConfigError,
    Section,
    Site,
    Variant,
)
from tide_core.config.load import (
    explain,
    is_local_source,
    load_config,
    parse_config,
    resolve_config_path,
    resolve_paths,
)
from tide_core.config.model import (
    DigitsDiTConfig,
    JudgeConfig,
    ModelConfig,
    StyledDigitsConfig,
    TinyFluxConfig,
    TinyPixArtConfig,
    TinySD3Config,
)
from tide_core.config.run import (
    SWEEP_GRID_FIELDS,
    CaptureConfig,
    EditConfig,
    FeaturesConfig,
    SAEConfig,
    SamplingConfig,
    SweepConfig,
    SweepPoint,
    TideConfig,
    WarehouseConfig,
    heldout_shard_count,
)

__all__ = [
    "BUILT_HERE", "CONFIG_ENV", "DEFAULT_CONFIG_NAME", "DIGITS_SOURCE", "SITES", "TEXT_SITES", "CaptureConfig",
    "ConfigError",
    "DigitsDiTConfig", "EditConfig", "FeaturesConfig", "JudgeConfig", "ModelConfig", "SAEConfig",
    "SamplingConfig", "Section", "Site", "SWEEP_GRID_FIELDS", "SweepConfig", "SweepPoint", "TINY_PIXART_SOURCE",
    "STYLED_DIGITS_SOURCE", "StyledDigitsConfig", "TINY_FLUX_SOURCE", "TINY_SD3_SOURCE", "TideConfig",
    "TinyFluxConfig", "TinyPixArtConfig", "TinySD3Config",
    "Variant",
    "WarehouseConfig", "explain", "heldout_shard_count",
    "is_local_source", "load_config", "parse_config", "resolve_config_path", "resolve_paths",
]
