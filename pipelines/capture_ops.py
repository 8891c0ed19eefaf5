"""Capture-stage operations behind the assets: create the store, write a shard, summarise, check."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.project import Project, code_version, content_key
from storage.activation_store import ActivationStore, ShardStats


def run_id_of(provenance: dict) -> str:
    """A run's id: hash of what determines its data (model, sampling, capture), not when it ran."""
    return content_key({k: v for k, v in provenance.items() if k not in ("code_version", "created_at", "run_id")})


def capture_plan(project: Project):
    """The capture plan (sampler, hooks spec, store layout, provenance) of the configured model."""
    from pipelines.capture_run import make_plan
    from tide_core.dit import load_model

    bundle = load_model(project.config.model, project.base_dir)
    plan = make_plan(project.config, bundle, code_version=code_version())
    plan.provenance["run_id"] = run_id_of(plan.provenance)
    return plan


def create_store(project: Project, overwrite: bool = False) -> ActivationStore:
    """Create the store's arrays (or check an existing one matches the config) before any shard runs."""
    plan = capture_plan(project)
    return ActivationStore.create(project.store_url, plan.layout, plan.provenance, overwrite=overwrite)


@dataclass(frozen=True)
class ShardReport:
    stats: ShardStats
    stored_bytes: int
    images: object  # uint8 [n, H, W, C]

    @property
    def compression_ratio(self) -> float:
        return self.stats.raw_bytes / max(1, self.stored_bytes)


def write_shard(project: Project, shard: int) -> ShardReport:
    from pipelines.capture_run import capture_shard

    plan = capture_plan(project)
    store = ActivationStore.open(project.store_url)
    store.check_matches(plan.layout, plan.provenance)
    stats = capture_shard(store, plan, shard)
    rng = store.layout.shard_range(shard)
    return ShardReport(stats=stats, stored_bytes=store.shard_stored_bytes(shard),
                       images=store.images(rng.start, rng.stop))


def open_store(project: Project) -> ActivationStore:
    return ActivationStore.open(project.store_url, mode="r")


def count_nonfinite(project: Project) -> dict[str, int]:
    """Non-finite values per (site, layer) array, over completed shards (dask, chunk by chunk)."""
    import dask.array as da

    store = open_store(project)
    done = store.done_shards()
    out = {}
    for site in store.layout.sites:
        for layer in store.layout.layers:
            x = store.dask(site, layer)
            sh = store.layout.shard_size
            parts = [x[:, s * sh:(s + 1) * sh] for s in done]
            out[f"{site}/layer_{layer:02d}"] = int(sum((~da.isfinite(p)).sum().compute() for p in parts))
    return out


def shape_problems(project: Project) -> list[str]:
    """Differences between the arrays on disk and what the store's layout promises."""
    store = open_store(project)
    lay = store.layout
    want = (len(lay.steps), lay.num_samples, lay.tokens_stored, lay.d_model)
    problems = []
    for site in lay.sites:
        for layer in lay.layers:
            got = store.array(site, layer).shape
            if tuple(got) != want:
                problems.append(f"{site}/layer_{layer:02d}: {got} != {want}")
    if len(store.provenance.get("capture_timesteps", [])) != len(lay.steps):
        problems.append("capture_timesteps does not list one timestep per captured step")
    img = store.group["samples/images"].shape
    if tuple(img) != (lay.num_samples, *lay.image_shape):
        problems.append(f"samples/images: {img} != {(lay.num_samples, *lay.image_shape)}")
    return problems


@dataclass(frozen=True)
class PublishedSamples:
    rows: int
    run_id: str
    path: object
    judge_accuracy: float | None


def publish_samples(project: Project) -> PublishedSamples:
    """Write the `runs` row and the `samples` rows of this store (replacing the run's old rows)."""
    import numpy as np
    import pyarrow as pa

    from storage.warehouse import Warehouse

    store = open_store(project)
    missing = store.missing_shards()
    if missing:
        raise RuntimeError(f"shards {missing} are not complete: materialize their `activations` partitions")
    prov = store.provenance
    run_id = prov["run_id"]
    meta = store.samples()
    n = store.layout.num_samples
    names = prov.get("class_names", [])
    class_id = meta["class_id"].astype(np.int32)
    pred = conf = None
    accuracy = None
    if project.config.model.source == "digits" and (project.judge_dir / "judge.safetensors").exists():
        from tide_core.judge import judge_images, load_judge
        from tide_core.sampling import from_uint8

        verdict = judge_images(load_judge(project.judge_dir), from_uint8(store.images()))
        pred, conf = verdict.pred.astype(np.int32), verdict.confidence.astype(np.float64)
        accuracy = float((pred == class_id).mean())
    rows = pa.table({
        "run_id": pa.array([run_id] * n),
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "class_id": pa.array(class_id),
        "class_name": pa.array([names[c] if c < len(names) else str(c) for c in class_id]),
        "seed": pa.array(meta["seed"].astype(np.int64)),
        "shard": pa.array((np.arange(n) // store.layout.shard_size).astype(np.int32)),
        "judge_pred": pa.array(pred, type=pa.int32()) if pred is not None else pa.nulls(n, pa.int32()),
        "judge_conf": pa.array(conf, type=pa.float64()) if conf is not None else pa.nulls(n, pa.float64()),
    })
    wh = Warehouse(project.duckdb_path)
    wh.init_schema()
    wh.upsert_run(run_id, {"config": project.config.model_dump(mode="json"), "store_url": store.url},
                  code_version=prov.get("code_version", ""), model_source=prov["model"]["source"],
                  model_hash=prov["model"]["config_hash"])
    wh.replace_partition("samples", {"run_id": run_id}, rows)
    return PublishedSamples(rows=n, run_id=run_id, path=project.duckdb_path, judge_accuracy=accuracy)
