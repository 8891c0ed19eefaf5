"""Feature statistics pass speed against the bare encoder matmul, and the top-images query at scale.

    .venv/bin/python bench/feature_stats.py [--config tide.toml] [--layer 3] [--variant tide] [--rows 10_500_000]

Needs the default run (`make run`). Part 1 runs the real statistics pass (pipelines.stages.features, dask
threads over the Zarr chunks) for one SAE twice and takes the faster, and times in the same run a bare
torch matmul of the encoder's shape ([chunk tokens, d] x [d, n_latents] + bias, all cores) on the same
chunks held in memory: that rate is the limit the pass is compared with. Part 2 builds a synthetic
warehouse (our schema, primary keys included) with >= --rows rows in top_images and in feature_stats and
times the top-20-images query of one feature, median over 50 random features: on an open read-only
connection, and through Warehouse.top_images (which opens its own connection and validates the ids).
Between the two, the per-chunk work is timed on one thread at widths 128, 512 and 1152 (random
activations) to show how the ratio depends on the model's width. Last line: stats_vs_matmul=<pass
tokens/s / matmul tokens/s> for the real pass on the default store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.context import RunContext  # noqa: E402
from pipelines.project import Project  # noqa: E402
from pipelines.stages import features  # noqa: E402
from storage import Warehouse, connect  # noqa: E402

SITE = "resid"


def pass_vs_matmul(project: Project, layer: int, variant: str) -> float:
    store, records = features.layer_saes(RunContext(project), layer, SITE)
    rec = next((r for r in records if r.variant == variant), None)
    if rec is None:
        raise SystemExit(f"no {variant} SAE for layer {layer}; have {[r.variant for r in records]}")
    sae = features.load_sae(rec, store)
    runs = [features.statistics_pass(store, sae, layer, SITE, project.config.features.top_n) for _ in range(2)]
    best = max(runs, key=lambda r: r.tokens_per_s)

    lay = store.layout
    chunks = [torch.from_numpy(store.read_block(SITE, layer, step, s)).view(-1, lay.d_model).float()
              for step in lay.steps[:8] for s in range(lay.num_shards)]
    w, b = sae.W_enc.detach(), sae.b_enc.detach()  # [n, d], [n]
    with torch.no_grad():
        for x in chunks[:4]:
            torch.addmm(b, x, w.t())
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for x in chunks:
                torch.addmm(b, x, w.t())  # [T, n]
            rates.append(sum(len(x) for x in chunks) / (time.perf_counter() - t0))
    matmul = statistics.median(rates)
    print(f"SAE {rec.sae_id}: {lay.num_shards} shards x {len(lay.steps)} steps, chunk {len(chunks[0])} tokens, "
          f"d={lay.d_model}, n_latents={sae.spec.n_latents}, k={sae.spec.k}, torch threads={torch.get_num_threads()}")
    print(f"statistics pass: {best.tokens:,} tokens in {best.seconds:.2f}s = {best.tokens_per_s:,.0f} tokens/s "
          f"(runs: {', '.join(f'{r.tokens_per_s:,.0f}' for r in runs)})")
    print(f"bare encoder matmul: {matmul:,.0f} tokens/s")
    return best.tokens_per_s / matmul


def width_scaling(widths: tuple[int, ...] = (128, 512, 1152), n_latents: int = 1024, k: int = 32) -> None:
    """The same per-chunk work (encode + statistics) against the bare matmul, one thread, on random
    activations of several widths: the matmul grows with d, top-k selection and the statistics do not,
    so the ratio depends on the DiT's width (1152 = DiT-XL/2)."""
    from tide_core.features import chunk_partial
    from tide_core.sae import SAESpec, SparseAutoencoder

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for d in widths:
            sae = SparseAutoencoder(SAESpec(d_in=d, n_latents=n_latents, k=k, variant="tide"), seed=0).eval()
            acts = np.random.default_rng(0).normal(size=(64, 64, d)).astype(np.float16)  # one chunk
            ids, cls = np.arange(64), np.arange(64) % 10
            x = torch.from_numpy(acts.astype(np.float32)).view(-1, d)
            w, b = sae.W_enc.detach(), sae.b_enc.detach()
            with torch.no_grad():
                chunk_partial(sae, acts, 0, 500, ids, cls, 10, 16)
                t0 = time.perf_counter()
                for _ in range(5):
                    chunk_partial(sae, acts, 0, 500, ids, cls, 10, 16)
                stats = 5 * len(x) / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                for _ in range(20):
                    torch.addmm(b, x, w.t())
                mm = 20 * len(x) / (time.perf_counter() - t0)
            print(f"one thread, d={d:>4}, n={n_latents}, k={k}: chunk statistics {stats:>9,.0f} tokens/s, "
                  f"matmul {mm:>10,.0f} tokens/s, ratio {stats / mm:.3f}")
    finally:
        torch.set_num_threads(before)


def query_at_scale(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.duckdb"
        wh = Warehouse(path)
        wh.init_schema()
        n_feat, top_n, steps = 16384, 16, 50
        n_sae = -(-rows // (n_feat * 2 * top_n))  # top_images rows per SAE: features x 2 scopes x top_n
        t0 = time.perf_counter()
        with connect(path, read_only=False) as con:
            for i in range(n_sae):
                sae = f"L{i:02d}-resid-tide-n{n_feat}-k32-synthetic"
                con.execute("INSERT INTO saes (sae_id, run_id, layer, site, variant, n_latents, k, path, tokens_seen) "
                            "VALUES (?, 'synthetic', ?, 'resid', 'tide', ?, 32, '', 0)",
                            [sae, i, n_feat])
                con.execute(
                    "INSERT INTO top_images SELECT ?, f, s, r, (f * 7 + r) % 512, r % 50, 1.0 / r, "
                    "list_transform(range(64), lambda x: (x * r % 13)::FLOAT), 8, 8 FROM range(?) t(f), "
                    "(VALUES ('overall'), ('peak_step')) v(s), range(1, ?) q(r)", [sae, n_feat, top_n + 1])
                con.execute("INSERT INTO features (sae_id, feature_id, fire_rate) SELECT ?, f, (f % 97) / 1000.0 "
                            "FROM range(?) t(f)", [sae, n_feat])
                con.execute("INSERT INTO feature_stats SELECT ?, f, st, (f % 97) / 1000.0, 1.0, 2.0, f % 10, 0.5 "
                            "FROM range(?) t(f), range(?) u(st)", [sae, n_feat, steps])
            counts = con.execute("SELECT (SELECT count(*) FROM top_images), (SELECT count(*) FROM feature_stats)"
                                 ).fetchone()
        print(f"synthetic warehouse: top_images {counts[0]:,} rows, feature_stats {counts[1]:,} rows "
              f"({n_sae} SAEs x {n_feat} features), built in {time.perf_counter() - t0:.0f}s, "
              f"{path.stat().st_size / 1e9:.2f} GB")
        rng = np.random.default_rng(0)
        picks = [(f"L{rng.integers(n_sae):02d}-resid-tide-n{n_feat}-k32-synthetic", int(rng.integers(n_feat)))
                 for _ in range(50)]
        sql = "SELECT * FROM v_top_images WHERE sae_id = ? AND feature_id = ? AND scope = 'overall' ORDER BY rank LIMIT 20"
        with connect(path, read_only=True) as con:
            con.execute(sql, list(picks[0])).fetchall()
            times = []
            for p in picks:
                t0 = time.perf_counter()
                got = con.execute(sql, list(p)).fetchall()
                times.append(time.perf_counter() - t0)
                assert len(got) == top_n
        helper = []
        for sae, f in picks[:20]:
            t0 = time.perf_counter()
            assert wh.top_images(sae, f, limit=20).num_rows == top_n
            helper.append(time.perf_counter() - t0)
        print(f"top-20 images of one feature: median {statistics.median(times) * 1e3:.1f} ms on an open connection "
              f"(max {max(times) * 1e3:.1f}); median {statistics.median(helper) * 1e3:.1f} ms through "
              "Warehouse.top_images (connect + id checks + query)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--variant", default="tide")
    p.add_argument("--rows", type=int, default=10_500_000)
    p.add_argument("--skip-query", action="store_true")
    p.add_argument("--skip-pass", action="store_true")
    args = p.parse_args()
    project = Project.load(args.config)
    ratio = pass_vs_matmul(project, args.layer, args.variant) if not args.skip_pass else float("nan")
    width_scaling()
    if not args.skip_query:
        query_at_scale(args.rows)
    print(f"stats_vs_matmul={ratio:.3f}")


if __name__ == "__main__":
    main()
