"""Models built here from a section of ``[model]`` (tiny-pixart, tiny-sd3, tiny-flux): what each shares.

A ``BuiltHere`` family names its section, how the directory is built and the family it then is (a second base
class: ``class TinySD3(BuiltHere, SD3)``). ``prepare`` builds the directory unless it records the section's
fingerprint (seconds; deterministic); ``load`` refuses a directory built from another config; every other
method is the family's own, on the built directory, so a built model goes through the code a hub download
goes through.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

from tide_core.config import ModelConfig
from tide_core.models.base import Log, ModelInfo, ModelStatus
from tide_core.models.dit import directory_fingerprint, read_meta
from tide_core.models.registry import ModelError
from tide_core.prompts import PromptSet
from tide_core.tiny_text import VOCABULARY

TINY_VAE_FACTOR = 2  # the tiny VAEs have two blocks: one halving


class BuiltHere:
    """A family whose weights are built here from ``[model.<section>]``."""

    section: ClassVar[str]  # the [model] section: tiny_pixart, tiny_sd3, tiny_flux
    label: ClassVar[str]  # how messages name the model
    meta_key: ClassVar[str] = "tiny_fingerprint"  # where the built directory records the fingerprint

    @classmethod
    def settings(cls, cfg: ModelConfig):
        return getattr(cfg, cls.section)

    @classmethod
    def fingerprint_payload(cls, settings) -> dict:
        """What the built weights depend on (not where they are written)."""
        return {**settings.model_dump(exclude={"checkpoint_dir"}), "vocabulary": VOCABULARY}

    @classmethod
    def built_fingerprint(cls, settings) -> str:
        payload = json.dumps(cls.fingerprint_payload(settings), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def build(cls, settings, out: Path) -> Path:
        """Write the directory (atomically), recording ``built_fingerprint`` under ``meta_key``."""
        raise NotImplementedError

    @classmethod
    def depth_of(cls, settings) -> int:
        return settings.num_layers

    @classmethod
    def _built(cls, cfg: ModelConfig) -> ModelConfig:
        """The config as the family sees it: model.source = the built directory, and the native image size
        (FLUX's config does not record one)."""
        t = cls.settings(cfg)
        side = t.sample_size * TINY_VAE_FACTOR
        return cfg.model_copy(update={"source": t.checkpoint_dir, "height": cfg.height or side,
                                      "width": cfg.width or side})

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        t = cls.settings(cfg)
        multiple = TINY_VAE_FACTOR * 2
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and value % multiple:
                raise ModelError(f"model.{name}={value} is not a multiple of {multiple} (the tiny VAE's factor "
                                 f"times the patch size); the native size is {t.sample_size * TINY_VAE_FACTOR}")
        return ModelInfo(family=cls.family, source=t.checkpoint_dir, num_layers=cls.depth_of(t),
                         hidden_size=t.num_heads * t.head_dim, sites=cls.sites)

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        return directory_fingerprint(cls.settings(cfg).checkpoint_dir)

    @classmethod
    def prepare(cls, cfg: ModelConfig, log: Log, force: bool = False) -> ModelStatus:
        t = cls.settings(cfg)
        out = Path(t.checkpoint_dir)
        if force or read_meta(out).get(cls.meta_key) != cls.built_fingerprint(t):
            log(f"building the tiny random {cls.label} in {out} (seed {t.seed})")
            cls.build(t, out)
        return ModelStatus(str(out), trained_now=False, fingerprint=cls.fingerprint_of(cfg), meta=read_meta(out))

    @classmethod
    def count_tokens(cls, cfg: ModelConfig, texts: list[str]):
        return super().count_tokens(cls._built(cfg), texts)

    @classmethod
    def text_sequences(cls, cfg: ModelConfig, texts: list[str]):
        return super().text_sequences(cls._built(cfg), texts)

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = ""):
        t = cls.settings(cfg)
        if read_meta(t.checkpoint_dir).get(cls.meta_key) != cls.built_fingerprint(t):
            raise ModelError(f"no tiny {cls.label} built with this [model.{cls.section}] config at "
                             f"{t.checkpoint_dir}: materialize `dit_model` first")
        return super().load(cls._built(cfg), prompts, negative_prompt)
