"""Training the styled-digits PixArt: a ``PixArtTransformer2DModel`` (adaLN-single, cross-attention) and a
small T5 encoder trained together, in pixel space, on styled renders of real digits with template captions.

Every batch draws digits (outside the judge's held-out split), fresh style factors and captions that leave
style factors out at ``factor_drop``; ``caption_dropout`` of them are empty (the null condition of
classifier-free guidance). Epsilon loss on the cosine DDPM schedule, EMA weights, deterministic for a seed.
The directory is the diffusers pipeline layout without vae/ (transformer/, text_encoder/, tokenizer/,
scheduler/, model_index.json, tide_model.json), which the PixArt adapter loads as any PixArt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tide_core.config.model import StyledDigitsConfig
from tide_core.digits import load_digits, split_indices
from tide_core.files import atomic_directory
from tide_core.styled_digits import FACTORS, captions, draw_styles, render, stroke_masks
from tide_core.tiny_text import save_t5_tokenizer, tiny_t5
from tide_core.train_dit import TIDE_MODEL_FILE, _ema_update, lr_at
from tide_core.train_state import Resumable, resume_path

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}


def scheduler_config(cfg: StyledDigitsConfig) -> dict:
    """The noise schedule the model trains and samples with (its prediction type from the config)."""
    return {**SCHEDULER, "prediction_type": cfg.prediction_type}


@dataclass(frozen=True)
class StyledTrainResult:
    """The EMA weights of both networks, and how training went."""

    transformer: nn.Module
    text_encoder: nn.Module
    meta: dict  # what tide_model.json records
    seconds: float


def build_transformer(cfg: StyledDigitsConfig) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=3, out_channels=3,
        num_layers=cfg.num_layers, cross_attention_dim=cfg.num_heads * cfg.head_dim, sample_size=cfg.image_size,
        patch_size=cfg.patch_size, caption_channels=cfg.text_width)


def train_styled_digits(cfg: StyledDigitsConfig, tokenizer, progress: Callable[[int, float, float], None] | None = None,
                        log_every: int = 50, resume: Path | None = None,
                        log: Callable[[str], None] | None = None) -> StyledTrainResult:
    """Train both networks; ``progress(step, loss, lr)`` every ``log_every`` steps. With ``resume`` (a
    ``resume_path``) the loop's state is saved there every ``cfg.resume_every`` steps and a run killed before
    goes on from its last save."""
    from diffusers import DDPMScheduler

    digits = load_digits(8)
    train_rows, _ = split_indices(digits.labels, cfg.test_fraction, cfg.seed)
    masks = stroke_masks(digits, cfg.image_size)  # [N, 3, S, S], all digits; only train_rows are drawn
    torch.manual_seed(cfg.seed)
    transformer = build_transformer(cfg).train()
    encoder = tiny_t5(cfg.text_width, cfg.text_layers).train()
    ema_t, ema_e = (copy.deepcopy(m).eval().requires_grad_(False) for m in (transformer, encoder))
    params = [*transformer.parameters(), *encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    alphas = DDPMScheduler(**scheduler_config(cfg)).alphas_cumprod.float()  # [T]
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    no_conditions = {"resolution": None, "aspect_ratio": None}
    state = Resumable(resume, cfg.fingerprint(), cfg.resume_every, {"transformer": transformer, "encoder": encoder,
                      "ema_transformer": ema_t, "ema_encoder": ema_e}, opt, rng, gen)
    done = state.restore(log)
    for step in range(done.step, cfg.train_steps):
        rows = train_rows[rng.integers(len(train_rows), size=cfg.batch_size)]
        codes = draw_styles(digits.labels[rows], rng)  # [B, F]
        texts = [("" if rng.random() < cfg.caption_dropout else c) for c in captions(codes, rng, cfg.factor_drop)]
        tok = tokenizer(texts, padding="max_length", max_length=cfg.max_prompt_tokens, truncation=True,
                        return_tensors="pt")
        x0 = torch.from_numpy(render(masks, rows, codes))  # [B, 3, S, S]
        t = torch.randint(SCHEDULER["num_train_timesteps"], (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        text = encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]  # [B, L, C]
        pred = transformer(xt, encoder_hidden_states=text, encoder_attention_mask=tok.attention_mask, timestep=t,
                           added_cond_kwargs=no_conditions).sample  # [B, 3, S, S]
        # v = sqrt(a) eps - sqrt(1 - a) x0: near pure noise it is -x0, which only the prompt can tell
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = nn.functional.mse_loss(pred, target)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train_steps, cfg.lr, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short runs cannot wait for a 0.999 EMA
        _ema_update(ema_t, transformer, decay)
        _ema_update(ema_e, encoder, decay)
        if done.record(step, loss.item(), log_every, cfg.train_steps) and progress is not None:
            progress(step + 1, done.losses[-1][1], opt.param_groups[0]["lr"])
        state.save_if_due(done, cfg.train_steps)
    seconds, losses = done.seconds, done.losses
    weights = torch.cat([p.detach().flatten() for p in ema_t.parameters()]).numpy().tobytes()
    meta = {"styled_digits_config": cfg.model_dump(), "styled_digits_fingerprint": cfg.fingerprint(),
            "weights_sha256": hashlib.sha256(weights).hexdigest(), "train_seconds": round(seconds, 1),
            "final_loss": losses[-1][1], "factors": {f.name: list(f.values) for f in FACTORS},
            "loss_curve": {"step": [s for s, _ in losses], "loss": [v for _, v in losses]},
            "torch": torch.__version__}
    return StyledTrainResult(ema_t, ema_e, meta, seconds)


def train_and_save(cfg: StyledDigitsConfig, out_dir: str | Path, command: str = "tide train-dit",
                   progress: Callable[[int, float, float], None] | None = None,
                   log: Callable[[str], None] | None = None) -> StyledTrainResult:
    """Build the tokenizer, train (resuming a killed run of the same recipe), and write the pipeline
    directory (atomically)."""
    from transformers import T5TokenizerFast

    resume = resume_path(out_dir)
    with tempfile.TemporaryDirectory() as words:  # the tokenizer to train with; the directory gets its own copy
        save_t5_tokenizer(Path(words))
        tokenizer = T5TokenizerFast.from_pretrained(words)
    # Trained before the directory is opened, so a kill during training leaves no half-written directory
    result = train_styled_digits(cfg, tokenizer, progress, resume=resume, log=log)
    with atomic_directory(out_dir) as tmp:
        save_t5_tokenizer(tmp / "tokenizer")
        result.transformer.save_pretrained(tmp / "transformer")
        result.text_encoder.save_pretrained(tmp / "text_encoder")
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": "DDPMScheduler", **scheduler_config(cfg)}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {"_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                 "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                 "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": [None, None]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / TIDE_MODEL_FILE).write_text(json.dumps({**result.meta, "command": command}, indent=2, sort_keys=True))
    resume.unlink(missing_ok=True)  # the checkpoint is whole: nothing left to resume
    return result
