"""How much the stored activations move with the diffusion step, per layer: the question behind TIDE.

    .venv/bin/python bench/timestep_stats.py [--config tide.toml] [--samples 64]

For each captured layer (resid) and step: the mean token norm, the norm of the step's mean activation, and
how much of the activations' total variance is explained by the step alone (the between-step share:
sum over steps of n_s |mean_s - mean|^2 / sum |x - mean|^2). A large share means a timestep-aware encoder
has something to use; a small one means the steps look alike to an SAE. With --sae-root, it also reports
how far each trained TIDE SAE's learned modulation is from the identity (mean |scale(t)| and |shift(t)|
relative to the scaled input's per-channel spread).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from pipelines.context import RunContext  # noqa: E402
from pipelines.project import Project  # noqa: E402


def layer_stats(acts: np.ndarray) -> dict[str, np.ndarray | float]:
    """acts [S, N, P, D] (steps, images, tokens, channels) -> per-step norms and the between-step share."""
    x = acts.astype(np.float64).reshape(acts.shape[0], -1, acts.shape[-1])  # [S, T, D]
    mean_all = x.reshape(-1, x.shape[-1]).mean(0)  # [D]
    step_means = x.mean(1)  # [S, D]
    total = ((x - mean_all) ** 2).sum()
    between = (x.shape[1] * ((step_means - mean_all) ** 2).sum(1)).sum()
    return {"token_norm": np.linalg.norm(x, axis=2).mean(1), "mean_norm": np.linalg.norm(step_means, axis=1),
            "between_share": float(between / total)}


def modulation_stats(sae_dir: Path, timesteps: list[int]) -> dict[str, float]:
    """How far a TIDE SAE's learned modulation is from the identity over the captured timesteps, and how much
    of it depends on the timestep at all (the spread over t, per channel, averaged)."""
    import torch

    from tide_core.sae import SparseAutoencoder

    sae = SparseAutoencoder.load(sae_dir)
    with torch.no_grad():
        mods = [sae.timestep_modulation(int(t)) for t in timesteps]
        scale = torch.stack([m.gain - 1 for m in mods]).double()  # [T, d]
        shift = torch.stack([m.shift for m in mods]).double()  # [T, d]
    return {"mean_abs_scale": scale.abs().mean().item(), "scale_spread_over_t": scale.std(0).mean().item(),
            "mean_abs_shift": shift.abs().mean().item(), "shift_spread_over_t": shift.std(0).mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--samples", type=int, default=64, help="images read per layer (the first ones)")
    args = p.parse_args()
    project = Project.load(args.config)
    store = RunContext(project).store()
    lay = store.layout
    timesteps = store.provenance["capture_timesteps"]
    print(f"{lay.num_samples} samples, steps {lay.steps[0]}..{lay.steps[-1]} ({len(lay.steps)}), d={lay.d_model}; "
          f"first {args.samples} images")
    for layer in lay.layers:
        acts = store.read_samples("resid", layer, 0, min(args.samples, lay.num_samples))  # [S, N, P, D]
        st = layer_stats(acts)
        tn, mn = st["token_norm"], st["mean_norm"]
        picks = sorted({0, len(tn) // 4, len(tn) // 2, 3 * len(tn) // 4, len(tn) - 1})
        print(f"layer {layer}: between-step share of variance {st['between_share']:.3f}; token norm "
              + ", ".join(f"step {lay.steps[i]} {tn[i]:.2f}" for i in picks)
              + f" (max/min {tn.max() / tn.min():.2f}); step-mean norm max/min {mn.max() / mn.min():.2f}")
        for sae_dir in sorted(project.saes_dir.glob(f"L{layer:02d}-resid-tide-*")):
            m = modulation_stats(sae_dir, timesteps)
            print(f"  {sae_dir.name}: learned modulation |scale| {m['mean_abs_scale']:.4f} (spread over t "
                  f"{m['scale_spread_over_t']:.4f}), |shift| {m['mean_abs_shift']:.4f} (spread over t "
                  f"{m['shift_spread_over_t']:.4f})")


if __name__ == "__main__":
    main()
