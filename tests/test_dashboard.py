"""The dashboard site builder and server, on a warehouse filled with synthetic rows (no torch, fast).

The browser tests (tests/test_dashboard_browser.py) drive the same site in headless Chromium on a
warehouse filled by the real feature pass; here the builder's contract is checked on data whose
every value is known, including hostile labels and class names.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dashboards import server
from dashboards.png import downscale, encode_png
from dashboards.site import ASSETS, CHUNK, PAGES, STATIC_DIR, DashboardError, build_site
from storage import ActivationStore, ShardStats, StoreLayout, Warehouse

EVIL = '<img src=x onerror="alert(1)"><script>alert(2)</script>&amp;'


def fill_synthetic(root: Path, *, n_latents: int = 40, n_samples: int = 24, n_steps: int = 4, grid: int = 4,
                   top_n: int = 4, class_names: list[str] | None = None, label: str | None = EVIL,
                   images: bool = True, variants: tuple[str, ...] = ("tide", "topk"), seed: int = 0) -> Path:
    """A warehouse (and activation store with images) under ``root`` with every table the dashboard reads.

    Feature ``f`` peaks at step ``f % n_steps`` and prefers class ``f % n_classes``; feature 0 of each SAE
    carries ``label``; features with id % 7 == 6 are dead (never fire, no top images). Returns the
    warehouse file's path.
    """
    rng = np.random.default_rng(seed)
    names = class_names or [str(c) for c in range(3)]
    n_classes = len(names)
    run_id = "run0"
    store_url = str(root / "activations.zarr")
    if images:
        layout = StoreLayout(num_samples=n_samples, shard_size=8, steps=list(range(n_steps)), layers=[0], sites=["resid"],
                             tokens_total=grid * grid, tokens_stored=grid * grid, token_grid=[grid, grid], d_model=4,
                             image_shape=[8, 8, 1])
        store = ActivationStore.create(store_url, layout, {"capture_timesteps": [999 - 250 * s for s in range(n_steps)]})
        for shard in range(layout.num_shards):
            rng_ = layout.shard_range(shard)
            # image i: a bright square whose position depends on i (so every image differs, none is blank)
            imgs = np.zeros((len(rng_), 8, 8, 1), np.uint8)
            for j, i in enumerate(rng_):
                imgs[j, i % 5:(i % 5) + 3, (i // 5) % 5:(i // 5) % 5 + 3] = 200 + i % 50
            store.write_samples(shard, imgs, np.array([i % n_classes for i in rng_]), np.array(list(rng_)))
            store.mark_done(shard, ShardStats(shard=shard, samples=len(rng_)))
    wh = Warehouse(root / "warehouse.duckdb")
    wh.upsert_run(run_id, {"config": {"sampling": {"scheduler": "ddim", "num_steps": n_steps, "guidance_scale": 2.0},
                                      "capture": {"layers": [0], "sites": ["resid"]},
                                      "sae": {"variants": list(variants), "spec": {"n_latents": n_latents, "k": 4}}},
                           "store_url": store_url}, model_source="synthetic")
    wh.replace_partition("samples", {"run_id": run_id}, {
        "sample_id": list(range(n_samples)), "class_id": [i % n_classes for i in range(n_samples)],
        "class_name": [names[i % n_classes] for i in range(n_samples)], "seed": list(range(n_samples)),
        "shard": [i // 8 for i in range(n_samples)], "judge_pred": [i % n_classes for i in range(n_samples)],
        "judge_conf": [0.9] * n_samples})
    steps = np.arange(n_steps)
    fids = np.arange(n_latents)
    dead = fids % 7 == 6
    for v, variant in enumerate(variants):
        sae_id = f"L00-resid-{variant}-n{n_latents}"
        wh.replace_partition("saes", {"sae_id": sae_id}, [{
            "run_id": run_id, "layer": 0, "site": "resid", "variant": variant, "n_latents": n_latents, "k": 4,
            "tokens_seen": 1000}])
        metric_rows = []
        for split in ("train", "heldout"):
            for step in [-1, *steps.tolist()]:
                metric_rows.append({"split": split, "step": step, "mse": 0.1, "nmse": 0.05 + 0.01 * v + 0.002 * step,
                                    "cosine": 0.98, "explained_variance": 0.95, "l0": 4.0,
                                    "dead_fraction": 0.1 + 0.05 * v, "dense_fraction": 0.0})
        wh.replace_partition("sae_metrics", {"sae_id": sae_id}, metric_rows)
        fire = np.where(dead, 0.0, rng.uniform(0.001, 0.2, n_latents))
        wh.replace_partition("features", {"sae_id": sae_id}, {
            "feature_id": fids, "fire_rate": fire, "mean_act": np.where(dead, np.nan, rng.uniform(0.5, 3, n_latents)),
            "max_act": np.where(dead, 0.0, rng.uniform(3, 9, n_latents)),
            "peak_step": np.where(dead, -1, fids % n_steps).tolist(),
            "top_class": [None if d else int(f % n_classes) for f, d in zip(fids, dead, strict=True)],
            "class_selectivity": np.where(dead, 0.0, (fids % 10) / 10),
            "label": [label if f == 0 else None for f in fids],
            "histogram": [[0, 0, 3, 5, 2, 0] if not d else [0] * 6 for d in dead],
            "histogram_edges": [[0.1, 0.3, 1, 3, 10, 30, 100]] * n_latents})
        fs_f, fs_s = np.meshgrid(fids, steps, indexing="ij")
        bump = np.exp(-((fs_s - fs_f % n_steps) ** 2))
        wh.replace_partition("feature_stats", {"sae_id": sae_id}, {
            "feature_id": fs_f.ravel(), "step": fs_s.ravel(), "fire_rate": (bump * fire[:, None]).ravel(),
            "mean_act": (1 + bump).ravel(), "max_act": (3 + bump).ravel()})
        fc_f, fc_c = np.meshgrid(fids, np.arange(n_classes), indexing="ij")
        concept_rate = np.where(fc_c == fc_f % n_classes, 0.3, 0.05).ravel()
        wh.replace_partition("feature_concepts", {"sae_id": sae_id}, {
            "feature_id": fc_f.ravel(), "concept": [names[c] for c in fc_c.ravel()], "kind": ["class"] * fc_f.size,
            "images": np.full(fc_f.size, n_samples // n_classes), "fire_rate": concept_rate,
            "mean_act": np.ones(fc_f.size), "lift": concept_rate / 0.1})
        live = fids[~dead]
        rows = {k: [] for k in ("feature_id", "scope", "rank", "sample_id", "step", "activation", "heatmap",
                                "grid_h", "grid_w")}
        for f in live.tolist():
            for scope in ("overall", "peak_step"):
                for rank in range(1, top_n + 1):
                    heat = np.zeros(grid * grid, np.float32)
                    heat[(f + rank) % (grid * grid)] = 5.0 - rank * 0.5
                    heat[(f * 3) % (grid * grid)] = 1.0
                    for k, val in zip(rows, (f, scope, rank, (f * 5 + rank * 3) % n_samples,
                                             f % n_steps if scope == "peak_step" else rank % n_steps,
                                             float(heat.max()), heat.tolist(), grid, grid), strict=True):
                        rows[k].append(val)
        wh.replace_partition("top_images", {"sae_id": sae_id}, rows)
        nb_f = np.repeat(fids, 3)
        wh.replace_partition("feature_neighbors", {"sae_id": sae_id}, {
            "feature_id": nb_f, "rank": np.tile([1, 2, 3], n_latents),
            "neighbor_id": (nb_f + np.tile([1, 2, 3], n_latents)) % n_latents,
            "cosine": np.tile([0.9, 0.8, 0.7], n_latents)})
    return wh.path


def read(site: Path, rel: str):
    return json.loads((site / rel).read_text())


def test_png_encoder_round_trips_through_pillow():
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    for img in (rgb, grey, grey[..., None]):
        import io

        back = np.asarray(Image.open(io.BytesIO(encode_png(img))))
        assert np.array_equal(back.reshape(img.shape), img)
    assert downscale(np.zeros((512, 256, 3), np.uint8), 256).shape == (256, 128, 3)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))


def test_json_numbers_round_one_way_whether_one_value_or_a_column():
    """The vectorised rounding of whole columns gives exactly what one value's rounding gives, ties and
    exponents past 10**22 included."""
    from dashboards.writer import SIG_DIGITS, json_column, json_number, round_sig

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.uniform(-1, 1, 20_000),
        rng.choice([-1, 1], 20_000) * 10 ** rng.uniform(-40, 40, 20_000),  # far past 10**±22
        (rng.integers(0, 10**6, 20_000) + 0.5) / 10.0 ** rng.integers(0, 12, 20_000),  # decimal ties
        [0.0, 1.0, 123455.0, 0.123455, 9.99995, 1e-300, 5e-324],
    ])
    expected = [float(f"{v:.{SIG_DIGITS}g}") for v in values.tolist()]
    assert round_sig(values).tolist() == expected
    assert [json_number(v) for v in values.tolist()] == expected
    col = pa.chunked_array([pa.array([*values[:5].tolist(), float("nan"), None, float("inf")], pa.float64())])
    assert json_column(col) == [*expected[:5], None, None, None]
    big = pa.chunked_array([pa.array([2**53 + 1, -3, None], pa.int64())])
    assert json_column(big) == [str(2**53 + 1), -3, None]  # exact: a NULL does not send ints through floats


def test_sample_grid_takes_each_class_in_turn():
    """The overview's grid, from the samples already read: the first sample of every class, then the
    second, ... (what `row_number() OVER (PARTITION BY class_id ORDER BY sample_id)` would give)."""
    from dashboards.runs import _sample_grid

    classes = [2, 2, 2, 0, 1, 1, 2, 0]
    samples = pa.table({"sample_id": list(range(8)), "class_id": classes,
                        "class_name": [f"c{c}" for c in classes], "seed": list(range(8))})
    assert [r["sample_id"] for r in _sample_grid(samples, 40)] == [3, 4, 0, 7, 5, 1, 2, 6]
    assert _sample_grid(samples, 2) == [{"sample_id": 3, "class_id": 0, "class_name": "c0"},
                                        {"sample_id": 4, "class_id": 1, "class_name": "c1"}]


def test_site_holds_every_page_and_escapes_nothing_into_html(tmp_path):
    db = fill_synthetic(tmp_path, class_names=["zero", EVIL, "two"])
    report = build_site(db, tmp_path / "dashboard", log=lambda m: None)
    site = report.out_dir
    assert report.n_saes == 2 and report.n_features == 80 and report.n_images == 24 and not report.warnings
    assert sorted([*ASSETS, "shell.html"]) == sorted(p.name for p in STATIC_DIR.iterdir())  # nothing left behind
    for name in ASSETS:
        assert (site / name).read_bytes() == (STATIC_DIR / name).read_bytes()
    for name, (page, title) in PAGES.items():  # one shell each, naming the page app.js renders
        assert f'<body data-page="{page}">' in (site / name).read_text() and f"TIDE · {title}" in (site / name).read_text()
    # the pages are static shells: no warehouse value is ever written into HTML; each loads the scripts
    # in the order they build on each other
    for page in site.glob("*.html"):
        assert "alert" not in page.read_text() and "onerror" not in page.read_text()
        assert re.findall(r'<script src="([^"]+)"', page.read_text()) == ["dom.js", "charts.js", "findings.js", "app.js"]
    meta = read(site, "data/site.json")
    assert [s["variant"] for s in meta["saes"]] == ["tide", "topk"]
    tide = meta["saes"][0]
    assert tide["metrics"]["heldout"]["steps"] == [0, 1, 2, 3]
    assert tide["metrics"]["heldout"]["values"]["live_features"] == [36] * 4  # 40 * (1 - 0.1)
    assert meta["runs"][0]["timesteps"] == [999, 749, 499, 249]
    assert EVIL in {c["class_name"] for c in meta["runs"][0]["classes"]}  # kept as data, rendered as text
    listing = read(site, f"data/sae/{tide['slug']}/features.json")
    assert listing["n"] == 40 and listing["columns"]["label"][0] == EVIL
    assert listing["columns"]["top_sample"][6] is None  # a dead feature has no top image
    assert listing["columns"]["mean_act"][6] is None  # NaN becomes null, not invalid JSON
    chunk = read(site, f"data/sae/{tide['slug']}/f/{9 // CHUNK}.json")
    f9 = chunk["features"]["9"]
    assert f9["steps"]["step"] == [0, 1, 2, 3] and f9["stats"]["peak_step"] == 1
    assert f9["hist"] == {"counts": [3, 5, 2], "edges": [1, 3, 10, 30]}  # empty end bins trimmed
    assert f9["grid"] == [4, 4] and f9["top"]["overall"]["rank"] == [1, 2, 3, 4]
    assert f9["top"]["peak_step"]["step"] == [1] * 4 and f9["concepts"]["concept"][0] == "zero"
    assert sorted(f9["concepts"]["concept"]) == sorted(["zero", EVIL, "two"]) and f9["concepts"]["kind"] == ["class"] * 3
    heat = np.frombuffer(__import__("base64").b64decode(f9["top"]["overall"]["heat"][0]), np.uint8)
    assert heat.max() == 255 and heat[(9 + 1) % 16] == 255  # scaled by the feature's largest patch
    assert f9["neighbors"]["neighbor_id"] == [10, 11, 12] and f9["neighbors"]["cosine"] == [0.9, 0.8, 0.7]
    samples = read(site, f"data/samples/{meta['runs'][0]['slug']}/0.json")["samples"]
    assert [1, 1, 1, 4.5] in samples["8"]["top"][tide["sae_id"]]  # feature 1's rank 1: (1*5 + 1*3) % 24 == 8
    png = (site / "img" / meta["runs"][0]["slug"] / "3.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_rebuild_replaces_the_site_whole_and_missing_inputs_fail_clearly(tmp_path):
    with pytest.raises(DashboardError, match="no warehouse"):
        build_site(tmp_path / "none.duckdb", tmp_path / "d", log=lambda m: None)
    db = fill_synthetic(tmp_path, images=False)
    out = tmp_path / "dashboard"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    report = build_site(db, out, log=lambda m: None)
    assert not (out / "stale.json").exists()
    assert report.n_images == 0 and "images unavailable" in report.warnings[0]
    assert not read(out, "data/site.json")["runs"][0]["image"]["available"]
    assert not list(tmp_path.glob(".dashboard.*"))  # no build folders left behind


def test_a_failed_build_keeps_the_old_site(tmp_path, monkeypatch):
    from dashboards import site as site_mod

    db = fill_synthetic(tmp_path, n_latents=8, images=False)
    out = build_site(db, log=lambda m: None).out_dir
    before = read(out, "data/site.json")["built_at"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(site_mod, "write_feature_chunks", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_site(db, log=lambda m: None)
    assert read(out, "data/site.json")["built_at"] == before and (out / "index.html").exists()
    assert not list(tmp_path.glob(".dashboard.*"))


def test_server_serves_the_site_on_localhost_only(tmp_path):
    db = fill_synthetic(tmp_path, n_latents=8, images=False)
    site = build_site(db, log=lambda m: None).out_dir
    assert site == tmp_path / "dashboard"
    with server.start(site) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(srv.url + "data/site.json") as r:
            assert r.headers["Content-Type"] == "application/json" and json.load(r)["version"] == 1
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(srv.url + "data/nothing.json")
    with pytest.raises(FileNotFoundError, match="tide dashboard --build"):
        server.make_server(tmp_path / "elsewhere")


def test_edit_images_are_copied_from_inside_the_warehouse_root_only(tmp_path):
    """Each edit row's before/after PNGs land under img/edits/; a missing file or a path that leaves the
    warehouse root is not followed (the row shows no image and the build warns once)."""
    from dashboards.edits import write_edits
    from dashboards.writer import SiteWriter

    root = tmp_path / "wh"
    (root / "edits" / "e1").mkdir(parents=True)
    png = encode_png(np.full((4, 4, 3), 7, np.uint8))
    for name in ("0-before.png", "0-after.png", "1-before.png"):
        (root / "edits" / "e1" / name).write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)  # outside the root
    base = {"edit_id": "e1", "sae_id": "S", "op": "add", "feature_ids": [3, 5], "strength": 2.0, "step_start": 0,
            "step_end": 1, "config_json": json.dumps({"cfg_renorm": 1.0, "sampler": {"num_steps": 2}}),
            "pred_before": 1, "pred_after": 2, "flipped": True}
    rows = [base | {"sample_id": 0, "image_before": "edits/e1/0-before.png", "image_after": "edits/e1/0-after.png"},
            base | {"sample_id": 1, "image_before": "edits/e1/1-before.png", "image_after": "edits/e1/1-after.png"},
            base | {"sample_id": 2, "image_before": "../secret.png", "image_after": None}]
    w = SiteWriter(tmp_path / "site")
    out = write_edits(w, rows, root)
    assert out.n_edits == 1 and out.n_images == 3
    assert (tmp_path / "site" / "img" / "edits" / "e1" / "0-after.png").read_bytes() == png
    assert not list((tmp_path / "site").rglob("secret.png"))
    assert len(out.warnings) == 1 and "2 edit image(s)" in out.warnings[0]  # 1-after missing, ../secret refused
    doc = read(tmp_path / "site", "data/edits.json")["edits"][0]
    assert (doc["cfg_renorm"], doc["feature_ids"], doc["sampler"]) == (1.0, [3, 5], {"num_steps": 2})
    assert [(r["img_before"], r["img_after"]) for r in doc["rows"]] == [
        ("img/edits/e1/0-before.png", "img/edits/e1/0-after.png"), ("img/edits/e1/1-before.png", None), (None, None)]
    assert [e["img_after"] for e in out.by_feature["S", 5]] == ["img/edits/e1/0-after.png", None, None]
