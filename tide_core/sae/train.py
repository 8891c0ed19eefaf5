"""Training sparse autoencoders from a stream of token batches (knows nothing of where the tokens live).

* Input: any iterable of ``TokenBatch`` (numpy or torch), or of anything with ``.acts``, ``.timesteps`` and
  ``.steps`` (such as the activation store's batches). The stream is re-cut into batches of exactly
  ``batch_size`` tokens, so results depend only on the token ORDER, never on how the source chunks it, and
  nothing beyond one batch (plus the init sample) is held in memory.
* Several SAEs (e.g. tide, topk and relu of one layer) train from ONE pass over the data: each sees the
  same batches and has its own AdamW optimizer.
* Init: the first ``init_tokens`` tokens of the stream set every fresh SAE's input scale and ``b_dec``
  (``SparseAutoencoder.init_from_sample``); those tokens are then trained on like any others.
* Schedule: linear warm-up over ``warmup_tokens``, then cosine (or linear) decay to ``final_lr_frac`` of
  the peak at ``total_tokens``; gradients are clipped to ``grad_clip`` after the decoder-norm projection.
* Resume: ``save_state(dir)`` writes the SAEs, the optimizer states, the step / token counters and the torch
  RNG state; ``SAETrainer.load_state(dir)`` restores them, and ``fit`` continues from ``tokens_seen``. Given
  the stream re-positioned at that token (seek in the source, or ``skip_tokens``), the resumed run reaches
  bit-identical weights to an uninterrupted one. The step itself draws no random numbers; the RNG state is
  saved so that callers' own randomness continues identically too.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tide_core.files import atomic_directory
from tide_core.sae.batches import TokenBatch, rebatch
from tide_core.sae.model import SparseAutoencoder
from tide_core.sae.spec import SAESpec, SAETrainConfig

STATE_FILE = "trainer.json"
OPTIM_FILE = "optim.pt"
SAES_DIR = "saes"
STATE_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------------------------------------
# Config and records
# ----------------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: SAETrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - 1 - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.decay == "cosine" else 1.0 - frac
    return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * shape)


@dataclass(frozen=True)
class TrainLog:
    """Training metrics of one SAE, averaged over the steps since the previous record."""

    step: int  # optimizer steps done
    tokens_seen: int
    lr: float
    loss: float
    mse: float  # scaled space (mean ||x|| = sqrt(d_in)), per channel
    aux: float
    l1: float
    l0: float  # mean active latents per token
    dead_fraction: float  # at the end of the window


@dataclass
class TrainResult:
    """Outcome of training one SAE."""

    name: str
    sae: SparseAutoencoder
    steps: int
    tokens_seen: int
    complete: bool  # reached total_tokens (False: the stream ran out, or fit was told to pause)
    seconds: float  # time spent in this SAE's steps, over all fit calls
    logs: list[TrainLog] = field(default_factory=list)

    @property
    def final(self) -> TrainLog | None:
        return self.logs[-1] if self.logs else None


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


class SAETrainer:
    """Trains named SAEs on one shared stream of token batches; resumable (see the module docstring)."""

    def __init__(self, saes: Mapping[str, SparseAutoencoder | SAESpec], cfg: SAETrainConfig):
        if not saes:
            raise ValueError("SAETrainer needs at least one SAE (name -> SparseAutoencoder or SAESpec)")
        bad = [name for name in saes if not _NAME_RE.match(name)]
        if bad:
            raise ValueError(f"SAE names {bad} must match {_NAME_RE.pattern} (they become directory names)")
        self.cfg = cfg
        self.saes = {
            name: s if isinstance(s, SparseAutoencoder) else SparseAutoencoder(s, seed=cfg.seed)
            for name, s in saes.items()
        }
        widths = {name: s.spec.d_in for name, s in self.saes.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"SAEs trained in one pass see the same activations, but their d_in differ: {widths}")
        self.optimizers = {name: self._optimizer(s) for name, s in self.saes.items()}
        self.step = 0
        self.tokens_seen = 0
        self.logs: dict[str, list[TrainLog]] = {name: [] for name in self.saes}
        self.seconds: dict[str, float] = dict.fromkeys(self.saes, 0.0)
        self._window: dict[str, list[TrainLog]] = {name: [] for name in self.saes}

    @property
    def complete(self) -> bool:
        return self.tokens_seen >= self.cfg.total_tokens

    # --- one step --------------------------------------------------------------------------------------

    def _optimizer(self, sae: SparseAutoencoder) -> torch.optim.AdamW:
        """AdamW over the dictionary; TIDE's timestep MLP in a group of its own (its lr_scale applies)."""
        time_params = set() if sae.time_mlp is None else {id(p) for p in sae.time_mlp.parameters()}
        groups = [{"params": [p for p in sae.parameters() if id(p) not in time_params], "lr_scale": 1.0}]
        if time_params:
            groups.append({"params": list(sae.time_mlp.parameters()), "lr_scale": self.cfg.time_lr_scale})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)

    def _step_one(self, name: str, batch: TokenBatch, lr: float) -> TrainLog:
        sae, opt = self.saes[name], self.optimizers[name]
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        out = sae.loss(batch.acts, batch.timesteps)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        sae.project_decoder_grad_()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        opt.step()
        sae.normalize_decoder_()
        sae.record_fires(out.output.fire_counts(), len(batch))
        sae.record_threshold(out.threshold)
        self.seconds[name] += time.perf_counter() - t0
        return TrainLog(
            step=self.step + 1, tokens_seen=self.tokens_seen + len(batch), lr=lr,
            loss=out.total.item(), mse=out.mse.item(), aux=out.aux.item(), l1=out.l1.item(),
            l0=out.output.l0().float().mean().item(), dead_fraction=sae.dead_mask().float().mean().item(),
        )

    def train_step(self, batch: TokenBatch) -> dict[str, TrainLog]:
        """One optimizer step of every SAE on ``batch`` (already initialised SAEs; any batch size)."""
        lr = lr_at(self.step, self.cfg)
        logs, on_device = {}, {}
        for name, sae in self.saes.items():
            if not bool(sae.initialised):
                raise RuntimeError(f"SAE {name!r} has no input scale / b_dec yet: call fit() or init_from_sample()")
            device = sae.W_dec.device
            if device not in on_device:  # convert (e.g. float16 numpy -> float32 torch) once per device
                on_device[device] = batch.to_torch(device)
            scale = self.cfg.lr_scale(sae.spec.variant)
            logs[name] = self._step_one(name, on_device[device], lr * scale)
        self.step += 1
        self.tokens_seen += len(batch)
        return logs

    # --- the loop --------------------------------------------------------------------------------------

    def _initialise(self, stream: Iterator[TokenBatch]) -> Iterator[TokenBatch]:
        """Init fresh SAEs from the first init_tokens tokens; return the stream with them put back."""
        fresh = [s for s in self.saes.values() if not bool(s.initialised)]
        if not fresh:
            return stream
        head, n = [], 0
        while n < self.cfg.init_tokens:
            batch = next(stream, None)
            if batch is None:
                break
            head.append(batch)
            n += len(batch)
        if not head:
            raise ValueError("the token stream is empty: nothing to initialise or train the SAEs on")
        sample = TokenBatch.concat(head).to_torch()
        for sae in fresh:
            sae.init_from_sample(sample.acts)
        return chain(head, stream)

    def fit(
        self,
        batches: Iterable[TokenBatch],
        progress: Callable[[dict[str, TrainLog]], None] | None = None,
        max_tokens: int | None = None,
        show_progress: bool = False,
    ) -> dict[str, TrainResult]:
        """Train until ``total_tokens`` (or the stream ends, or ``max_tokens`` more tokens: a pause).

        ``batches`` must start at token ``self.tokens_seen`` of the training stream: its beginning for a new
        trainer, the first unconsumed token after ``load_state``. ``progress`` gets the averaged records
        every ``log_every`` steps; ``show_progress`` draws a tqdm bar.
        """
        stop_at = self.cfg.total_tokens
        if max_tokens is not None:
            stop_at = min(stop_at, self.tokens_seen + max_tokens)
        stream = rebatch(batches, self.cfg.batch_size)
        if self.tokens_seen < stop_at:
            stream = self._initialise(stream)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.total_steps, initial=self.step, desc="SAE", unit="step")
        try:
            while self.tokens_seen < stop_at:
                batch = next(stream, None)
                if batch is None:  # the stream ran out: close the log window
                    self._report(progress, bar)
                    break
                if len(batch) > stop_at - self.tokens_seen:
                    batch = batch.slice(0, stop_at - self.tokens_seen)
                for name, log in self.train_step(batch).items():
                    self._window[name].append(log)
                if self.step % self.cfg.log_every == 0 or self.complete:
                    self._report(progress, bar)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        # A pause (max_tokens) leaves the log window open; save_state keeps it, so logs match a straight run.
        return self.results()

    def _report(self, progress: Callable[[dict[str, TrainLog]], None] | None, bar: Any) -> None:
        records = self._flush_logs()
        if records and progress is not None:
            progress(records)
        if records and bar is not None:
            bar.set_postfix_str(_postfix(records))

    def _flush_logs(self) -> dict[str, TrainLog]:
        records = {}
        for name, window in self._window.items():
            if not window:
                continue
            last = window[-1]
            mean = {f: float(np.mean([getattr(w, f) for w in window])) for f in ("loss", "mse", "aux", "l1", "l0")}
            records[name] = TrainLog(step=last.step, tokens_seen=last.tokens_seen, lr=last.lr,
                                     dead_fraction=last.dead_fraction, **mean)
            self.logs[name].append(records[name])
            self._window[name] = []
        return records

    def results(self) -> dict[str, TrainResult]:
        return {
            name: TrainResult(name=name, sae=sae, steps=self.step, tokens_seen=self.tokens_seen,
                              complete=self.complete, seconds=self.seconds[name], logs=list(self.logs[name]))
            for name, sae in self.saes.items()
        }

    # --- resume ----------------------------------------------------------------------------------------

    def save_state(self, path: str | Path) -> Path:
        """Write everything needed to resume (atomically): saes/<name>/, trainer.json, optim.pt."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            for name, sae in self.saes.items():
                sae.save(tmp / SAES_DIR / name, meta={"tokens_seen": self.tokens_seen, "name": name})
            state = {
                "format": STATE_FORMAT, "cfg": self.cfg.model_dump(mode="json"), "step": self.step,
                "tokens_seen": self.tokens_seen, "names": list(self.saes), "seconds": self.seconds,
                "logs": {name: [asdict(r) for r in recs] for name, recs in self.logs.items()},
                "window": {name: [asdict(r) for r in recs] for name, recs in self._window.items()},
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            optim = {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                     "torch_rng": torch.get_rng_state()}
            torch.save(optim, tmp / OPTIM_FILE)
        return path

    @classmethod
    def load_state(cls, path: str | Path, device: str | torch.device = "cpu") -> SAETrainer:
        """A trainer exactly as it was when ``save_state`` wrote ``path``; continue with ``fit``."""
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not an SAE training state: {STATE_FILE} is missing")
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state {path} has format {state.get('format')}; expected {STATE_FORMAT}")
        saes = {n: SparseAutoencoder.load(path / SAES_DIR / n, device=device) for n in state["names"]}
        trainer = cls(saes, SAETrainConfig.model_validate(state["cfg"]))
        optim = torch.load(path / OPTIM_FILE, weights_only=True)
        for name, opt in trainer.optimizers.items():
            opt.load_state_dict(optim["optimizers"][name])
        torch.set_rng_state(optim["torch_rng"])
        trainer.step = state["step"]
        trainer.tokens_seen = state["tokens_seen"]
        trainer.seconds = dict(state["seconds"])
        trainer.logs = {n: [TrainLog(**r) for r in recs] for n, recs in state["logs"].items()}
        trainer._window = {n: [TrainLog(**r) for r in recs] for n, recs in state["window"].items()}
        return trainer


def _postfix(records: dict[str, TrainLog]) -> str:
    return " ".join(f"{n}: loss={r.loss:.4f} L0={r.l0:.1f} dead={r.dead_fraction:.2f}" for n, r in records.items())


def train_saes(
    saes: Mapping[str, SparseAutoencoder | SAESpec],
    batches: Iterable[TokenBatch],
    cfg: SAETrainConfig,
    progress: Callable[[dict[str, TrainLog]], None] | None = None,
    show_progress: bool = False,
) -> dict[str, TrainResult]:
    """Train several SAEs from one pass over ``batches`` (the common case; use SAETrainer to pause/resume)."""
    return SAETrainer(saes, cfg).fit(batches, progress=progress, show_progress=show_progress)
