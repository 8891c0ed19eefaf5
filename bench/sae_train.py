"""SAE training speed: our trainer vs the plainest correct dense PyTorch TopK SAE, same batches, one run.

    .venv/bin/python bench/sae_train.py [--config tide.toml] [--layer 3] [--steps 60] [--batch 1024]

Reads stored activations (run `make run` first), preloads --steps batches so I/O is not timed, then times
(a) our SAETrainer step for the `topk` and `tide` variants (sparse decode over the k active rows, TopK
backward that never builds the dense latent gradient, AuxK, decoder-norm projection, AdamW), and (b) a
dense TopK SAE step (scatter to dense z, dense decode, plain autograd, AdamW). It also times a bare
torch matmul of the encoder's shape [B, d] x [d, n] to give the machine's matmul rate, and reports how
close our step gets to that limit (sae_speedup=<topk ours / dense>).

Then time-to-quality (bench/quality.py): each trainer (our topk and tide, the dense reference) trained on
--quality-tokens training tokens at each of its candidate learning rates, held-out FVU every --eval-every
steps; each at its best lr (the lowest final FVU with under 5% dead latents, as the sweep scores them), the
wall time and tokens to reach the dense reference's final FVU. Last line:
time_to_quality_speedup=<dense time / our topk time> (--quality-tokens 0 skips this part).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.references import DenseTopKReference  # noqa: E402
from pipelines.context import RunContext  # noqa: E402
from pipelines.project import Project  # noqa: E402
from tide_core.sae import SAESpec, SAETrainConfig, SAETrainer, TokenBatch  # noqa: E402


def timed(fn, batches, warmup: int = 5) -> float:
    """Seconds per call, median of 3 passes over the batches after a warm-up."""
    for b in batches[:warmup]:
        fn(b)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        runs.append((time.perf_counter() - t0) / len(batches))
    return sorted(runs)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--n-latents", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--quality-tokens", type=int, default=1_000_000)
    p.add_argument("--eval-every", type=int, default=50, help="optimizer steps between held-out evaluations")
    p.add_argument("--lrs-ours", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--lrs-dense", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3])
    args = p.parse_args()
    project = Project.load(args.config)
    cfg = project.config.sae
    store = RunContext(project).store()
    layer = args.layer if args.layer is not None else store.layout.layers[len(store.layout.layers) // 2]
    bs, n, k = args.batch or cfg.train.batch_size, args.n_latents or cfg.spec.n_latents, args.k or cfg.spec.k
    d = store.layout.d_model
    stream = store.iter_token_batches("resid", layer, bs, seed=0)
    batches = [TokenBatch(b.acts, b.timesteps, b.steps).to_torch() for _, b in zip(range(args.steps), stream, strict=False)]
    print(f"layer {layer}: d={d} n_latents={n} k={k} batch={bs}, {len(batches)} stored batches; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    tcfg = SAETrainConfig(total_tokens=10**9, batch_size=bs, warmup_tokens=0, init_tokens=bs)
    results = {}
    for variant in ("topk", "tide"):
        trainer = SAETrainer({variant: SAESpec(d_in=d, n_latents=n, k=k, variant=variant)}, tcfg)
        trainer.saes[variant].init_from_sample(batches[0].acts)
        results[variant] = timed(trainer.train_step, batches)

    torch.manual_seed(0)
    dense = DenseTopKReference(d, n, k)
    opt = torch.optim.AdamW(dense.parameters(), lr=4e-4)

    def dense_step(b: TokenBatch) -> None:
        out = dense(b.acts)
        opt.zero_grad(set_to_none=True)
        out.mse.backward()
        opt.step()

    results["dense"] = timed(dense_step, batches)

    x = batches[0].acts
    w = torch.randn(n, d)
    mm = timed(lambda _b: torch.nn.functional.linear(x, w), batches)  # [B, d] x [d, n]
    matmul_flops = 2 * bs * d * n / mm
    rows = [("matmul [B,d]x[d,n] (GFLOP/s)", f"{matmul_flops / 1e9:.1f}")]
    for name in ("dense", "topk", "tide"):
        rows.append((f"{name}: ms/step", f"{results[name] * 1e3:.2f}"))
        rows.append((f"{name}: tokens/s", f"{bs / results[name]:,.0f}"))
    limit_dense = matmul_flops / (12 * d * n)  # tokens/s if a dense step (6 matmuls of 2Bdn) ran at matmul speed
    limit_enc = matmul_flops / (2 * d * n)  # tokens/s of the one unavoidable encoder matmul alone
    for name in ("topk", "tide"):
        rows.append((f"{name}: dense-equivalent FLOP rate / matmul rate", f"{bs / results[name] / limit_dense:.2f}"))
        rows.append((f"{name}: tokens/s / encoder-matmul-only limit", f"{bs / results[name] / limit_enc:.3f}"))
    speedup = results["dense"] / results["topk"]
    rows += [("speedup topk ours / dense", f"{speedup:.2f}"),
             ("speedup tide ours / dense", f"{results['dense'] / results['tide']:.2f}")]
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    print(f"sae_speedup={speedup:.3f}")
    if args.quality_tokens:
        time_to_quality(store, project, layer, bs, n, k, args)


def time_to_quality(store, project, layer: int, bs: int, n: int, k: int, args) -> None:
    from bench import quality
    from pipelines.stages.sae import split_samples
    from storage.schema import MAX_DEAD_FRACTION

    split = split_samples(store, project.config.sae.heldout_fraction)
    stream = store.iter_token_batches("resid", layer, bs, seed=0, sample_ids=split.train)
    batches = [TokenBatch(b.acts, b.timesteps, b.steps).to_torch()
               for _, b in zip(range(args.quality_tokens // bs), stream, strict=False)]
    h = next(store.iter_token_batches("resid", layer, 65_536, seed=1, sample_ids=split.heldout))
    held = TokenBatch(h.acts, h.timesteps, h.steps).to_torch()
    print(f"\ntime to quality: {len(batches) * bs:,} training tokens, {len(held):,} held-out tokens, FVU every "
          f"{args.eval_every} steps")
    runs = {"dense": [quality.dense(lr, batches, held, n, k, args.eval_every) for lr in args.lrs_dense]}
    for variant in ("topk", "tide"):
        runs[variant] = [quality.ours(variant, lr, batches, held, n, k, args.eval_every) for lr in args.lrs_ours]
    for name, curves in runs.items():
        print(f"  {name}: final FVU (dead) by lr " + ", ".join(f"{c.lr:g} {c.final:.4f} ({c.dead:.0%})" for c in curves))
    top = {name: quality.best(curves, MAX_DEAD_FRACTION) for name, curves in runs.items()}
    target = top["dense"].final
    rows = [("target: the dense reference's final FVU", f"{target:.4f}")]
    reached = {}
    for name, c in top.items():
        hit = c.time_to(target)
        reached[name] = hit
        rows += [(f"{name}: best lr", f"{c.lr:g}"), (f"{name}: final FVU / dead", f"{c.final:.4f} / {c.dead:.1%}"),
                 (f"{name}: tokens/s", f"{c.tokens[-1] / c.seconds[-1]:,.0f}"),
                 (f"{name}: time / tokens to target", "not reached" if hit is None else f"{hit[0]:.1f} s / {hit[1]:,}")]
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    # The same by error alone (dead latents ignored), for comparison with tools that score FVU only.
    by_fvu = {name: quality.best(curves, max_dead=1.01) for name, curves in runs.items()}
    fvu_target = by_fvu["dense"].final
    hits = {name: c.time_to(fvu_target) for name, c in by_fvu.items()}
    print(f"by FVU alone: dense lr {by_fvu['dense'].lr:g} FVU {fvu_target:.4f} ({by_fvu['dense'].dead:.0%} dead) in "
          f"{hits['dense'][0]:.1f} s; " + "; ".join(
              f"{n} lr {by_fvu[n].lr:g} ({by_fvu[n].dead:.0%} dead) " + ("never" if hits[n] is None else
              f"in {hits[n][0]:.1f} s = {hits['dense'][0] / hits[n][0]:.2f}x") for n in ("topk", "tide")))
    for name in ("topk", "tide"):
        if reached[name] is not None:
            print(f"time_to_quality_speedup_{name}={reached['dense'][0] / reached[name][0]:.2f}")
    speedup = float("nan") if reached["topk"] is None else reached["dense"][0] / reached["topk"][0]
    print(f"time_to_quality_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
