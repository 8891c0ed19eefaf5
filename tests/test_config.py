import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tide_core.config import ConfigError, TideConfig, explain, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_repo_config_is_valid_and_defaults_match():
    cfg = load_config(REPO / "tide.toml")
    assert cfg.model.source == "digits"
    assert cfg.capture.layers == [1, 3, 5]
    assert TideConfig().model.digits.fingerprint() == cfg.model.digits.fingerprint()


@pytest.mark.parametrize("data, field, hint", [
    ({"model": {"source": "facebook/not-a-dit"}}, "model.source", "unknown"),
    ({"capture": {"layers": [0, 9]}}, "capture.layers", "0..5"),
    ({"sampling": {"batch_size": -4}}, "sampling.batch_size", "greater than or equal to 1"),
    ({"sampling": {"num_steps": "fifty"}}, "sampling.num_steps", "valid integer"),
    ({"sampling": {"nums_steps": 10}}, "sampling.nums_steps", "unknown key"),
    ({"capture": {"sites": ["resid", "attention"]}}, "capture.sites", "'resid', 'attn' or 'mlp'"),
    ({"capture": {"token_fraction": 0.0}}, "capture.token_fraction", "greater than 0"),
    ({"capture": {"steps": [0, 60]}}, "capture.steps", "0..49"),
    ({"sae": {"k": 64, "n_latents": 32}}, "sae.k", "<= sae.n_latents"),
    ({"model": {"digits": {"patch_size": 3}}}, "patch_size", "must divide"),
])
def test_bad_values_name_the_field(data, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(data, origin="test.toml")
    msg = str(err.value)
    assert field in msg and hint in msg, msg
    assert msg.startswith("invalid config test.toml")


def test_local_model_directory_validates_layers(tmp_path):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text('{"num_layers": 3}')
    ok = parse_config({"model": {"source": str(tmp_path / "m")}, "capture": {"layers": [0, 2]}})
    assert ok.model.num_layers() == 3
    with pytest.raises(ConfigError, match="0..2"):
        parse_config({"model": {"source": str(tmp_path / "m")}, "capture": {"layers": [3]}})


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling\nnum_steps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_env_var_selects_config(tmp_path, monkeypatch):
    path = write_config(tmp_path, {"sampling": {"num_steps": 7}})
    monkeypatch.setenv("TIDE_CONFIG", str(path))
    assert load_config().sampling.num_steps == 7


def test_every_field_is_documented():
    lines = explain()
    assert len(lines) > 40
    undocumented = [line for line in lines if line.rstrip().endswith("#")]
    assert not undocumented, undocumented


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    path = write_config(tmp_path, {"capture": {"layers": [7]}, "model": {"digits": {"checkpoint_dir": "d"}}})
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "capture.layers" in out.stderr and "0..1" in out.stderr
    assert not (tmp_path / "d").exists() and not (tmp_path / "warehouse").exists()


def test_cli_help_on_every_command():
    from pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", name, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "usage: tide" in out.stdout, name
