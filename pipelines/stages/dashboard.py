"""Dashboard stage: the static feature browser (dashboards/) built from the warehouse views, and the key
plots the `feature_dashboard` asset shows in the Dagster UI without opening the site."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dashboards.site import SiteReport, build_site, default_site_dir
from pipelines.context import RunContext
from pipelines.plots import line_plot
from pipelines.project import Project
from storage import StorageError


def site_dir(project: Project) -> Path:
    return default_site_dir(project.duckdb_path)


def store_urls(ctx: RunContext) -> dict[str, str]:
    """The run this config captured reads its images from the config's store URL, which stays right
    when the warehouse folder was moved (the URL recorded in `runs` is where it was written)."""
    try:
        return {str(ctx.store().provenance["run_id"]): ctx.project.store_url}
    except (StorageError, KeyError, OSError):
        return {}


def build_dashboard(ctx: RunContext) -> SiteReport:
    """Build the site for this config's warehouse."""
    return build_site(ctx.project.duckdb_path, site_dir(ctx.project), store_urls=store_urls(ctx), log=ctx.log)


def key_plots(report: SiteReport) -> dict[str, bytes]:
    """Per layer, NMSE / L0 / dead fraction against step (held-out), one line per variant; and, over all
    SAEs, how many features peak at each step and how fire rates are spread."""
    plots: dict[str, bytes] = {}
    layers = sorted({s.layer for s in report.saes})
    for layer in layers:
        saes = [s for s in report.saes if s.layer == layer and s.heldout is not None and s.heldout.steps]
        for key, label in (("nmse", "normalised MSE"), ("l0", "L0"), ("dead_fraction", "dead fraction")):
            series = {f"{s.site} {s.variant}": (s.heldout.steps, s.heldout.values[key]) for s in saes}
            if series:
                plots[f"layer{layer:02d}_{key}_by_step"] = line_plot(
                    series, "step (0 = noisiest)", label, f"layer {layer}, held-out")
    with_features = [s for s in report.saes if len(s.fire_rate)]
    if with_features:
        peaks, rates = {}, {}
        edges = np.linspace(-6, 0, 25)
        for s in with_features:
            name = f"L{s.layer} {s.site} {s.variant}"
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
