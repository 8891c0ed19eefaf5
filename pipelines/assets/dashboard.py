"""Dashboard stage: the static feature browser (dashboards/site.py) built from the warehouse views.

`tide dashboard` serves what this asset writes to <warehouse root>/dashboard; the asset's metadata
carries the key plots so the Dagster UI shows them without opening the site.
"""

from pathlib import Path

import dagster as dg
import numpy as np

from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project
from pipelines.resources import TideResource

GROUP = "dashboard"


def site_dir(project: Project) -> Path:
    from dashboards.site import default_site_dir

    return default_site_dir(project.duckdb_path)


def store_urls(project: Project) -> dict[str, str]:
    """The run this config captured reads its images from the config's store URL, which stays right
    when the warehouse folder was moved (the URL recorded in `runs` is where it was written)."""
    from pipelines.capture_ops import open_store
    from storage.activation_store import StoreError

    try:
        return {str(open_store(project).provenance["run_id"]): project.store_url}
    except (StoreError, KeyError, OSError):
        return {}


def build_dashboard(project: Project, log=print):
    """Build the site for this config's warehouse; returns dashboards.site.SiteReport."""
    from dashboards.site import build_site

    return build_site(project.duckdb_path, site_dir(project), store_urls=store_urls(project), log=log)


def key_plots(report) -> dict[str, bytes]:
    """Per layer, NMSE / L0 / dead fraction against step (held-out), one line per variant; and, over all
    SAEs, how many features peak at each step and how fire rates are spread."""
    plots: dict[str, bytes] = {}
    layers = sorted({s.layer for s in report.saes})
    for layer in layers:
        saes = [s for s in report.saes if s.layer == layer and s.heldout is not None and s.heldout.steps]
        for key, label in (("nmse", "normalised MSE"), ("l0", "L0"), ("dead_fraction", "dead fraction")):
            series = {s.variant: (s.heldout.steps, s.heldout.values[key]) for s in saes}
            if series:
                plots[f"layer{layer:02d}_{key}_by_step"] = line_plot(
                    series, "step (0 = noisiest)", label, f"layer {layer}, held-out")
    with_features = [s for s in report.saes if len(s.fire_rate)]
    if with_features:
        peaks, rates = {}, {}
        edges = np.linspace(-6, 0, 25)
        for s in with_features:
            name = f"L{s.layer} {s.variant}"
            steps = s.peak_step[np.isfinite(s.peak_step) & (s.peak_step >= 0)].astype(int)
            if steps.size:
                counts = np.bincount(steps)
                peaks[name] = (list(range(len(counts))), counts.tolist())
            live = s.fire_rate[s.fire_rate > 0]
            hist, _ = np.histogram(np.log10(live), bins=edges)
            rates[name] = ((edges[:-1] + edges[1:]) / 2, hist.tolist())
        if peaks:
            plots["features_by_peak_step"] = line_plot(peaks, "peak step (0 = noisiest)", "features",
                                                       "features peaking at each step")
        plots["fire_rate_distribution"] = line_plot(rates, "log10 fire rate", "features",
                                                    "fire rates of live features")
    return plots


def build(project: Project, upstream: list[dg.AssetsDefinition]) -> tuple[list, list]:
    checks = [dg.AssetCheckSpec(name="every_sae_has_pages", asset="feature_dashboard",
                                description="each SAE with feature rows has its feature list and detail files")]

    @dg.asset(group_name=GROUP, deps=upstream, check_specs=checks, kinds={"html"}, pool="tide_duckdb")
    def feature_dashboard(context: dg.AssetExecutionContext, tide: TideResource):
        """The feature browser as a static site (overview, feature list per SAE, feature and sample pages)
        in <warehouse root>/dashboard; serve it with `tide dashboard`."""
        report = build_dashboard(tide.project(), log=context.log.info)
        md: dict = {
            "site": dg.MetadataValue.path(str(report.out_dir)),
            "serve_with": dg.MetadataValue.text("tide dashboard  (http://127.0.0.1:8050)"),
            "saes": report.n_saes, "features": report.n_features, "images": report.n_images,
            "files": report.n_files, "size_mb": round(report.bytes / 1e6, 2), "build_s": round(report.seconds, 1),
        }
        if report.warnings:
            md["warnings"] = dg.MetadataValue.md("\n".join(f"- {w}" for w in report.warnings))
        for name, png in key_plots(report).items():
            md[name] = dg.MetadataValue.md(markdown_image(png, name))
        yield dg.MaterializeResult(metadata=md)
        missing = [s.sae_id for s in report.saes if s.n_features and not
                   (report.out_dir / "data" / "sae" / s.slug / "features.json").exists()]
        yield dg.AssetCheckResult(check_name="every_sae_has_pages", passed=not missing,
                                  metadata={"missing": dg.MetadataValue.json(missing)})

    return [feature_dashboard], []
