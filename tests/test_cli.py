import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tide(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_sql_reads_and_refuses_writes(tmp_path):
    from storage import Warehouse

    cfg = tmp_path / "tide.toml"
    cfg.write_text('[warehouse]\nroot = "wh"\n')
    wh = Warehouse(tmp_path / "wh" / "warehouse.duckdb")
    wh.init_schema()
    wh.replace_partition("samples", {"run_id": "r1"}, {
        "sample_id": [0, 1], "class_id": [3, 7], "class_name": ["3", "it's 7"], "seed": [11, 12],
        "shard": [0, 0]})
    out = tide("sql", "--config", str(cfg), "SELECT sample_id, class_name FROM samples ORDER BY 1")
    assert out.returncode == 0 and "it's 7" in out.stdout and "(2 rows)" in out.stdout
    out = tide("sql", "--config", str(cfg), "--format", "csv", "SELECT class_id FROM samples ORDER BY 1")
    assert [v.strip('"') for v in out.stdout.split()] == ["class_id", "3", "7"]
    assert out.stdout.endswith("7\n") and not out.stdout.endswith("\n\n")  # pipes get the CSV, no blank line
    pq = tmp_path / "x.parquet"
    out = tide("sql", "--config", str(cfg), "--output", str(pq), "SELECT * FROM samples")
    assert out.returncode == 0 and pq.exists()
    bad = tide("sql", "--config", str(cfg), "SELEC 1")
    assert bad.returncode == 1 and "syntax error" in bad.stderr
    write = tide("sql", "--config", str(cfg), "DROP TABLE samples")
    assert write.returncode == 1 and "read-only" in write.stderr
    schema = tide("sql", "--config", str(cfg), "--schema")
    assert "samples" in schema.stdout and "grain (run_id, sample_id)" in schema.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_asset_graph_of_its_warehouse_and_stops_on_term(tmp_path):
    port = _free_port()
    config = tmp_path / "tide.toml"
    config.write_text((REPO / "tide.toml").read_text().replace('root = "warehouse"', f'root = "{tmp_path / "wh"}"')
                      .replace('checkpoint_dir = "models/digits-dit"', f'checkpoint_dir = "{REPO / "models/digits-dit"}"'))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "elsewhere"), "TIDE_CONFIG": str(config)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = b""
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                query = b'{"query": "{ assetNodes { assetKey { path } } }"}'
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})
                body = urllib.request.urlopen(req, timeout=5).read()
                if b"activations" in body:
                    break
            except OSError:
                time.sleep(1)
        for name in (b"dit_model", b"judge", b"activations", b"samples", b"feature_dashboard"):
            assert name in body
        # the warehouse's own instance, whatever DAGSTER_HOME said
        assert (tmp_path / "wh" / ".dagster" / "dagster.yaml").read_text().startswith("telemetry")
        assert not (tmp_path / "elsewhere").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


@pytest.mark.parametrize("content, names", [
    (bytes(range(256)), ["must be a UTF-8 TOML file"]),
    (b"[sae.spec]\nk = true\n", ["sae.spec.k", "true/false where a number is expected"]),
    (b"[sae]\nvariants = []\n", ["sae.variants", "is empty"]),
    (b"[capture]\nlayers = []\nsites = []\n", ["capture.layers", "capture.sites", "is empty"]),
])
def test_a_bad_config_file_exits_2_with_one_message(tmp_path, monkeypatch, capsys, content, names):
    from pipelines.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("TIDE_CONFIG", "")  # the CLI sets it from --config; monkeypatch restores it
    path = tmp_path / "tide.toml"
    path.write_bytes(content)
    assert main(["config", "--config", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("[tide]") == 1 and str(path) in out.err, out.err
    assert all(n in out.err for n in names), out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tide.toml"]  # nothing written
