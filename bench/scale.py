"""Scale-out on one machine: capture shards and SAE layers on 1 process against N worker processes.

    .venv/bin/python bench/scale.py [--config configs/tiny-pixart.toml] [--samples 256] [--workers 2] [--shard-size 16]

Two fresh warehouses of the same config (in a temporary folder): upstream assets first, untimed; then the
`activations` partitions (every capture shard) and then the `sae` partitions (every layer x site), timed,
serially in this process (torch on every core) and with `tide run --workers N` (a dask LocalCluster, torch
at cores/N threads a worker; the workers start and load the definitions before the clock starts, as a
long-lived cluster would). Checks that both stores are equal bit for bit. Prints each worker's peak RSS
after all shards (run it with twice the samples to see it flat: a worker holds one shard at a time), and
the cold ratio with the cluster's start-up included. Two baselines: the default serial run (torch on every
core) and one process at one worker's share of the cores (cores / N torch threads), which is what the
workers multiply; the last lines (sae_scaling=, capture_scaling=) are against the second, and the line
before them against the first. Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.project import REPO_ROOT, Project  # noqa: E402
from tests.conftest import dump_toml, merge  # noqa: E402

CAPTURE = "key:activations"
SAE = "key:sae"


def project_at(config: Path, root: Path, samples: int, shard_size: int = 16) -> Project:
    """The config with its warehouse under root and `samples` images in shards of `shard_size`, model dirs
    kept."""
    data = tomllib.loads(config.read_text())
    base = config.parent
    over = {"warehouse": {"root": str(root / "wh")}, "sampling": {"num_samples": samples, "shard_size": shard_size}}
    for section in ("digits", "tiny_pixart", "tiny_sd3", "tiny_flux"):
        ckpt = data.get("model", {}).get(section, {}).get("checkpoint_dir")
        if ckpt:
            over.setdefault("model", {})[section] = {"checkpoint_dir": str((base / ckpt).resolve())}
    if data.get("sampling", {}).get("prompts"):
        over["sampling"]["prompts"] = str((base / data["sampling"]["prompts"]).resolve())
    path = root / "tide.toml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(merge(data, over)))
    return Project.load(path)


def timed(project: Project, select: str, workers=None, threads: int | None = None) -> float:
    """Seconds to materialize ``select``; ``threads``: torch's intra-op threads for an in-process run."""
    import torch

    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.runner import materialize

    defs, instance = definitions_for(project), warehouse_instance(project)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    t0 = time.perf_counter()
    report = materialize(defs, instance, select=select, workers=workers, log=lambda m: None,
                         run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    seconds = time.perf_counter() - t0
    torch.set_num_threads(before)
    if not report.success:
        raise SystemExit(f"{select} failed in {project.root}")
    return seconds


def heldout_nmse(project: Project) -> list[float]:
    """Each SAE's held-out NMSE over all steps, in a fixed order: the quality the timed training bought."""
    from storage import Warehouse

    rows = Warehouse(project.duckdb_path).query(
        "SELECT nmse FROM v_sae_metrics WHERE split = 'heldout' AND step = -1 ORDER BY layer, site, variant")
    return rows.column(0).to_pylist()


def worker_peak_rss(workers) -> list[float]:
    return [v / 1024 for v in workers.client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "tiny-pixart.toml"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=16, help="samples per capture shard (each shard is one "
                   "Dagster run)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tide-scale-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    from pipelines.parallel import Workers
    from storage import ActivationStore

    serial, single, parallel = (project_at(Path(args.config), tmp / name, args.samples, args.shard_size)
                                for name in ("serial", "single", "parallel"))
    for project in (serial, single, parallel):  # the model, prompts and the store's layout: not measured
        timed(project, "+key:activation_store")
    print(f"config {args.config}: {args.samples} samples in {serial.num_shards} shards of {args.shard_size}, "
          f"layers {serial.config.capture.layers}, sites {serial.config.capture.sites}")

    import torch

    per_worker = max(1, torch.get_num_threads() // args.workers)
    t_serial = timed(serial, CAPTURE)
    t_single = timed(single, CAPTURE, threads=per_worker)  # one process with one worker's share of the cores
    t_cold = time.perf_counter()
    with Workers(parallel.config_path, args.workers) as workers:
        workers.warm()  # each worker loads the definitions once
        started = time.perf_counter() - t_cold
        t_parallel = timed(parallel, CAPTURE, workers)
        rss = worker_peak_rss(workers)
        a, b = ActivationStore.open(serial.store_url, "r"), ActivationStore.open(parallel.store_url, "r")
        same = all((a.read_samples(s, layer, 0, args.samples) == b.read_samples(s, layer, 0, args.samples)).all()
                   for s in a.layout.sites for layer in a.layout.layers)
        print(f"capture: serial {t_serial:.1f} s, {args.workers} workers {t_parallel:.1f} s "
              f"({args.samples / t_serial:.1f} vs {args.samples / t_parallel:.1f} samples/s); cluster start "
              f"{started:.1f} s; stores equal bit for bit: {same}")
        print(f"cold (cluster start included): {t_serial / (t_parallel + started):.2f}")
        print(f"one process at {per_worker} torch thread(s), a worker's share: {t_single:.1f} s; "
              f"{args.workers} workers against it: {t_single / t_parallel:.2f}")
        print(f"worker peak RSS after all {serial.num_shards} shards: {', '.join(f'{r:.0f} MB' for r in rss)}")
        for project in (serial, single, parallel):
            timed(project, "+key:samples")
        s_serial = timed(serial, SAE)
        s_single = timed(single, SAE, threads=per_worker)
        s_parallel = timed(parallel, SAE, workers)
    layers = len(serial.config.capture.layers) * len(serial.config.capture.sites)
    print(f"sae ({layers} layer x site partitions): serial {s_serial:.1f} s, at {per_worker} thread(s) "
          f"{s_single:.1f} s, {args.workers} workers {s_parallel:.1f} s")
    nmse = {p.root.parent.name: heldout_nmse(p) for p in (serial, single, parallel)}
    gap = max(abs(a - b) for a, b in zip(nmse["serial"], nmse["parallel"], strict=True))
    print(f"quality at the same budget: held-out NMSE of the {len(nmse['serial'])} SAEs, serial "
          f"{', '.join(f'{v:.4f}' for v in nmse['serial'])}; largest difference on the workers {gap:.1e}")
    print(f"against the default serial run (torch on every core): capture {t_serial / t_parallel:.2f}, "
          f"sae {s_serial / s_parallel:.2f}")
    print(f"sae_scaling={s_single / s_parallel:.2f}")
    print(f"capture_scaling={t_single / t_parallel:.2f}")


if __name__ == "__main__":
    main()
