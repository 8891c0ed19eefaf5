"""Does a FIXED per-timestep input normalisation give plain TopK the gain TIDE's learned modulation gives it?
And which L1 coefficient gives the relu variant the TopK variants' L0 (--relu-sweep)?

    .venv/bin/python bench/time_norm.py [--config tide.toml] [--layers 1 3 5] [--tokens 2000000]
    .venv/bin/python bench/time_norm.py --relu-sweep [--layers 3] [--l1 0.01 0.1] [--lrs 1e-3 2e-3]

Stored resid activations of the run, split as the SAE stage splits them (split_samples: whole held-out
shards): the project's training stream (training_stream) of the training shards, every held-out token for
scoring. Per layer, three SAEs of the run's SAE config (n_latents 1024, k 32, batch 1024, lr 2e-3, tide at
half of it), --tokens training tokens each:

  topk       plain TopK on the raw activations;
  tide       TopK whose encoder input is modulated by a learned function of the timestep, raw activations;
  topk_norm  plain TopK on x' = (x - mean_step) / norm_step, where mean_step [d] is the step's mean activation
             and norm_step its mean token norm after centring, both from the training tokens only; its
             reconstruction is mapped back (x_hat' * norm_step + mean_step) before scoring.

The normalisation wraps the batches and the reconstruction, outside the SAE: it is a baseline, not a variant.
topk and tide train in one SAETrainer pass; topk_norm in a second pass over the same tokens in the same order,
from the same seed. Scores (tide_core.sae.metrics.evaluate, raw scale): NMSE = SSE / sum of squared deviations
from the per-channel mean, overall and per step; the steps where an SAE beats topk; latents that never fire
on the held-out tokens. Last lines: time_norm_gain_layer<L>=<topk NMSE / topk_norm NMSE>, middle layer last.

--relu-sweep: relu SAEs at each --l1 coefficient beside topk, one pass per --lrs learning rate; held-out L0,
NMSE and dead share, and last the l1 whose held-out L0 is closest to k: relu_l1_at_k=<l1>.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pipelines.context import RunContext  # noqa: E402
from pipelines.project import Project  # noqa: E402
from pipelines.stages.sae import Split, split_samples, training_stream  # noqa: E402
from storage.activation_store import ActivationStore  # noqa: E402
from tide_core.sae import (  # noqa: E402
    SAEDesign,
    SAEOutput,
    SAESpec,
    SAETrainConfig,
    SAETrainer,
    SparseAutoencoder,
    TokenBatch,
    evaluate,
)

SITE = "resid"


@dataclass(frozen=True)
class StepStats:
    """Per-step input statistics, looked up by diffusion timestep (what every token carries)."""

    mean: Tensor  # [T + 1, d] the step's mean activation (0 at timesteps no step has)
    norm: Tensor  # [T + 1] the step's mean token norm after centring (1 at timesteps no step has)

    def normalise(self, x: Tensor, t: Tensor) -> Tensor:
        return (x - self.mean[t]) / self.norm[t, None]  # [B, d]

    def unnormalise(self, x_norm: Tensor, t: Tensor) -> Tensor:
        return x_norm * self.norm[t, None] + self.mean[t]  # [B, d]


def step_stats(store: ActivationStore, layer: int, train_ids: Tensor, num_train_timesteps: int) -> StepStats:
    """Mean activation and mean centred token norm of every step, over the training samples only."""
    samples = range(int(train_ids.min()), int(train_ids.max()) + 1)
    assert len(samples) == len(train_ids), "split_samples' training ids are one contiguous range"
    mean = torch.zeros(num_train_timesteps + 1, store.layout.d_model)
    norm = torch.ones(num_train_timesteps + 1)
    for step, t in zip(store.layout.steps, store.provenance["capture_timesteps"], strict=True):
        x = torch.from_numpy(store.read_step(SITE, layer, step, samples)).double().flatten(0, 1)  # [N * P, d]
        mu = x.mean(0)  # [d]
        mean[t], norm[t] = mu, (x - mu).norm(dim=1).mean()
    return StepStats(mean, norm)


def normalised(batches: Iterable, stats: StepStats) -> Iterator[TokenBatch]:
    """The training stream with every token normalised by its own step's statistics."""
    for raw in batches:
        b = TokenBatch.coerce(raw).to_torch()
        yield TokenBatch(stats.normalise(b.acts, b.timesteps), b.timesteps, b.steps)


class Unnormalised(nn.Module):
    """An SAE trained on step-normalised tokens, seen from the raw space: normalises what it reads and maps
    its reconstruction back, so evaluate() scores it exactly as it scores the others."""

    def __init__(self, sae: SparseAutoencoder, stats: StepStats):
        super().__init__()
        self.sae, self.stats, self.spec = sae, stats, sae.spec

    @property
    def W_dec(self) -> Tensor:  # evaluate() reads the device from it
        return self.sae.W_dec

    def forward(self, x: Tensor, t: Tensor) -> SAEOutput:
        out = self.sae(self.stats.normalise(x, t), t)
        return replace(out, x_hat=self.stats.unnormalise(out.x_hat, t))


@dataclass(frozen=True)
class Score:
    """Held-out quality of one SAE (raw scale)."""

    nmse: float
    l0: float
    dead: float
    per_step: dict[int, float]  # step -> NMSE over that step's tokens


def score(sae: nn.Module, held: list[TokenBatch]) -> Score:
    res = evaluate(sae, held)
    return Score(res.overall.nmse, res.overall.l0, res.overall.dead_fraction,
                 {s: m.nmse for s, m in res.per_step.items()})


def train(specs: dict[str, SAESpec], batches: Iterable, cfg: SAETrainConfig) -> dict[str, SparseAutoencoder]:
    torch.manual_seed(cfg.seed)  # as the SAE stage does before building its trainer
    return {name: r.sae for name, r in SAETrainer(specs, cfg).fit(batches).items()}


@dataclass(frozen=True)
class Bench:
    """What every measurement here reads: the store, its split, the run's SAE config."""

    store: ActivationStore
    split: Split
    design: SAEDesign
    cfg: SAETrainConfig
    num_train_timesteps: int

    def spec(self, variant: str, **design: float) -> SAESpec:
        return self.design.model_copy(update=design).bind(self.store.layout.d_model, variant,
                                                          self.num_train_timesteps)

    def stream(self, layer: int, cfg: SAETrainConfig | None = None):
        return training_stream(self.store, layer, SITE, self.split, cfg or self.cfg)

    def heldout(self, layer: int) -> list[TokenBatch]:
        """Every token of the held-out shards, in evaluate_sae's order."""
        return [TokenBatch.coerce(b).to_torch() for b in self.store.iter_token_batches(
            SITE, layer, 4096, seed=self.cfg.seed + 7, sample_ids=self.split.heldout, drop_last=False)]


def time_norm_layer(bench: Bench, layer: int) -> dict[str, Score]:
    stats = step_stats(bench.store, layer, torch.as_tensor(bench.split.train), bench.num_train_timesteps)
    raw = train({"topk": bench.spec("topk"), "tide": bench.spec("tide")}, bench.stream(layer), bench.cfg)
    norm = train({"topk_norm": bench.spec("topk")}, normalised(bench.stream(layer), stats), bench.cfg)
    held = bench.heldout(layer)
    return {"topk": score(raw["topk"], held), "tide": score(raw["tide"], held),
            "topk_norm": score(Unnormalised(norm["topk_norm"], stats), held)}


def report_time_norm(bench: Bench, layers: list[int]) -> None:
    print("layer | SAE | held-out NMSE | topk NMSE / this | steps better than topk | L0 | dead | wall s")
    gains = {}
    for layer in layers:
        t0 = time.perf_counter()
        scores = time_norm_layer(bench, layer)
        wall = time.perf_counter() - t0
        base = scores["topk"]
        for name, s in scores.items():
            wins = sum(s.per_step[step] < base.per_step[step] for step in base.per_step)
            print(f"{layer} | {name} | {s.nmse:.4f} | {base.nmse / s.nmse:.3f} | "
                  f"{wins if name != 'topk' else '-'}/{len(base.per_step)} | {s.l0:.1f} | {s.dead:.1%} | {wall:.0f}")
        gains[layer] = base.nmse / scores["topk_norm"].nmse
    for layer in sorted(gains, key=lambda layer: layer == layers[len(layers) // 2]):
        print(f"time_norm_gain_layer{layer}={gains[layer]:.3f}")


def relu_sweep(bench: Bench, layer: int, l1s: list[float], lrs: list[float]) -> None:
    held, k = bench.heldout(layer), bench.design.k
    print("lr | SAE | l1_coeff | held-out L0 | held-out NMSE | dead | wall s")
    rows = []  # (l1, lr, Score, topk Score at that lr)
    for lr in lrs:
        cfg = bench.cfg.model_copy(update={"lr": lr})
        specs = {"topk": bench.spec("topk")} | {f"relu_{l1:g}": bench.spec("relu", l1_coeff=l1) for l1 in l1s}
        t0 = time.perf_counter()
        saes = train(specs, bench.stream(layer, cfg), cfg)
        wall = time.perf_counter() - t0
        scores = {name: score(sae, held) for name, sae in saes.items()}
        for name, s in scores.items():
            l1 = "-" if name == "topk" else name.removeprefix("relu_")
            print(f"{lr:g} | {name.split('_')[0]} | {l1} | {s.l0:.1f} | {s.nmse:.4f} | {s.dead:.1%} | {wall:.0f}")
        rows += [(l1, lr, scores[f"relu_{l1:g}"], scores["topk"]) for l1 in l1s]
    l1, lr, s, top = min(rows, key=lambda r: abs(r[2].l0 - k))
    print(f"closest to L0 = {k}: l1_coeff {l1:g} at lr {lr:g}: L0 {s.l0:.1f}, NMSE {s.nmse:.4f} "
          f"(topk at k={k}, same lr: {top.nmse:.4f}; ratio relu / topk {s.nmse / top.nmse:.2f})")
    print(f"relu_l1_at_k={l1:g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: every captured layer "
                   "(--relu-sweep: the middle one)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: the run's)")
    p.add_argument("--relu-sweep", action="store_true")
    p.add_argument("--l1", type=float, nargs="+", default=[0.003, 0.005, 0.008, 0.013, 0.02, 0.05])
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="--relu-sweep lrs (default: the run's)")
    args = p.parse_args()
    project = Project.load(args.config)
    store = RunContext(project).store()
    sae_cfg = project.config.sae
    cfg = sae_cfg.train if args.tokens is None else sae_cfg.train.model_copy(update={"total_tokens": args.tokens})
    bench = Bench(store, split_samples(store, sae_cfg.heldout_fraction), sae_cfg.spec, cfg,
                  int(store.provenance["model"]["time"]["num_train_timesteps"]))
    layers = args.layers or store.layout.layers
    print(f"{len(bench.split.train)} training / {len(bench.split.heldout)} held-out samples, "
          f"{cfg.total_tokens:,} training tokens per SAE, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.relu_sweep:
        relu_sweep(bench, layers[len(layers) // 2] if args.layers is None else layers[0], args.l1,
                   args.lrs or [cfg.lr])
    else:
        report_time_norm(bench, layers)


if __name__ == "__main__":
    main()
