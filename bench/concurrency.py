"""Concurrent readers while a run writes the warehouse: what they see and how long anyone waits.

    .venv/bin/python bench/concurrency.py [--seconds 15] [--readers 3] [--cli-readers 1] [--partitions 4]
                                          [--pause 0.1] [--compare]

One writer process replaces SAE partitions through the Warehouse API for ``--seconds``: each transaction
rewrites an SAE's ``saes`` row and its ``feature_stats`` rows (a new generation ``g``: a new row count,
every row's ``mean_act = g``, ``max_act`` = the partition's row count, ``saes.tokens_seen = g``), one
partition or two per transaction. Meanwhile reader processes run one checking query in a loop: through
``Warehouse.query`` (the Python read path, which dashboards build from) and through ``tide sql --format
json`` (``pipelines.cli.main``, in a loop inside one process, so the interpreter starts once). A reader
sees a torn partition if a row count differs from ``max_act``, generations are mixed, or the ``saes`` row
and its rows disagree. The dashboard server is not a reader: it serves a static site and never opens
DuckDB (``dashboards/server.py``); only ``tide dashboard --build`` reads, like any other reader.

Each process counts its lock retries (``duckdb.connect`` refused because another process holds the file,
or a reader held at the turnstile while a writer waits: ``storage/connection.py``) and times every open (the retry waits plus the ~16 ms of opening). Printed: per role, operations done,
retries, mean and max wait; whole partitions only (yes/no); whether the writer stayed within its lock
budget (``Warehouse.lock_timeout_s``). ``--compare`` first runs the same load as the code did before
writers went first. tests/test_concurrency.py runs the same load for a few seconds
and asserts the correctness half; timings are only printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# One snapshot of every partition: its generation (saes row) against the rows it owns in feature_stats.
CHECK_SQL = (
    "SELECT s.sae_id, s.tokens_seen AS gen, count(f.sae_id) AS n_rows, min(f.mean_act) AS gen_lo, "
    "max(f.mean_act) AS gen_hi, min(f.max_act) AS declared_lo, max(f.max_act) AS declared_hi "
    "FROM saes s LEFT JOIN feature_stats f USING (sae_id) GROUP BY ALL ORDER BY s.sae_id"
)
STEPS = 4


@dataclass
class RoleStats:
    """What one process did."""

    role: str
    ops: int = 0  # transactions committed (writer) or checking queries answered (readers)
    opens: int = 0
    retries: int = 0  # opens refused because another process held the file, then retried
    total_wait_s: float = 0.0
    max_wait_s: float = 0.0
    torn: list[str] = field(default_factory=list)  # what a reader saw that a whole partition cannot be
    errors: list[str] = field(default_factory=list)  # any exception (a lock timeout included)
    lock_budget_s: float = 0.0


@dataclass
class LoadReport:
    seconds: float
    partitions: int
    pause_s: float
    writer_first: bool
    roles: list[RoleStats]

    @property
    def writer(self) -> RoleStats:
        return next(r for r in self.roles if r.role == "writer")

    @property
    def readers(self) -> list[RoleStats]:
        return [r for r in self.roles if r.role != "writer"]

    @property
    def whole_partitions_only(self) -> bool:
        return not any(r.torn for r in self.roles)


def partition_rows(sae_id: str, gen: int) -> tuple[dict, dict]:
    """The saes row and the feature_stats columns of one generation of one partition: the row count
    changes with every generation, so a reader mixing two generations or seeing half of one can tell."""
    import numpy as np

    n_features = 50 + (gen * 37) % 200
    n = n_features * STEPS
    stats = {
        "sae_id": [sae_id] * n,
        "feature_id": np.repeat(np.arange(n_features, dtype=np.int32), STEPS),
        "step": np.tile(np.arange(STEPS, dtype=np.int32), n_features),
        "fire_rate": np.linspace(0, 1, n),
        "mean_act": np.full(n, float(gen)),
        "max_act": np.full(n, float(n)),
    }
    sae = {"sae_id": sae_id, "run_id": "load", "layer": 0, "site": "resid", "variant": "topk",
           "n_latents": n_features, "k": 4, "path": None, "tokens_seen": gen}
    return sae, stats


def write_generation(tx, sae_id: str, gen: int) -> None:
    sae, stats = partition_rows(sae_id, gen)
    tx.replace_partition("saes", {"sae_id": sae_id}, [sae])
    tx.replace_partition("feature_stats", {"sae_id": sae_id}, stats)


def torn_rows(rows: list[dict], partitions: int) -> list[str]:
    """Why these rows are not whole partitions; empty when they are."""
    problems = [] if len(rows) == partitions else [f"saw {len(rows)} of {partitions} partitions"]
    for r in rows:
        gen = r["gen"]
        if not (r["n_rows"] == r["declared_lo"] == r["declared_hi"] and r["gen_lo"] == r["gen_hi"] == gen):
            problems.append(f"{r['sae_id']}: {r}")
    return problems


class _Meter:
    """Counts this process's lock retries and times its opens, by wrapping the two functions the
    warehouse opens through (the production code is unchanged)."""

    def __init__(self, stats: RoleStats, writer_first: bool = True):
        import duckdb

        import storage.connection as connection
        import storage.warehouse as warehouse

        real_duckdb_connect, real_connect = duckdb.connect, connection.connect
        # writer_first=False: the code before the turnstile, where every open races and readers back off
        # to 1 s like writers
        passes = connection._Turnstile.admits if writer_first else (lambda turnstile: True)
        if not writer_first:
            connection._MAX_READER_BACKOFF_S = connection._MAX_BACKOFF_S

        def admits(turnstile):  # a reader held back while a writer waits is a retry too
            ok = passes(turnstile)
            stats.retries += not ok
            return ok

        def counted(*args, **kwargs):
            try:
                return real_duckdb_connect(*args, **kwargs)
            except duckdb.Error as exc:
                if connection._is_lock_error(exc):
                    stats.retries += 1
                raise

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real_connect(*args, **kwargs)
            finally:
                wait = time.perf_counter() - t0
                stats.opens += 1
                stats.total_wait_s += wait
                stats.max_wait_s = max(stats.max_wait_s, wait)

        duckdb.connect = counted
        warehouse.connect = timed
        connection._Turnstile.admits = admits


def _writer(path: str, seconds: float, partitions: int, pause_s: float, writer_first: bool,
            out: mp.Queue) -> None:
    from storage import Warehouse

    stats = RoleStats("writer")
    _Meter(stats, writer_first)
    wh = Warehouse(path)
    stats.lock_budget_s = wh.lock_timeout_s
    end, gen = time.monotonic() + seconds, 0
    try:
        while time.monotonic() < end:
            gen += 1
            ids = [f"sae_{gen % partitions}"] + ([f"sae_{(gen + 1) % partitions}"] if gen % 3 == 0 else [])
            with wh.transaction() as tx:  # one or two partitions, committed together
                for sae_id in ids:
                    write_generation(tx, sae_id, gen)
            stats.ops += 1
            time.sleep(pause_s)  # a stage computes between its writes
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    out.put(asdict(stats))


def _reader(role: str, path: str, config: str, partitions: int, writer_first: bool, stop,
            out: mp.Queue) -> None:
    import json

    stats = RoleStats(role)
    _Meter(stats, writer_first)
    if role == "cli":
        from pipelines.cli import main
    else:
        from storage import Warehouse

        wh = Warehouse(path)
        stats.lock_budget_s = wh.lock_timeout_s
    while not stop.is_set():
        try:
            if role == "cli":
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    code = main(["sql", "--config", config, "--format", "json", CHECK_SQL])
                if code != 0:
                    raise RuntimeError(f"tide sql exited {code}: {buf.getvalue()[-500:]}")
                rows = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
            else:
                rows = wh.query(CHECK_SQL).to_pylist()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
            stats.errors.append(f"{type(exc).__name__}: {exc}")
            break
        stats.ops += 1
        stats.torn += torn_rows(rows, partitions)[:3]
    out.put(asdict(stats))


def run_load(root: Path, seconds: float = 15.0, readers: int = 3, cli_readers: int = 1,
             partitions: int = 4, pause_s: float = 0.1, writer_first: bool = True) -> LoadReport:
    """Build a warehouse under ``root`` with every partition at generation 0, then run the writer and the
    readers for ``seconds``; readers stop once the writer is done."""
    from storage import Warehouse

    root.mkdir(parents=True, exist_ok=True)
    path = root / "warehouse.duckdb"
    config = root / "tide.toml"
    config.write_text(f'[warehouse]\nroot = "{root.as_posix()}"\n')
    wh = Warehouse(path)
    with wh.transaction() as tx:
        for p in range(partitions):
            write_generation(tx, f"sae_{p}", 0)

    ctx = mp.get_context("spawn")  # fresh interpreters: no DuckDB handle inherited from this process
    out, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_reader, args=(role, str(path), str(config), partitions, writer_first, stop, out))
             for role in ["python"] * readers + ["cli"] * cli_readers]
    writer = ctx.Process(target=_writer, args=(str(path), seconds, partitions, pause_s, writer_first, out))
    for p in procs:
        p.start()
    writer.start()
    results = []
    try:
        results.append(out.get(timeout=seconds + 120))  # the writer's (the readers report after stop)
        stop.set()
        results += [out.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        for p in [writer, *procs]:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return LoadReport(seconds, partitions, pause_s, writer_first, [RoleStats(**r) for r in results])


def print_report(report: LoadReport) -> None:
    print(f"{'writers first' if report.writer_first else 'before the turnstile (no writer preference)'}: "
          f"{report.seconds:g} s of writes, {report.partitions} partitions, "
          f"{len(report.readers)} reader processes, writer pausing {report.pause_s:g} s between transactions")
    print(f"| {'role':8} | {'ops':>6} | {'opens':>6} | {'retries':>7} | {'mean wait':>9} | {'max wait':>8} |")
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 10}|")
    for r in report.roles:
        mean = r.total_wait_s / r.opens if r.opens else 0.0
        print(f"| {r.role:8} | {r.ops:6d} | {r.opens:6d} | {r.retries:7d} | {mean * 1e3:7.1f}ms | "
              f"{r.max_wait_s:7.2f}s |")
    served = sum(r.ops for r in report.readers)
    w = report.writer
    print(f"queries served: {served} ({served / report.seconds:.1f}/s); writer transactions: {w.ops}; "
          f"retries: writer {w.retries}, readers {sum(r.retries for r in report.readers)}; "
          f"max wait: writer {w.max_wait_s:.2f} s (budget {w.lock_budget_s:g} s), "
          f"readers {max((r.max_wait_s for r in report.readers), default=0):.2f} s")
    print(f"whole partitions only: {'yes' if report.whole_partitions_only else 'NO'}; errors: "
          f"{sum(len(r.errors) for r in report.roles)}")
    for r in report.roles:
        for line in r.torn[:3] + r.errors[:3]:
            print(f"  {r.role}: {line}")


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--readers", type=int, default=3, help="processes reading through Warehouse.query")
    p.add_argument("--cli-readers", type=int, default=1, help="processes reading through `tide sql`")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.1, help="seconds the writer waits between transactions")
    p.add_argument("--compare", action="store_true",
                   help="first run the same load without writer preference (the code before the turnstile)")
    args = p.parse_args()
    for writer_first in ([False, True] if args.compare else [True]):
        with tempfile.TemporaryDirectory(prefix="tide-concurrency-") as tmp:
            print_report(run_load(Path(tmp), args.seconds, args.readers, args.cli_readers, args.partitions,
                                  args.pause, writer_first))
        print()


if __name__ == "__main__":
    main()
