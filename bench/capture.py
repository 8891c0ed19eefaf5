"""Capture overhead: sample the same seeds with capture off and on, in one process.

    .venv/bin/python bench/capture.py [--samples 128] [--repeats 2] [--config tide.toml]

Prints the wall-time ratio (on / off), the MB/s the store path writes (raw activation bytes / time
the writer thread was busy) against a plain numpy write of the same bytes to the same disk, and the
peak RSS of a capture run with N and 2N samples (separate processes) to show memory stays flat.
Last line: capture_overhead=<ratio>.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.project import Project  # noqa: E402


def prompts_of(project: Project):
    """The prompt set of a text-conditional config (None for a class-conditional one)."""
    from tide_core.prompts import read_prompt_file

    path = project.config.sampling.prompts
    return read_prompt_file(path) if path else None


def load(project: Project):
    from tide_core.models.registry import ModelError, family_of, load_model

    cfg = project.config
    prompts = prompts_of(project)
    try:
        if cfg.model.source == "tiny-pixart":  # built here in seconds, like `dit_model` would
            family_of(cfg.model).prepare(cfg.model, log=print)
        return load_model(cfg.model, prompts, cfg.sampling.negative_prompt)
    except ModelError:  # timing does not depend on the weights: use a fresh model of the same shape
        from tide_core.digits import CLASS_NAMES
        from tide_core.models.digits import DigitsDiT
        from tide_core.train_dit import build_digits_dit, digits_scheduler_config

        d = project.config.model.digits
        print("(no trained checkpoint: timing a freshly initialised DiT of the same architecture)")
        return DigitsDiT(build_digits_dit(d).eval().requires_grad_(False), digits_scheduler_config(d),
                         source="digits", fingerprint=d.fingerprint(), class_names=list(CLASS_NAMES))


def sampler_of(project: Project, model):
    from tide_core.sampling import Sampler

    s = project.config.sampling
    return Sampler(model, s.scheduler, s.num_steps, s.guidance_scale, s.seed)


def run_capture(project: Project, model, n: int, store_dir: Path):
    from pipelines.stages.capture import capture_shard, plan_for
    from storage import ActivationStore

    project.config.sampling.num_samples = n
    plan = plan_for(project.config, model, sampler_of(project, model), prompts_of(project))
    store = ActivationStore.create(str(store_dir), plan.layout, plan.provenance, overwrite=True)
    t0 = time.perf_counter()
    stats = [capture_shard(store, plan, s) for s in range(plan.layout.num_shards)]
    return time.perf_counter() - t0, stats


def run_plain(project: Project, model, n: int) -> float:
    from tide_core.sampling import condition_for

    s = project.config.sampling
    sampler = sampler_of(project, model)
    t0 = time.perf_counter()
    for i in range(0, n, s.batch_size):
        ids = list(range(i, min(n, i + s.batch_size)))
        sampler.sample(ids, [condition_for(j, list(range(len(model.condition_names)))) for j in ids])
    return time.perf_counter() - t0


def write_rates(store_dir: Path, tmp: str) -> tuple[float, float, int]:
    """Standalone MB/s of (a) the store's write_step and (b) numpy tofile, on the same blocks and disk.

    Reads shard 0 of a captured store back into memory, then writes it step by step into a fresh store
    with the same layout and, separately, as one .npy file per (layer, step) block; three alternating
    rounds, medians. Returns both rates and the bytes written.
    """
    from storage import ActivationStore

    src = ActivationStore.open(str(store_dir), mode="r")
    lay = src.layout
    rng = lay.shard_range(0)
    blocks = {(site, layer): src.read_samples(site, layer, rng.start, rng.stop)  # [S, n, P, D]
              for site in lay.sites for layer in lay.layers}
    nbytes = sum(b.nbytes for b in blocks.values())
    store_rates, numpy_rates = [], []
    for _ in range(3):  # alternate, flushing dirty pages first, so neither side pays the other's writeback
        with tempfile.TemporaryDirectory(dir=tmp) as d:
            dst = ActivationStore.create(f"{d}/copy.zarr", lay, src.provenance)
            os.sync()
            t0 = time.perf_counter()
            for i, step in enumerate(lay.steps):
                dst.write_step(0, step, {k: b[i] for k, b in blocks.items()}, None)
            store_rates.append(nbytes / 1e6 / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory(dir=tmp) as d:
            os.sync()
            t0 = time.perf_counter()
            for (site, layer), b in blocks.items():
                for i in range(len(lay.steps)):
                    b[i].tofile(f"{d}/{site}_{layer}_{i}.npy")
            numpy_rates.append(nbytes / 1e6 / (time.perf_counter() - t0))
    store_rate, numpy_rate = sorted(store_rates)[1], sorted(numpy_rates)[1]  # medians
    return store_rate, numpy_rate, nbytes


def child(args) -> None:
    """Run one capture of args.samples samples and print peak RSS (MB) as JSON."""
    project = Project.load(args.config)
    model = load(project)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        run_capture(project, model, args.samples, Path(d) / "acts.zarr")
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tmp", default=None, help="directory on the disk to measure (default: ./bench/out)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tmp = args.tmp or str(Path(__file__).parent / "out")
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    project = Project.load(args.config)
    import torch

    model = load(project)
    c = project.config
    print(f"model {c.model.source}: {model.num_layers} layers, d={model.hidden_size}; torch threads "
          f"{torch.get_num_threads()}; {args.samples} samples x {c.sampling.num_steps} steps, guidance "
          f"{c.sampling.guidance_scale}, capture layers {c.capture.layers} sites {c.capture.sites}")
    off, on, busy, raw = [], [], [], 0
    for r in range(args.repeats):
        off.append(run_plain(project, model, args.samples))
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            t, stats = run_capture(project, model, args.samples, Path(d) / "acts.zarr")
            if r == 0:
                store_rate, numpy_rate, block_bytes = write_rates(Path(d) / "acts.zarr", args.tmp)
        on.append(t)
        busy.append(sum(s.extra["writer_busy_seconds"] for s in stats))
        raw = sum(s.raw_bytes for s in stats)
        print(f"  repeat {r}: off {off[-1]:.1f}s  on {on[-1]:.1f}s")
    ratio = min(on) / min(off)
    overlapped_rate = raw / 1e6 / min(busy)
    rss = {}
    for n in (args.samples // 2, args.samples):
        out = subprocess.run([sys.executable, __file__, "--child", "--samples", str(n), "--tmp", args.tmp]
                             + (["--config", args.config] if args.config else []),
                             capture_output=True, text=True, check=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    rows = [
        ("sampling, capture off (s)", f"{min(off):.2f}"),
        ("sampling, capture on + write (s)", f"{min(on):.2f}"),
        ("capture overhead (on / off)", f"{ratio:.3f}"),
        ("activation bytes written (MB)", f"{raw / 1e6:.1f}"),
        ("end-to-end write rate (MB/s of wall time)", f"{raw / 1e6 / min(on):.1f}"),
        ("writer thread rate during sampling (MB/s of busy time)", f"{overlapped_rate:.1f}"),
        (f"store write_step, standalone (MB/s, {block_bytes / 1e6:.0f} MB)", f"{store_rate:.1f}"),
        ("plain numpy tofile of the same blocks (MB/s)", f"{numpy_rate:.1f}"),
        ("store / plain write", f"{store_rate / numpy_rate:.3f}"),
        *[(f"peak RSS, {n} samples (MB)", f"{v:.0f}") for n, v in rss.items()],
        ("peak RSS ratio (2N / N)", f"{rss[args.samples] / rss[args.samples // 2]:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"capture_overhead={ratio:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
