"""The `samples` and `runs` tables of a complete store, and the checks that guard the store's data."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import pyarrow as pa

from pipelines.context import RunContext
from pipelines.stages.capture import store_version
from storage import StoreError
from tide_core.factors import asked_accuracy
from tide_core.sampling import from_uint8


@dataclass(frozen=True)
class PublishedSamples:
    rows: int
    run_id: str
    judge_accuracy: float | None  # None: the family has no judge
    store_version: str


def publish_samples(ctx: RunContext) -> PublishedSamples:
    """Write the `runs` row and the `samples` rows of the store (replacing the run's old rows, in one
    transaction), with the judge's verdict on every image when the family has a judge."""
    store = ctx.store()
    missing = store.missing_shards()
    if missing:
        raise StoreError(f"shards {missing} are not complete: materialize their `activations` partitions")
    prov = store.provenance
    run_id = prov["run_id"]
    meta = store.samples()
    n = store.layout.num_samples
    names = prov.get("class_names", [])
    prompt_ids = [p["prompt_id"] for p in prov.get("prompts", [])]  # by condition index; [] for class runs
    class_id = meta["class_id"].astype(np.int32)
    pred = conf = accuracy = None
    if ctx.judge is not None:
        verdict = ctx.judge.judge(from_uint8(store.images()))
        pred, conf = verdict.pred.astype(np.int32), verdict.confidence.astype(np.float64)
        want = ctx.family.judge_class.asked_classes([str(c) for c in names])[class_id]  # [n]
        accuracy = asked_accuracy(pred, want)
    rows = pa.table({
        "run_id": pa.array([run_id] * n),
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "class_id": pa.array(class_id),
        "class_name": pa.array([names[c] if c < len(names) else str(c) for c in class_id]),
        "prompt_id": pa.array([prompt_ids[c] for c in class_id], type=pa.string()) if prompt_ids
        else pa.nulls(n, pa.string()),
        "seed": pa.array(meta["seed"].astype(np.int64)),
        "shard": pa.array((np.arange(n) // store.layout.shard_size).astype(np.int32)),
        "judge_pred": pa.array(pred, type=pa.int32()) if pred is not None else pa.nulls(n, pa.int32()),
        "judge_conf": pa.array(conf, type=pa.float64()) if conf is not None else pa.nulls(n, pa.float64()),
    })
    with ctx.warehouse.transaction() as tx:
        # judge_classes: what judge_pred means (a digit), which for a text run is not a prompt index
        judge = ctx.family.judge_class
        tx.upsert_run(run_id, {"config": ctx.config.model_dump(mode="json"), "store_url": store.url,
                               "judge_classes": list(judge.class_names) if judge is not None else None},
                      code_version=prov.get("code_version", ""), model_source=prov["model"]["source"],
                      model_hash=prov["model"]["config_hash"])
        tx.replace_partition("samples", {"run_id": run_id}, rows)
        tx.replace_partition("steps", {"run_id": run_id}, step_rows(prov, store.layout.steps))
    return PublishedSamples(rows=n, run_id=run_id, judge_accuracy=accuracy, store_version=store_version(store))


def step_rows(prov: dict, steps: list[int]) -> pa.Table:
    """The `steps` rows of a store: each captured step's timestep and the model's own time value."""
    timesteps = prov["capture_timesteps"]  # one per captured step, in the order of steps
    kind = prov["model"].get("time", {}).get("kind", "discrete")
    model_time = prov["capture_sigmas"] if kind == "flow" else [float(t) for t in timesteps]
    n = len(timesteps)
    return pa.table({"run_id": pa.array([prov["run_id"]] * n), "step": pa.array(steps, pa.int32()),
                     "timestep": pa.array(timesteps, pa.int32()), "model_time": pa.array(model_time, pa.float64()),
                     "time_kind": pa.array([kind] * n)})


def count_nonfinite(ctx: RunContext) -> dict[str, int]:
    """Non-finite values per (site, layer) array, over completed shards that hold activations (dask, chunk by
    chunk)."""
    store = ctx.store()
    done = store.act_shards()
    sh = store.layout.shard_size
    out = {}
    for site in store.layout.sites:
        for layer in store.layout.layers:
            x = store.dask(site, layer)
            parts = [x[:, s * sh:(s + 1) * sh] for s in done]
            out[f"{site}/layer_{layer:02d}"] = int(sum((~da.isfinite(p)).sum().compute() for p in parts))
    return out


def shape_problems(ctx: RunContext) -> list[str]:
    """Differences between the arrays on disk and what the store's layout promises."""
    store = ctx.store()
    lay = store.layout
    problems = []
    for site in lay.sites:
        want = (len(lay.steps), lay.num_samples, lay.tokens_of(site), lay.d_model)
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
