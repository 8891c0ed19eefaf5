"""Training the embedded default DiT on the bundled digits (pixel space, epsilon loss, EMA weights).

Deterministic for a seed on one machine: init, batch order, timesteps, noise and label dropout all come
from generators seeded by ``cfg.seed``. The checkpoint is written in the diffusers pipeline layout
(transformer/, scheduler/, plus our tide_model.json), so the DiT family's loader (and diffusers itself)
opens it like any other DiT.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tide_core.config import DigitsDiTConfig
from tide_core.digits import CLASS_NAMES, DigitsData
from tide_core.files import atomic_directory
from tide_core.train_state import Resumable, resume_path

TIDE_MODEL_FILE = "tide_model.json"


def build_digits_dit(cfg: DigitsDiTConfig) -> nn.Module:
    """A fresh class-conditional DiT (adaLN-Zero) for 1-channel pixel-space digits."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(cfg.seed)
    model = DiTTransformer2DModel(
        sample_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        num_embeds_ada_norm=len(CLASS_NAMES),
    )
    # diffusers drops the label independently in every block; the trainer drops it once per image
    # instead (so "unconditional" means the same thing in all blocks).
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def digits_scheduler_config(cfg: DigitsDiTConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": "epsilon",
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }


@dataclass(frozen=True)
class DiTTrainResult:
    """A trained default DiT (EMA weights) and its loss curve."""

    transformer: nn.Module  # the EMA weights
    scheduler_config: dict
    meta: dict  # what tide_model.json records: config, fingerprint, weights hash, loss curve
    losses: list[float]  # mean loss per logging window
    loss_steps: list[int]  # optimizer step at the end of each window
    seconds: float
    steps_per_second: float


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)


def train_digits_dit(
    cfg: DigitsDiTConfig,
    data: DigitsData,
    progress: Callable[[int, float, float], None] | None = None,
    log_every: int = 50,
    resume: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> DiTTrainResult:
    """Train the default DiT; ``progress(step, loss, lr)`` is called every log_every steps. With ``resume``
    (a ``resume_path``) the state is saved there every ``cfg.resume_every`` steps and a killed run goes on
    from its last save."""
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed)
    model = build_digits_dit(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched_cfg = digits_scheduler_config(cfg)
    noise_sched = DDPMScheduler(**sched_cfg)
    alphas = noise_sched.alphas_cumprod.float()  # [T]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(data.images)  # [N, 1, S, S]
    labels = torch.from_numpy(data.labels)
    null = len(CLASS_NAMES)
    state = Resumable(resume, cfg.fingerprint(), cfg.resume_every, {"model": model, "ema": ema}, opt,
                      torch_generator=gen)
    done = state.restore(log)
    for step in range(done.step, cfg.train_steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.class_dropout
        y[drop] = null
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # [B, 1, S, S]
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train_steps, cfg.lr, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # Short runs (tests) cannot wait for a 0.999 EMA to forget the random init.
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if done.record(step, loss.item(), log_every, cfg.train_steps) and progress is not None:
            progress(step + 1, done.losses[-1][1], opt.param_groups[0]["lr"])
        state.save_if_due(done, cfg.train_steps)
    seconds = done.seconds
    loss_steps, losses = [s for s, _ in done.losses], [v for _, v in done.losses]
    weights = torch.cat([p.detach().flatten() for p in ema.parameters()]).numpy().tobytes()
    meta = {
        "digits_config": cfg.model_dump(),
        "digits_fingerprint": cfg.fingerprint(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "train_seconds": round(seconds, 1),
        "final_loss": losses[-1],
    }
    return DiTTrainResult(transformer=ema, scheduler_config=sched_cfg, meta=meta, losses=losses, loss_steps=loss_steps, seconds=seconds,
                          steps_per_second=cfg.train_steps / max(seconds, 1e-9))


def train_and_save(cfg: DigitsDiTConfig, out_dir: str | Path, command: str = "tide train-dit",
                   progress: Callable[[int, float, float], None] | None = None,
                   log: Callable[[str], None] | None = None) -> DiTTrainResult:
    """Train the default DiT on all digits (resuming a killed run of the same recipe) and write its
    checkpoint directory (atomically)."""
    from tide_core.digits import load_digits

    resume = resume_path(out_dir)
    result = train_digits_dit(cfg, load_digits(cfg.image_size), progress=progress, resume=resume, log=log)
    result.meta.update({
        "command": command,
        "torch": torch.__version__,
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "loss_curve": {"step": result.loss_steps, "loss": [round(v, 5) for v in result.losses]},
    })
    save_checkpoint(result, out_dir)
    resume.unlink(missing_ok=True)  # the checkpoint is whole: nothing left to resume
    return result


def save_checkpoint(result: DiTTrainResult, out_dir: str | Path) -> Path:
    """Write the diffusers layout (atomically: ``atomic_directory``), so a killed write never leaves half a
    checkpoint where the loader looks."""
    with atomic_directory(out_dir) as tmp:
        result.transformer.save_pretrained(tmp / "transformer")
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "DDPMScheduler", **result.scheduler_config}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (tmp / TIDE_MODEL_FILE).write_text(json.dumps(result.meta, indent=2, sort_keys=True))
    return Path(out_dir)
