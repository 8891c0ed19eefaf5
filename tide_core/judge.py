"""The judge: a small CNN digit classifier that scores generated images.

Trained on a held-out split of the same digits; used everywhere the project says how good images are:
class-conditional accuracy of samples and a Frechet distance between generated and real digits in the
judge's penultimate feature space (an FID analogue for 16x16 digits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tide_core.digits import DigitsData
from tide_core.quality import frechet_distance


class DigitJudge(nn.Module):
    """conv 32 -> conv 64 -> pool -> conv 64 -> global pool -> 128-d features -> 10 logits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(256, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [B, num_classes]


@dataclass(frozen=True)
class JudgeTrainResult:
    judge: DigitJudge
    test_accuracy: float
    train_accuracy: float
    epochs: int


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on a batch of images."""

    pred: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float32 [N], softmax probability of pred
    features: np.ndarray  # float32 [N, F]


@dataclass(frozen=True)
class SampleQuality:
    """How good generated digits are, by the judge."""

    accuracy: float  # fraction of samples the judge assigns to the class they were sampled for
    per_class_accuracy: list[float]
    frechet_distance: float  # generated vs real digits, judge feature space
    frechet_distance_real_split: float  # real test vs real train: the floor for this sample size
    n: int


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel translation, so the judge does not key on exact placement."""
    dx, dy = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_judge(train: DigitsData, test: DigitsData, epochs: int = 40, seed: int = 0,
                batch_size: int = 64) -> JudgeTrainResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = DigitJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * (
        (len(train) + batch_size - 1) // batch_size))
    x = torch.from_numpy(train.images)
    y = torch.from_numpy(train.labels)
    for _ in range(epochs):
        judge.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(judge(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    judge.eval()
    return JudgeTrainResult(judge=judge, test_accuracy=accuracy(judge, test),
                            train_accuracy=accuracy(judge, train), epochs=epochs)


@torch.no_grad()
def judge_images(judge: DigitJudge, images: np.ndarray, batch_size: int = 512) -> Judgement:
    """images: float [N, 1, H, W] in [-1, 1]."""
    preds, confs, feats = [], [], []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size], dtype=torch.float32)
        f = judge.features(x)
        p = judge.head(f).softmax(-1)
        c, k = p.max(-1)
        preds.append(k.numpy())
        confs.append(c.numpy())
        feats.append(f.numpy())
    return Judgement(pred=np.concatenate(preds), confidence=np.concatenate(confs),
                     features=np.concatenate(feats))


def accuracy(judge: DigitJudge, data: DigitsData) -> float:
    return float((judge_images(judge, data.images).pred == data.labels).mean())


def sample_quality(judge: DigitJudge, images: np.ndarray, class_ids: np.ndarray,
                   real: DigitsData, real_reference: DigitsData | None = None) -> SampleQuality:
    """Class accuracy and Frechet distance of generated images against real digits."""
    verdict = judge_images(judge, images)
    real_feats = judge_images(judge, real.images).features
    per_class = [float((verdict.pred[class_ids == c] == c).mean()) if (class_ids == c).any() else float("nan")
                 for c in range(10)]
    floor = float("nan")
    if real_reference is not None:
        floor = frechet_distance(judge_images(judge, real_reference.images).features, real_feats)
    return SampleQuality(
        accuracy=float((verdict.pred == class_ids).mean()),
        per_class_accuracy=per_class,
        frechet_distance=frechet_distance(verdict.features, real_feats),
        frechet_distance_real_split=floor,
        n=len(images),
    )


def save_judge(result: JudgeTrainResult, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result.judge.state_dict(), str(out / "judge.safetensors.tmp"))
    (out / "judge.safetensors.tmp").replace(out / "judge.safetensors")
    meta = {"test_accuracy": result.test_accuracy, "train_accuracy": result.train_accuracy,
            "epochs": result.epochs}
    (out / "judge.json").write_text(json.dumps(meta, indent=2))
    return out


def load_judge(path: str | Path) -> DigitJudge:
    from safetensors.torch import load_file

    p = Path(path) / "judge.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no judge at {p}: materialize digit_classifier first")
    judge = DigitJudge()
    judge.load_state_dict(load_file(str(p)))
    return judge.eval()
