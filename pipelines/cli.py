"""`tide`: the command line. Drives Dagster (in-process runs, the UI) and the warehouse.

Each command imports what it needs when it runs, so `tide sql` or `tide config` start without loading
torch, zarr or Dagster.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

from pipelines.preflight import check
from pipelines.project import REPO_ROOT, Project
from tide_core.config import CONFIG_ENV, DIGITS_SOURCE, STYLED_DIGITS_SOURCE, ConfigError
from tide_core.sae.spec import VARIANTS

TRAINED_HERE = (DIGITS_SOURCE, STYLED_DIGITS_SOURCE)  # the models `tide train-dit` trains


def _load_project(args) -> Project:
    if args.config:
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    return Project.load(args.config)


def _preflight(project: Project) -> str:
    """Stop with exit code 2 before any work when the environment cannot run this config; else the line
    that says what passed (with the activation store's estimated size)."""
    report = check(project)
    if report.problems:
        raise ConfigError("preflight failed:\n" + "\n".join(f"  {p}" for p in report.problems))
    return f"[tide] preflight passed: model, device and warehouse root usable; {report.summary()}"


def cmd_run(args) -> int:
    project = _load_project(args)  # a bad config fails here, before anything runs
    print(_preflight(project), flush=True)
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.runner import materialize

    force = list(args.force or [])
    if args.overwrite:
        import fsspec

        fs, root = fsspec.core.url_to_fs(project.store_url)
        if fs.exists(root):
            print(f"[tide] --overwrite: deleting the activation store at {project.store_url}")
            fs.rm(root, recursive=True)
        force.append("activation_store")  # a new store: its new data version makes everything after it stale
    t0 = time.perf_counter()
    quiet = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    run = partial(materialize, definitions_for(project), warehouse_instance(project), select=args.select,
                  force=force, run_config=quiet, log=lambda m: print(m, flush=True))
    if args.workers > 1 or args.scheduler:
        from pipelines.parallel import Workers

        if project.config_path is None:
            print("[tide] --workers needs a config file (--config FILE): the workers load it", file=sys.stderr)
            return 2
        with Workers(project.config_path, args.workers, args.scheduler) as workers:
            print(f"[tide] {workers.n} workers, {workers.threads} torch threads each", flush=True)
            report = run(workers=workers)
    else:
        report = run()
    if not report.success:
        return 1
    print(_summary(project, time.perf_counter() - t0, len(report.executed()), len(report.reused())))
    return 0


def _summary(project: Project, seconds: float, executed: int, reused: int) -> str:
    cfg = f" --config {project.config_path}" if project.config_path else ""
    from tide_core.models.registry import family_entry

    # A text run has no judge; its first question is which words the features read.
    query = ("SELECT kind, concept, count(*) AS features, avg(lift) AS lift FROM v_feature_concepts "
             "WHERE lift > 2 GROUP BY 1, 2 ORDER BY features DESC LIMIT 10"
             if family_entry(project.config.model).text else
             "SELECT class_name, count(*), avg(judge_pred = class_id) AS acc FROM samples GROUP BY 1 ORDER BY 1")
    return f"""
[tide] done in {seconds:.0f}s ({executed} asset partitions materialized, {reused} up to date).
  activation store : {project.store_url}
  warehouse (SQL)  : {project.duckdb_path}
  Dagster instance : {project.dagster_home}
next:
  tide ui{cfg}                      # the asset graph, runs, staleness and metadata in the Dagster UI
  tide dashboard{cfg}               # the feature browser on http://127.0.0.1:8050
  tide sql{cfg} "{query}"
  duckdb -readonly {project.duckdb_path}
"""


def cmd_ui(args) -> int:
    from pipelines.instance import ensure_home

    project = _load_project(args)
    home = ensure_home(project)
    os.environ["DAGSTER_HOME"] = home
    exe = Path(sys.executable).with_name("dagster")
    argv = [str(exe), "dev", "-m", "pipelines.definitions", "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"[tide] Dagster UI on http://127.0.0.1:{args.port}  (instance {home})", flush=True)
    # Background jobs start with SIGINT ignored; dagster dev then ignores Ctrl-C/TERM. Restore defaults.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(REPO_ROOT)
    os.execv(str(exe), argv)
    return 0  # not reached


def cmd_dashboard(args) -> int:
    """Serve the feature browser (a static site) on 127.0.0.1, building it first if asked or missing."""
    from dashboards.server import make_server
    from dashboards.site import DashboardError
    from pipelines.context import RunContext
    from pipelines.stages.dashboard import build_dashboard, site_dir
    from storage import StorageError

    project = _load_project(args)
    site = site_dir(project)
    built = site / "data" / "site.json"
    if args.build or not built.exists():
        try:
            build_dashboard(RunContext(project, log=lambda m: print(f"[tide] {m}", flush=True)))
        except (DashboardError, StorageError) as err:
            print(f"[tide] {err}", file=sys.stderr)
            return 1
    elif project.duckdb_path.exists() and project.duckdb_path.stat().st_mtime > built.stat().st_mtime:
        print("[tide] the warehouse changed since the dashboard was built: `tide dashboard --build` rebuilds it")
    if args.no_serve:
        print(f"[tide] dashboard site: {site}")
        return 0
    try:
        server = make_server(site, args.port)
    except OSError as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 1
    print(f"[tide] feature dashboard on {server.url}  (site {site}; Ctrl-C stops it)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Background jobs start with SIGINT ignored: restore it, and let TERM stop the server the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def edit_overrides(args) -> dict:
    """`tide edit` arguments as `[edit]` fields; None = not given (the config's value stays)."""

    def ints(text: str | None) -> list[int] | None:
        try:
            return None if text is None else [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"expected comma-separated integers, got {text!r}") from None

    features = ints(args.features)
    if features is None and (args.target_class is not None or args.concept is not None):
        features = []  # --class / --concept pick the features, whatever edit.feature_ids says
    return dict(sae_id=args.sae, layer=args.layer, variant=args.variant, op=args.op,
                target_class=args.target_class, concept=args.concept, feature_ids=features, n_features=args.n_features,
                min_fire_rate=args.min_fire_rate, strengths=args.strength, windows=args.window,
                units=args.units, n_samples=args.samples, sample_ids=ints(args.sample_ids),
                reference_ids=ints(args.reference), branch=args.branch, cfg_renorm=args.cfg_renorm,
                unconditional=args.unconditional, pooled=args.pooled, spatial=args.spatial)


def cmd_edit(args) -> int:
    """Sample the same seeds without and with a feature edit; judge, grid, `edits` rows."""
    from pipelines.context import RunContext
    from pipelines.stages.edit import run_configured_edits
    from pipelines.stages.edit_plan import with_edit
    from storage import StorageError
    from tide_core.edit import EditError

    project = with_edit(_load_project(args), **edit_overrides(args))
    _preflight(project)
    try:
        report = run_configured_edits(RunContext(project, log=lambda m: print(f"[tide] {m}", flush=True)),
                                      publish=not args.no_publish)
    except (EditError, StorageError) as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 2
    print(f"[tide] grid: {report.grid_path}")
    if not args.no_publish:
        ids = ", ".join(f"'{r.edit_id}'" for r in report.results)
        print(f"[tide] rows: tide sql \"SELECT * FROM v_edits WHERE edit_id IN ({ids})\"")
    return 0


def cmd_train_dit(args) -> int:
    from pipelines.context import RunContext
    from pipelines.stages.model import prepare_model

    project = _load_project(args)
    if project.config.model.source not in TRAINED_HERE:
        raise SystemExit(f"[tide] model.source={project.config.model.source!r}: train-dit trains the models "
                         f"trained here only ({', '.join(TRAINED_HERE)})")
    status = prepare_model(RunContext(project, log=lambda m: print(f"[tide] {m}", flush=True)), force=args.force)
    print(f"[tide] checkpoint: {status.path} (fingerprint {status.fingerprint})")
    return 0


def cmd_config(args) -> int:
    from tide_core.config import explain

    if args.explain:
        print("\n".join(explain()))
        return 0
    project = _load_project(args)
    print(f"[tide] config {project.config_path or '(defaults)'} is valid")
    if args.check:
        print(_preflight(project))
    if args.show:
        print(project.config.model_dump_json(indent=2))
    return 0


def cmd_sql(args) -> int:
    from pipelines.table_format import format_table
    from storage import Warehouse, WarehouseError, write_table

    project = _load_project(args)
    wh = Warehouse(project.duckdb_path)
    try:
        if args.schema:
            for rel in wh.schema():
                grain = f"grain ({', '.join(rel.grain)})" if rel.grain else (rel.comment or '')
                print(f"{rel.kind:5} {rel.name:22} {grain}")
                if args.verbose:
                    for col in rel.columns:
                        print(f"        {col.name:22} {col.type:12} {col.comment or ''}")
            return 0
        if not args.query:
            raise SystemExit("[tide] give a query, e.g. tide sql \"SELECT * FROM samples LIMIT 5\", or --schema")
        table = wh.query(args.query)
    except WarehouseError as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 1
    if args.output:
        fmt = args.format if args.format != "table" else Path(args.output).suffix.lstrip(".") or "csv"
        path = write_table(table, fmt, args.output)
        print(f"[tide] wrote {table.num_rows} rows to {path}")
    else:
        text = format_table(table, args.format if args.format != "parquet" else "table", max_rows=args.max_rows)
        print(text, end="" if text.endswith("\n") else "\n")  # csv and json lines end with their own newline
    return 0


def cmd_export(args) -> int:
    """Every warehouse table as DIR/<table>.parquet, grain and description in the file's metadata."""
    from storage import StorageError, Warehouse, export_tables

    project = _load_project(args)
    try:
        written = export_tables(Warehouse(project.duckdb_path), args.dir)
    except (StorageError, OSError) as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 1
    for t in written:
        print(f"[tide] {t.path}: {t.rows} rows")
    print(f"[tide] read with: duckdb -c \"SELECT * FROM '{Path(args.dir) / 'features.parquet'}' LIMIT 5\"")
    return 0


def cmd_export_sae(args) -> int:
    """Write a trained SAE as SAELens checkpoints (tide: one per timestep, default the run's captured ones)."""
    import json

    from pipelines.stages.sae import missing_checkpoint
    from storage import ActivationStore, StorageError, Warehouse
    from tide_core.sae.export import export_saelens
    from tide_core.sae.model import SparseAutoencoder

    project = _load_project(args)
    try:
        wh = Warehouse(project.duckdb_path)
        rec = wh.require_sae(args.sae_id)
        if missing := missing_checkpoint(rec):
            raise SystemExit(f"[tide] {missing}")
        sae = SparseAutoencoder.load(rec.path)
        runs = wh.query("SELECT model_source, config_json FROM runs WHERE run_id = ?", [rec.run_id]).to_pylist()
        run = runs[0] if runs else {"model_source": None, "config_json": "{}"}
        timesteps = args.timestep
        if sae.spec.modulated and not timesteps:
            # The timesteps the SAE was trained on: those its run captured, from that run's activation store.
            store_url = json.loads(run["config_json"]).get("store_url") or project.store_url
            prov = ActivationStore.open(store_url, mode="r").provenance
            timesteps = prov.get("capture_timesteps")
            if prov.get("run_id", rec.run_id) != rec.run_id or not timesteps:
                raise SystemExit(f"[tide] the store at {store_url} does not hold the capture timesteps of run "
                                 f"{rec.run_id}: pass --timestep T (repeatable)")
        meta = {"model_name": run["model_source"]} if run["model_source"] else {}
        written = export_saelens(sae, args.dir, timesteps, metadata=meta)
    except (StorageError, ValueError, OSError) as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 1
    for ck in written:
        at = "" if ck.timestep is None else f" at timestep {ck.timestep}"
        print(f"[tide] {ck.path}: SAELens {ck.architecture} SAE{at}")
    print(f"[tide] load with: sae_lens.SAE.load_from_disk({str(written[0].path)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tide", description="TIDE activation warehouse for Diffusion Transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help=f"run config (default: ${CONFIG_ENV} or ./tide.toml)")
        sp.set_defaults(fn=fn)
        return sp

    r = add("run", cmd_run, "Materialize the asset graph in its dependency order, in-process on the warehouse's "
            "Dagster instance: every asset partition that is missing or stale; up-to-date ones are reused.")
    r.add_argument("--select", help="a Dagster asset selection, e.g. 'key:sae+' (sae and everything after it)")
    r.add_argument("--force", action="append", metavar="ASSET",
                   help="repeatable; materialize every partition of this asset even if it is up to date")
    r.add_argument("--overwrite", action="store_true", help="delete the activation store and capture again")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the partitions of each asset (capture shards, SAE layers, ...) on N worker processes "
                        "of a local dask.distributed cluster (default 1: one after another)")
    r.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running dask scheduler (e.g. tcp://host:8786) whose workers run the partitions")
    r.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="Dagster console log level (default INFO)")
    u = add("ui", cmd_ui, "Start the Dagster UI (and daemon) on 127.0.0.1 on the warehouse's own instance.")
    u.add_argument("--port", type=int, default=3000)
    d = add("dashboard", cmd_dashboard, "Serve the feature browser on 127.0.0.1 (a static site built from the "
                                        "warehouse; built first when missing).")
    d.add_argument("--port", type=int, default=8050, help="port on 127.0.0.1 (default 8050; 0 = any free port)")
    d.add_argument("--build", action="store_true", help="rebuild the site from the warehouse before serving")
    d.add_argument("--no-serve", action="store_true", help="only build (with --build) or locate the site")
    t = add("train-dit", cmd_train_dit, "Train the DiT of model.source = digits or styled-digits (reused while "
                                        "its config is unchanged).")
    t.add_argument("--force", action="store_true", help="retrain even if the checkpoint matches the config")
    q = add("sql", cmd_sql, "Query the DuckDB warehouse read-only (tables and views; --schema lists them).")
    q.add_argument("query", nargs="?", help="a SELECT statement")
    q.add_argument("--schema", action="store_true", help="list tables and views with their grain")
    q.add_argument("--verbose", "-v", action="store_true", help="with --schema: list columns too")
    q.add_argument("--format", default="table", choices=["table", "csv", "json", "parquet"])
    q.add_argument("--output", "-o", help="write the result to this file (csv, json lines or parquet)")
    q.add_argument("--max-rows", type=int, default=50, help="rows shown in table format (default 50)")
    e = add("edit", cmd_edit, "Feature-guided editing: sample held-out seeds without and with an SAE feature "
            "edit at one layer and window of steps; judge both, save a grid PNG, write `edits` rows. Unset "
            "options come from [edit] in the config (`tide config --explain`); the README (Editing) explains the ops.")
    e.add_argument("--sae", help="SAE id to edit with (default: the [edit] layer's SAE of the current run)")
    e.add_argument("--layer", type=int, help="block whose SAE is used (one of capture.layers)")
    e.add_argument("--variant", choices=VARIANTS, help="which SAE variant of that layer")
    e.add_argument("--op", choices=["add", "scale", "clamp", "zero", "style"],
                   help="add / clamp: raise / set the features at every token; scale: multiply where they fire; "
                        "zero: ablate; style: move latents towards a reference image's")
    e.add_argument("--class", dest="target_class", type=int,
                   help="edit the latents most selective for this class (from the features table)")
    e.add_argument("--concept", help="edit the latents most associated with this concept instead of a class's: "
                   "a class name, prompt word or factor value (red, colour:red), as feature_concepts lists them")
    e.add_argument("--features", help="explicit latent ids, comma-separated (instead of --class / --concept)")
    e.add_argument("--n-features", type=int, help="how many of the class's most selective latents")
    e.add_argument("--min-fire-rate", type=float, help="skip latents firing on fewer tokens than this")
    e.add_argument("--strength", type=float, action="append",
                   help="repeatable; add / clamp: multiples of the feature's unit, scale: factor, "
                        "style: fraction of the way to the reference")
    e.add_argument("--window", action="append",
                   help="repeatable; early | middle | late | all | START-END (steps, inclusive; 0 = noisiest)")
    e.add_argument("--spatial", action=argparse.BooleanOptionalAction,
                   help="add / clamp: weight each token by where the feature usually fires (top-image heatmaps); "
                        "--no-spatial: every token alike")
    e.add_argument("--units", choices=["mean_act", "absolute"],
                   help="unit of add / clamp strengths: the feature's mean activation, or raw latent units")
    e.add_argument("--samples", type=int, help="how many held-out samples to edit")
    e.add_argument("--sample-ids", help="explicit sample ids of the run, comma-separated")
    e.add_argument("--reference", help="style: reference sample id(s): one, or one per edited sample")
    e.add_argument("--pooled", action=argparse.BooleanOptionalAction,
                   help="style: match each feature's mean over the image to the reference's, keeping the layout "
                        "(--no-pooled: copy token by token)")
    e.add_argument("--branch", choices=["both", "cond"], help="CFG halves edited (default both)")
    e.add_argument("--cfg-renorm", type=float,
                   help="cap each image's guided noise prediction at this times the conditional one's norm")
    e.add_argument("--unconditional", action=argparse.BooleanOptionalAction,
                   help="sample with the null class and no guidance: the features, not the label, decide the digit "
                        "(--no-unconditional: the run's class labels and guidance)")
    e.add_argument("--no-publish", action="store_true", help="do not write `edits` rows (grid PNG only)")
    o = add("export", cmd_export, "Write every warehouse table as DIR/<table>.parquet, with the table's grain and "
            "description in the Parquet schema metadata (README, Open formats).")
    o.add_argument("dir", help="output directory (created if missing; files of the same name are replaced)")
    o.add_argument("--format", default="parquet", choices=["parquet"], help="file format (default parquet)")
    x = add("export-sae", cmd_export_sae, "Write a trained SAE as a SAELens checkpoint directory (cfg.json + "
            "sae_weights.safetensors) that sae_lens.SAE.load_from_disk loads; input scaling and, for tide, the "
            "timestep modulation are folded into the weights, so latents and reconstructions equal the SAE's own.")
    x.add_argument("sae_id", help="an SAE of the warehouse (tide sql \"SELECT sae_id FROM saes\")")
    x.add_argument("dir", help="output directory: the checkpoint itself (topk: SAELens topk; relu: standard), "
                               "or for tide one subdirectory per timestep (DIR/t0999/, ...)")
    x.add_argument("--format", default="saelens", choices=["saelens"], help="checkpoint format (default saelens)")
    x.add_argument("--timestep", type=int, action="append", metavar="T",
                   help="repeatable; tide only: export at this diffusion timestep (default: every timestep the "
                        "SAE's run captured, read from its activation store's provenance)")
    c = add("config", cmd_config, "Validate the run config; --explain lists every field with its docstring.")
    c.add_argument("--explain", action="store_true", help="list every field, its default and its meaning")
    c.add_argument("--check", action="store_true", help="also run the preflight (model files, device, root)")
    c.add_argument("--show", action="store_true", help="print the validated config as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        code = args.fn(args)
    except ConfigError as err:
        print(f"[tide] {err}", file=sys.stderr)
        return 2
    except Exception as err:  # on a full disk Dagster's own records fail too, outside any asset
        if args.command != "run" or not (why := _disk_full(args, started, err)):
            raise
        print(f"[tide] {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n[tide] {why}",
              file=sys.stderr)
        return 1
    if code == 1 and args.command == "run" and (why := _disk_full(args, started)):
        print(f"[tide] {why}", file=sys.stderr)
    return code


def _disk_full(args, started: float, err: BaseException | None = None) -> str | None:
    """The message for a `tide run` that stopped on a full disk (``pipelines.disk_full``), else None."""
    import traceback

    from pipelines import disk_full

    project = Project.load(args.config)
    text = "".join(traceback.format_exception(err)) if err else disk_full.failed_runs_text(project, started)
    return disk_full.message(project, text)


if __name__ == "__main__":
    sys.exit(main())
