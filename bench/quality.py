"""Time-to-quality of SAE trainers: how much wall time and how many tokens each needs to reach a held-out
fraction of variance unexplained (FVU), each at its own best learning rate. Used by bench/sae_train.py.

Every trainer sees the same training batches in the same order and is scored on the same held-out tokens
(whole held-out shards: other seeds than the training ones). Only training steps are timed; evaluation
pauses the clock. FVU = sum |x - x_hat|^2 / sum |x - mean(x)|^2 over the held-out tokens, raw scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.references import DenseTopKReference
from tide_core.sae import SAESpec, SAETrainConfig, SAETrainer, TokenBatch, lr_at


@dataclass(frozen=True)
class Curve:
    """One trainer at one learning rate: held-out FVU after each evaluation interval."""

    name: str
    lr: float
    tokens: list[int]  # training tokens seen at each evaluation
    seconds: list[float]  # training wall time at each evaluation (evaluation excluded)
    fvu: list[float]
    dead: float  # share of latents that never fire on the held-out tokens at the end

    @property
    def final(self) -> float:
        return self.fvu[-1]

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(seconds, tokens) at the first evaluation whose FVU is <= target; None if never."""
        for s, n, f in zip(self.seconds, self.tokens, self.fvu, strict=True):
            if f <= target:
                return s, n
        return None


def fvu(reconstruct: Callable[[Tensor, Tensor], Tensor], held: TokenBatch) -> float:
    """Fraction of variance unexplained on the held-out tokens (raw activation scale)."""
    with torch.no_grad():
        x = held.acts  # [N, d]
        err = (reconstruct(x, held.timesteps) - x).pow(2).sum()
        return float(err / (x - x.mean(0)).pow(2).sum())


def dead_share(encode: Callable[[Tensor, Tensor], Tensor], held: TokenBatch) -> float:
    """Share of latents that fire on none of the held-out tokens."""
    with torch.no_grad():
        fired = (encode(held.acts, held.timesteps) > 0).any(0)  # [n]
    return 1.0 - float(fired.float().mean())


def _run(step: Callable[[TokenBatch], None], reconstruct, batches: list[TokenBatch], held: TokenBatch,
         every: int) -> tuple[list[int], list[float], list[float]]:
    tokens, seconds, curve, clock, seen = [], [], [], 0.0, 0
    for i, batch in enumerate(batches, 1):
        t0 = time.perf_counter()
        step(batch)
        clock += time.perf_counter() - t0
        seen += len(batch)
        if i % every == 0 or i == len(batches):
            tokens.append(seen)
            seconds.append(clock)
            curve.append(fvu(reconstruct, held))
    return tokens, seconds, curve


def ours(variant: str, lr: float, batches: list[TokenBatch], held: TokenBatch, n: int, k: int,
         every: int, time_lr_scale: float = 1.0) -> Curve:
    """The project's trainer (its full recipe: init from a sample, input scaling, AuxK, warm-up and decay)."""
    d, bs = batches[0].acts.shape[1], len(batches[0])
    cfg = SAETrainConfig(total_tokens=bs * len(batches), batch_size=bs, lr=lr, variant_lr_scale={},
                         time_lr_scale=time_lr_scale, warmup_tokens=min(50_000, bs * len(batches) // 10),
                         init_tokens=16_384)
    torch.manual_seed(0)
    trainer = SAETrainer({variant: SAESpec(d_in=d, n_latents=n, k=k, variant=variant)}, cfg)
    sae = trainer.saes[variant]
    t0 = time.perf_counter()
    head = TokenBatch.concat(batches[: max(1, cfg.init_tokens // bs)])
    sae.init_from_sample(head.acts)
    init_seconds = time.perf_counter() - t0

    def reconstruct(x, t):
        sae.eval()
        out = sae(x, t).x_hat
        sae.train()
        return out

    tokens, seconds, curve = _run(trainer.train_step, reconstruct, batches, held, every)
    sae.eval()
    dead = dead_share(sae.encode, held)
    return Curve(variant, lr, tokens, [s + init_seconds for s in seconds], curve, dead)


def dense(lr: float, batches: list[TokenBatch], held: TokenBatch, n: int, k: int, every: int) -> Curve:
    """The plainest correct dense TopK SAE (bench/references.py) with AdamW and the same warm-up and
    decay schedule, on raw activations."""
    d, bs = batches[0].acts.shape[1], len(batches[0])
    cfg = SAETrainConfig(total_tokens=bs * len(batches), batch_size=bs, lr=lr,
                         warmup_tokens=min(50_000, bs * len(batches) // 10))
    torch.manual_seed(0)
    model = DenseTopKReference(d, n, k)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state = {"step": 0}

    def step(b: TokenBatch) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"], cfg)
        out = model(b.acts)
        opt.zero_grad(set_to_none=True)
        out.mse.backward()
        opt.step()
        state["step"] += 1

    def reconstruct(x, _t):
        return model(x).xs_hat

    curve = _run(step, reconstruct, batches, held, every)
    return Curve("dense", lr, *curve, dead_share(lambda x, _t: model(x).z, held))


def best(curves: list[Curve], max_dead: float) -> Curve:
    """The lowest final FVU among the curves with fewer than max_dead dead latents (if none, the fewest
    dead): a learning rate that trades latents for error does not win; one that diverged scores NaN."""
    def key(c: Curve):
        ok = c.dead < max_dead
        return (not ok, c.final != c.final, c.final if ok else c.dead)

    return min(curves, key=key)
