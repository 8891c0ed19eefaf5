"""Streaming SAE training (sae.stream) against training from the store, on one config.

    .venv/bin/python bench/stream.py [--config tide.toml] [--samples 64] [--steps 20] [--tokens 300000]

Two fresh warehouses of the config (in a temporary folder), one layer and site, `sampling.shard_size` 16:
`store` captures every shard's activations and trains with sae.shuffle_blocks = "shards"; `stream` stores
the held-out shards' activations only and samples the training shards again while it trains. Timed: the
capture of every shard, then the SAE stage of the layer (training, evaluation; no splicing). Prints the
activation bytes on disk, both times, the samples the stream sampled again, each run's held-out NMSE, and
whether the two runs' SAEs are equal bit for bit (they must be). Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.project import REPO_ROOT, Project  # noqa: E402
from tests.conftest import dump_toml, merge  # noqa: E402


def project_at(config: Path, root: Path, args, sae: dict) -> Project:
    """The config with its warehouse under root, the bench's sizes, and `sae` merged into [sae]."""
    data = tomllib.loads(config.read_text())
    ckpt = data.get("model", {}).get("digits", {}).get("checkpoint_dir")
    over = {"warehouse": {"root": str(root / "wh")},
            "sampling": {"num_samples": args.samples, "shard_size": 16, "num_steps": args.steps},
            "capture": {"layers": [args.layer], "sites": ["resid"]},
            "sae": {"splice_samples": 0, "train": {"total_tokens": args.tokens}, **sae}}
    if ckpt:
        over["model"] = {"digits": {"checkpoint_dir": str((config.parent / ckpt).resolve())}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tide.toml"
    path.write_text(dump_toml(merge(data, over)))
    return Project.load(path)


def run_one(project: Project, layer: int) -> dict:
    from pipelines.context import RunContext
    from pipelines.stages import capture
    from pipelines.stages.sae import train_layer
    from tide_core.sae import SparseAutoencoder

    ctx = RunContext(project, log=lambda m: None)
    ctx.model  # noqa: B018 - loaded before the clock starts
    capture.create_store(ctx)
    t0 = time.perf_counter()
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    t_capture = time.perf_counter() - t0
    acts = Path(project.store_url) / "acts"
    nbytes = sum(p.stat().st_size for p in acts.rglob("c.*"))
    t0 = time.perf_counter()
    report = train_layer(ctx, layer, "resid")
    t_sae = time.perf_counter() - t0
    return {"bytes": nbytes, "capture": t_capture, "sae": t_sae, "drawn": report.samples_drawn,
            "nmse": {r.variant: r.metrics["heldout"][-1]["nmse"] for r in report.reports},
            "weights": {r.variant: SparseAutoencoder.load(r.path).state_dict() for r in report.reports}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_ROOT / "tide.toml"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--tokens", type=int, default=300_000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tide-stream-"))
    try:
        store = run_one(project_at(Path(args.config), tmp / "store", args, {"shuffle_blocks": "shards"}), args.layer)
        stream = run_one(project_at(Path(args.config), tmp / "stream", args, {"stream": True}), args.layer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    same = all(torch.equal(t, stream["weights"][v][k]) for v, w in store["weights"].items() for k, t in w.items())
    print(f"config {args.config}: {args.samples} samples in shards of 16, {args.steps} steps, layer {args.layer}, "
          f"{args.tokens} training tokens")
    print(f"{'mode':<8}{'acts MB':>10}{'capture s':>11}{'sae s':>9}{'resampled':>11}  held-out nmse")
    for name, r in (("store", store), ("stream", stream)):
        nmse = ", ".join(f"{v} {x:.4f}" for v, x in r["nmse"].items())
        print(f"{name:<8}{r['bytes'] / 1e6:>10.2f}{r['capture']:>11.1f}{r['sae']:>9.1f}{r['drawn']:>11}  {nmse}")
    print(f"store bytes stream/store = {stream['bytes'] / store['bytes']:.3f}; capture time stream/store = "
          f"{stream['capture'] / store['capture']:.2f}; sae time stream/store = {stream['sae'] / store['sae']:.2f}; "
          f"SAEs equal bit for bit: {same}")


if __name__ == "__main__":
    main()
