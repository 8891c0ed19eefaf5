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
    assert cfg.warehouse.root == str(REPO / "warehouse")


@pytest.mark.parametrize("data, field, hint", [
    ({"model": {"source": " "}}, "model.source", "is empty"),
    ({"capture": {"layers": [0, -1]}}, "capture.layers", "start at 0"),
    ({"capture": {"layers": []}}, "capture.layers", "is empty, so its stage would do nothing"),
    ({"capture": {"sites": []}}, "capture.sites", "is empty"),
    ({"capture": {"steps": []}}, "capture.steps", "is empty"),
    ({"sae": {"variants": []}}, "sae.variants", "is empty"),
    ({"sampling": {"classes": []}}, "sampling.classes", "is empty"),
    ({"edit": {"strengths": []}}, "edit.strengths", "is empty"),
    ({"sweep": {"lrs": []}}, "sweep.lrs", "is empty"),
    ({"sae": {"spec": {"k": True}}}, "sae.spec.k", "true/false where a number is expected"),
    ({"sampling": {"batch_size": -4}}, "sampling.batch_size", "greater than or equal to 1"),
    ({"sampling": {"num_steps": "fifty"}}, "sampling.num_steps", "valid integer"),
    ({"sampling": {"nums_steps": 10}}, "sampling.nums_steps", "unknown key"),
    ({"capture": {"sites": ["resid", "attention"]}}, "capture.sites", "'resid', 'attn', 'mlp', 'cross' or 'resid_text'"),
    ({"capture": {"token_fraction": 0.0}}, "capture.token_fraction", "greater than 0"),
    ({"capture": {"steps": [0, 60]}}, "capture.steps", "0..49"),
    ({"sae": {"spec": {"k": 64, "n_latents": 32}}}, "sae.spec", "n_latents"),
    ({"sae": {"train": {"total_tokens": 1000, "warmup_tokens": 5000}}}, "sae.train", "warmup_tokens"),
    ({"model": {"digits": {"patch_size": 3}}}, "patch_size", "must divide"),
    ({"warehouse": {"root": "s3://bucket/wh"}}, "warehouse.root", 'store_url = "s3://bucket/wh/activations.zarr"'),
    ({"model": {"tiny_flux": {"head_dim": 15}}}, "model.tiny_flux.head_dim", "multiple of 2"),
])
def test_bad_values_name_the_field(data, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(data, origin="test.toml")
    msg = str(err.value)
    assert field in msg and hint in msg, msg
    assert msg.startswith("invalid config test.toml")


def test_preflight_checks_layers_and_sites_against_the_model_files(tmp_path):
    from pipelines.preflight import preflight
    from pipelines.project import Project

    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text(
        '{"_class_name": "DiTTransformer2DModel", "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8}')
    ok = Project.load(write_config(tmp_path, {"model": {"source": "m"}, "capture": {"layers": [0, 2]}}))
    assert ok.config.model.source == str(tmp_path / "m")  # relative to the config file's folder
    assert preflight(ok) == []
    bad = Project.load(write_config(tmp_path, {"model": {"source": "m"}, "capture": {"layers": [3]}}))
    source = str(tmp_path / "m")
    assert preflight(bad) == [f"capture.layers contains [3]: model {source!r} has 3 layers, so layers must be "
                              "in 0..2"]
    hub = Project.load(write_config(tmp_path, {"model": {"source": "facebook/not-a-dit"}}))
    assert "known hub id" in preflight(hub)[0]
    (tmp_path / "file").write_text("")
    blocked = Project.load(write_config(tmp_path, {"warehouse": {"root": "file"}}))
    assert preflight(blocked) == [f"warehouse.root={str(tmp_path / 'file')!r} is a file, not a folder: point "
                                  "warehouse.root at a folder"]


def test_relative_paths_resolve_against_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    path = write_config(tmp_path / "conf", {"warehouse": {"root": "wh", "store_url": "acts.zarr"}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.warehouse.root == str(tmp_path / "conf" / "wh")
    assert cfg.warehouse.store_url == str(tmp_path / "conf" / "acts.zarr")
    assert cfg.model.digits.checkpoint_dir == str(tmp_path / "conf" / "dit")
    assert load_config(write_config(tmp_path / "s3", {"warehouse": {"store_url": "s3://b/acts.zarr"}})
                       ).warehouse.store_url == "s3://b/acts.zarr"  # URLs stay as they are


def test_invalid_toml_binary_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampling\nnum_steps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is not text .* must be a UTF-8 TOML file") as err:
        load_config(binary)
    assert str(binary) in str(err.value)
    nul = tmp_path / "weights.bin"
    nul.write_bytes(b"\x00\x01" * 64)  # valid UTF-8, but binary
    with pytest.raises(ConfigError, match="is not text"):
        load_config(nul)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def _numeric_fields(model, prefix=""):
    """Dotted names of the fields whose default is an int or a float (not a bool), nested models included."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann, default = field.annotation, field.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_fields(ann, f"{prefix}{name}.")
        elif isinstance(default, int | float) and not isinstance(default, bool):
            yield f"{prefix}{name}"


def _nested(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    data = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    return data


def test_booleans_are_rejected_by_every_numeric_field():
    from tide_core.config import SweepConfig

    fields = list(_numeric_fields(TideConfig)) + [f"sweep.{f}" for f in _numeric_fields(SweepConfig)]
    assert {"sae.spec.k", "sae.train.lr", "sampling.guidance_scale", "model.digits.num_layers",
            "sweep.total_tokens"} <= set(fields)
    for dotted in fields:
        with pytest.raises(ConfigError) as err:
            parse_config(_nested(dotted, True))
        assert f"{dotted}: true/false where a number is expected" in str(err.value), dotted
    # optional numbers, list items, tuple items and dict values too
    for data, where in [({"sae": {"spec": {"aux_k": True}}}, "sae.spec.aux_k"),
                        ({"model": {"height": False}}, "model.height"),
                        ({"capture": {"layers": [0, True]}}, "capture.layers.1"),
                        ({"sae": {"train": {"betas": [0.9, True]}}}, "sae.train.betas.1"),
                        ({"sae": {"train": {"variant_lr_scale": {"tide": True}}}}, "sae.train.variant_lr_scale.tide"),
                        ({"sweep": {"lrs": [True]}}, "sweep.lrs.0")]:
        with pytest.raises(ConfigError, match=f"{where}: true/false"):
            parse_config(data)


def test_numbers_stay_lax_where_toml_needs_it():
    cfg = parse_config({"sae": {"train": {"lr": 1, "betas": [0.9, 0.99]}}, "edit": {"spatial": False},
                        "sampling": {"guidance_scale": 3}})
    assert cfg.sae.train.lr == 1.0 and cfg.sae.train.betas == (0.9, 0.99) and cfg.edit.spatial is False
    assert cfg.sampling.guidance_scale == 3.0


def test_sae_settings_are_the_libraries_own_with_one_set_of_defaults():
    from tide_core.sae.spec import SAEDesign, SAETrainConfig

    cfg = TideConfig()
    assert cfg.sae.spec == SAEDesign() and cfg.sae.train == SAETrainConfig()
    spec = cfg.sae.spec.bind(d_in=128, variant="topk", num_train_timesteps=1000)
    assert spec.dead_tokens_threshold == 10_000 and spec.aux_coeff == 0.5 and spec.n_latents == 1024


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tide.toml"]  # nothing written


def test_cli_help_on_every_command():
    from pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        out = subprocess.run([sys.executable, "-m", "pipelines.cli", name, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "usage: tide" in out.stdout, name
