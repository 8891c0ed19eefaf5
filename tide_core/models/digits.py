"""The embedded default: a small class-conditional DiT trained here on scikit-learn's digits.

It is a diffusers ``DiTTransformer2DModel`` in pixel space (16 x 16, one channel), so everything but its
preparation is the DiT family's: ``prepare`` trains it (``tide_core.train_dit``) unless the checkpoint at
``model.digits.checkpoint_dir`` records the same config fingerprint, and the family brings a judge, a small
CNN digit classifier trained on a stratified split of the same digits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from tide_core.config import ModelConfig, TideConfig
from tide_core.digits import CLASS_NAMES, load_digits, split
from tide_core.judge import judge_images, load_judge, save_judge, train_judge
from tide_core.models.base import Judge, Judgement, Log, ModelInfo, ModelStatus, resolve_device
from tide_core.models.dit import ClassDiT, read_meta, refuse_prompts, reuse_or_train
from tide_core.models.registry import ModelError
from tide_core.prompts import PromptSet
from tide_core.train_dit import train_and_save

JUDGE_RECORD = "judge.json"
JUDGE_WEIGHTS = "judge.safetensors"


class DigitsJudge(Judge):
    """The digit classifier: predicts the class a generated digit shows; its penultimate 128-d features
    are the space of the family's Frechet distances (an FID analogue for 16 x 16 digits)."""

    class_names = tuple(CLASS_NAMES)

    def __init__(self, module):
        self.module = module

    @classmethod
    def settings(cls, cfg: TideConfig) -> dict:
        j = cfg.model.judge
        return {"epochs": j.epochs, "test_fraction": j.test_fraction, "seed": j.seed,
                "image_size": cfg.model.digits.image_size}

    @classmethod
    def train(cls, cfg: TideConfig, out_dir: Path, log: Log) -> dict:
        j = cfg.model.judge
        train, test = split(load_digits(cfg.model.digits.image_size), j.test_fraction, j.seed)
        log(f"training the judge on {len(train)} digits, testing on {len(test)}")
        result = train_judge(train, test, epochs=j.epochs, seed=j.seed)
        save_judge(result, out_dir)
        record = {**json.loads((out_dir / JUDGE_RECORD).read_text()), "settings": cls.settings(cfg)}
        (out_dir / JUDGE_RECORD).write_text(json.dumps(record, indent=2))
        log(f"judge test accuracy {result.test_accuracy:.4f}")
        return record

    @classmethod
    def load(cls, out_dir: Path) -> DigitsJudge:
        return cls(load_judge(out_dir))

    @classmethod
    def reference_images(cls, cfg: TideConfig) -> tuple[np.ndarray, np.ndarray]:
        j = cfg.model.judge
        train, test = split(load_digits(cfg.model.digits.image_size), j.test_fraction, j.seed)
        return train.images, test.images

    def judge(self, images: np.ndarray) -> Judgement:
        v = judge_images(self.module, images)
        return Judgement(pred=v.pred, confidence=v.confidence, features=v.features)


class DigitsDiT(ClassDiT):
    """model.source = "digits": the DiT family's model, trained locally from ``[model.digits]``."""

    family: ClassVar[str] = "digits"
    judge_class = DigitsJudge

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        d = cfg.digits
        return ModelInfo(family=cls.family, source=d.checkpoint_dir, num_layers=d.num_layers,
                         hidden_size=d.hidden_size, sites=cls.sites)

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        """The recorded weights hash of the checkpoint (the config fingerprint until it is trained)."""
        meta = read_meta(cfg.digits.checkpoint_dir)
        if meta.get("digits_fingerprint") != cfg.digits.fingerprint():
            return f"untrained-{cfg.digits.fingerprint()}"
        return meta.get("weights_sha256", cfg.digits.fingerprint())[:16]

    @classmethod
    def prepare(cls, cfg: ModelConfig, log: Log, force: bool = False) -> ModelStatus:
        """Reuse the checkpoint when it records this config's fingerprint (the repo ships one for the
        default config), otherwise train it (~25 min on 2 cores for the default)."""
        d = cfg.digits
        ckpt = Path(d.checkpoint_dir)
        trained = reuse_or_train("default DiT", ckpt, "digits_fingerprint", d.fingerprint(), d.train_steps,
                                 f"{d.train_steps} steps, batch {d.batch_size}, seed {d.seed}",
                                 lambda progress: train_and_save(d, ckpt, progress=progress, log=log), log, force)
        return ModelStatus(str(ckpt), trained_now=trained, fingerprint=cls.fingerprint_of(cfg), meta=read_meta(ckpt))

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> DigitsDiT:
        refuse_prompts(cls, prompts)
        ckpt = Path(cfg.digits.checkpoint_dir)
        if read_meta(ckpt).get("digits_fingerprint") != cfg.digits.fingerprint():
            raise ModelError(f"no default DiT trained with this [model.digits] config at {ckpt}: materialize "
                             "`dit_model` (or run `tide train-dit`) first")
        return cls.load_dir(str(ckpt), device=resolve_device(cfg.device), dtype=getattr(torch, cfg.dtype),
                            fingerprint=cls.fingerprint_of(cfg))

