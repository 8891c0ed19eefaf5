"""The edits on the site: every edit's before/after images, the edits page's data and each feature's share.

``v_edits`` rows name their images relative to the warehouse root (``edits/<edit_id>/<sample>-before.png``;
rows written before the images were kept name none). The images are copied to ``img/<that path>``, so the
site stays one folder a static server (or a zip) can carry. A row's path is data from the warehouse: only a
path inside the warehouse root is followed, never ``..`` or an absolute path.

* ``data/edits.json``: one entry per edit (its SAE, op, features, strength, steps, target class or concept,
  sampler settings) with one row per sample: the judge's verdict before and after and the two images; the edits page.
* ``EditsSite.by_feature``: the rows each feature page's steering preview shows (an edit of several
  features under each), with the same image paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboards.data import json_object
from dashboards.saes import EditsByFeature
from dashboards.writer import SiteWriter, json_value

# The columns each sample row keeps on the site (the edit's own columns go once, into its entry).
_ROW_COLS = ("sample_id", "run_id", "class_id", "class_name", "reference_id", "pred_before", "conf_before",
             "pred_after", "conf_after", "flipped", "concept_before", "concept_after")


@dataclass
class EditsSite:
    """What writing the edits gave the rest of the build."""

    by_feature: EditsByFeature = field(default_factory=dict)
    n_edits: int = 0
    n_images: int = 0
    warnings: list[str] = field(default_factory=list)


def write_edits(w: SiteWriter, rows: list[dict[str, Any]], warehouse_root: Path) -> EditsSite:
    """Copy the images, write data/edits.json, and file the rows under their features."""
    out = EditsSite()
    root = warehouse_root.resolve()
    missing: list[str] = []
    edits: dict[str, dict[str, Any]] = {}
    for r in rows:
        images = {side: _copy(w, root, r.get(f"image_{side}"), missing, out) for side in ("before", "after")}
        entry = edits.get(r["edit_id"])
        if entry is None:
            config = json_object(r.get("config_json"))
            entry = edits[r["edit_id"]] = json_value({
                "edit_id": r["edit_id"], "sae_id": r["sae_id"], "layer": r.get("layer"),
                "variant": r.get("variant"), "op": r.get("op"), "feature_ids": r.get("feature_ids") or [],
                "per_sample_features": bool(config.get("per_sample_features")), "target_class": r.get("target_class"),
                "concept": config.get("concept"), "strength": r.get("strength"), "step_start": r.get("step_start"),
                "step_end": r.get("step_end"),
                "cfg_renorm": config.get("cfg_renorm"), "pooled": config.get("pooled"),
                "unconditional": config.get("unconditional"), "sampler": config.get("sampler"), "rows": []})
        row = json_value({k: r.get(k) for k in _ROW_COLS}) | {"img_before": images["before"],
                                                             "img_after": images["after"]}
        entry["rows"].append(row)
        item = json_value({k: v for k, v in r.items() if k not in ("config_json", "sae_id", "image_before",
                                                                     "image_after")})
        for fid in r.get("feature_ids") or []:
            out.by_feature.setdefault((r["sae_id"], int(fid)), []).append(item | {"img_before": images["before"],
                                                                                  "img_after": images["after"]})
    out.n_edits = len(edits)
    if edits:
        w.write_json("data/edits.json", {"edits": list(edits.values())})
    if missing:
        out.warnings.append(f"{len(missing)} edit image(s) named in `edits` are not under {root} "
                            f"(first: {missing[0]}); re-run the edit (`tide edit`) to write them again")
    return out


def _copy(w: SiteWriter, root: Path, rel: str | None, missing: list[str], out: EditsSite) -> str | None:
    """The site path of one edit image after copying it, or None (no path, outside the root, or gone)."""
    if not rel:
        return None
    src = (root / rel).resolve()
    if not src.is_relative_to(root) or not src.is_file() or src.suffix != ".png":
        missing.append(rel)
        return None
    dest = "img/" + src.relative_to(root).as_posix()
    w.write_bytes(dest, src.read_bytes())
    out.n_images += 1
    return dest
