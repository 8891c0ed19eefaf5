"""``model.source = "styled-digits"``: a PixArt trained here on styled renders of real digits, with its factor judge.

The model is a pixel-space ``PixArtTransformer2DModel`` and a small T5 encoder trained together
(``tide_core.train_styled``) from ``[model.styled_digits]``; ``prepare`` trains it unless the directory records
the section's fingerprint, and everything after that is the PixArt family's code on that directory, as for a
downloaded PixArt-α. Its judge scores every factor of a generated
image (class, colour, thickness, background), so prompt following, concepts and edits are measured against
what each prompt asked for.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import numpy as np

from tide_core.config import ModelConfig, StyledDigitsConfig, TideConfig
from tide_core.digits import DigitsData, load_digits, split_indices
from tide_core.factor_judge import (
    FactorJudge,
    fixed_renders,
    judge_factors,
    load_factor_judge,
    save_factor_judge,
    train_factor_judge,
)
from tide_core.factors import UNASKED, ConditionFactors
from tide_core.models.base import Judge, Judgement, Log, ModelInfo, ModelStatus
from tide_core.models.built import BuiltHere
from tide_core.models.dit import read_meta, reuse_or_train
from tide_core.models.pixart import PixArt
from tide_core.models.registry import ModelError
from tide_core.styled_digits import DIGIT_WORDS, FACTOR_NAMES, FACTORS, parse_caption, stroke_masks

REFERENCE_SEED = 7  # styles of the real renders the Frechet distances compare against


def _split(s: StyledDigitsConfig) -> tuple[DigitsData, np.ndarray, np.ndarray, np.ndarray]:
    """The native digits, their stroke masks, and the DiT's training rows and the judge's held-out rows (the
    split the DiT was trained with, so the judge is tested on digits the DiT never saw)."""
    digits = load_digits(8)
    train_rows, test_rows = split_indices(digits.labels, s.test_fraction, s.seed)
    return digits, _masks(s.image_size), train_rows, test_rows


@functools.lru_cache(maxsize=2)
def _masks(size: int) -> np.ndarray:
    """Every digit's strokes at ``size`` (seconds to draw; the judge's training and the reference renders of
    one process share them). float32 [1797, 3, size, size]."""
    return stroke_masks(load_digits(8), size)


class FactorJudgeAdapter(Judge):
    """The styled digits' judge: one CNN, a head per factor; the class head's verdict is ``pred``."""

    class_names = DIGIT_WORDS

    def __init__(self, module: FactorJudge):
        self.module = module

    @classmethod
    def settings(cls, cfg: TideConfig) -> dict:
        j, s = cfg.model.judge, cfg.model.styled_digits
        return {"epochs": j.epochs, "seed": j.seed, "image_size": s.image_size, "test_fraction": s.test_fraction,
                "split_seed": s.seed, "factors": {f.name: list(f.values) for f in FACTORS}}

    @classmethod
    def train(cls, cfg: TideConfig, out_dir: Path, log: Log) -> dict:
        j = cfg.model.judge
        digits, masks, train_rows, test_rows = _split(cfg.model.styled_digits)
        log(f"training the factor judge on renders of {len(train_rows)} digits ({', '.join(FACTOR_NAMES)}), "
            f"testing on {len(test_rows)} held-out digits")
        result = train_factor_judge(masks, DigitsData(digits.images[train_rows], digits.labels[train_rows]),
                                    train_rows, DigitsData(digits.images[test_rows], digits.labels[test_rows]),
                                    test_rows, epochs=j.epochs, seed=j.seed)
        record = save_factor_judge(result, out_dir, cls.settings(cfg))
        log("factor judge test accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in result.test_accuracy.items()))
        return record

    @classmethod
    def load(cls, out_dir: Path) -> FactorJudgeAdapter:
        return cls(load_factor_judge(out_dir))

    @classmethod
    def reference_images(cls, cfg: TideConfig) -> tuple[np.ndarray, np.ndarray]:
        """One render of every training digit and of every held-out digit, in seeded random styles."""
        digits, masks, train_rows, test_rows = _split(cfg.model.styled_digits)
        return (fixed_renders(masks, train_rows, digits.labels[train_rows], 1, REFERENCE_SEED).images,
                fixed_renders(masks, test_rows, digits.labels[test_rows], 1, REFERENCE_SEED + 1).images)

    def judge(self, images: np.ndarray) -> Judgement:
        v = judge_factors(self.module, images)
        return Judgement(pred=v.pred[:, 0], confidence=v.confidence[:, 0], features=v.features, factors=v.pred)

    @classmethod
    def condition_factors(cls, condition_names: list[str]) -> ConditionFactors:
        """What each prompt names (parsed from its words); words that are no factor value are kept as unknown."""
        parsed = [parse_caption(text) for text in condition_names]
        codes = np.full((len(parsed), len(FACTORS)), UNASKED, np.int64)  # [C, F]
        for c, p in enumerate(parsed):
            for j, f in enumerate(FACTORS):
                value = p.values[f.name]
                if value is not None:
                    codes[c, j] = f.values.index(value)
        return ConditionFactors(FACTOR_NAMES, tuple(f.values for f in FACTORS), codes,
                                tuple(p.unknown for p in parsed))


class StyledDigits(BuiltHere, PixArt):
    """The styled-digits PixArt: trained by ``prepare``; every other method is PixArt's, on its directory."""

    family: ClassVar[str] = "styled-digits"
    section: ClassVar[str] = "styled_digits"
    label: ClassVar[str] = "styled-digits PixArt"
    meta_key: ClassVar[str] = "styled_digits_fingerprint"
    judge_class = FactorJudgeAdapter

    @classmethod
    def built_fingerprint(cls, settings: StyledDigitsConfig) -> str:
        return settings.fingerprint()  # what train_styled records

    @classmethod
    def _built(cls, cfg: ModelConfig) -> ModelConfig:
        s = cfg.styled_digits
        return cfg.model_copy(update={"source": s.checkpoint_dir, "height": cfg.height or s.image_size,
                                      "width": cfg.width or s.image_size})

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        s = cfg.styled_digits
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and value != s.image_size:
                raise ModelError(f"model.{name}={value}: the styled-digits PixArt is trained at {s.image_size} px "
                                 f"only; leave model.{name} out or set model.styled_digits.image_size")
        return ModelInfo(family=cls.family, source=s.checkpoint_dir, num_layers=s.num_layers,
                         hidden_size=s.hidden_size, sites=cls.sites)

    @classmethod
    def prepare(cls, cfg: ModelConfig, log: Log, force: bool = False) -> ModelStatus:
        """Reuse the directory when it records this config's fingerprint (the repo ships the default
        section's), otherwise train it (22 min on 2 cores for the default)."""
        from tide_core.train_styled import train_and_save

        s = cfg.styled_digits
        out = Path(s.checkpoint_dir)
        trained = reuse_or_train("styled-digits PixArt", out, cls.meta_key, s.fingerprint(), s.train_steps,
                                 f"{s.train_steps} steps, batch {s.batch_size}, seed {s.seed}",
                                 lambda progress: train_and_save(s, out, progress=progress, log=log), log, force)
        return ModelStatus(str(out), trained_now=trained, fingerprint=cls.fingerprint_of(cfg), meta=read_meta(out))

