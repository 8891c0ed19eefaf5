"""SAELens export (tide_core/sae/export.py, `tide export-sae`): the exported plain SAE reproduces our latents
and reconstructions, checked against SAELens' forward written out here (no SAELens needed) and, when it is
installed, against SAELens' own loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tide_core.sae.export import SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE, export_saelens
from tide_core.sae.model import SparseAutoencoder
from tide_core.sae.spec import SAESpec

D, N, K = 16, 64, 4
TIMESTEPS = [999, 500, 20]


def make_sae(variant: str, seed: int = 1) -> SparseAutoencoder:
    """A tiny SAE whose every folded term matters: an input scale far from 1, b_dec off zero, a nonzero b_enc,
    (tide) a modulation that differs from the identity and between timesteps and (batch variants) a trained
    threshold that drops some positive pre-activations."""
    spec = SAESpec(d_in=D, n_latents=N, k=K, variant=variant, time_embed_dim=8, time_hidden=16)
    sae = SparseAutoencoder(spec, seed=seed, meta={"sae_id": f"L01-resid-{variant}", "layer": 1, "site": "resid"})
    gen = torch.Generator().manual_seed(seed + 100)
    sae.init_from_sample(3 * torch.randn(256, D, generator=gen) + 2)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=gen)
        if sae.time_mlp is not None:
            sae.time_mlp[2].weight.normal_(0, 0.3, generator=gen)
            sae.time_mlp[2].bias.normal_(0, 0.3, generator=gen)
        if sae.spec.selection == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae


def acts(n: int = 300) -> torch.Tensor:
    return 3 * torch.randn(n, D, generator=torch.Generator().manual_seed(7)) + 2  # [n, D], original scale


def ours(sae: SparseAutoencoder, x: torch.Tensor, timestep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    t = None if timestep is None else torch.full((len(x),), timestep)
    z = sae.encode(x, t)
    return z, sae.decode(z)


def saelens_forward(ckpt: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6.x topk / standard / jumprelu encode and decode, from the files alone."""
    cfg = json.loads((ckpt / SAELENS_CONFIG_FILE).read_text())
    w = load_file(str(ckpt / SAELENS_WEIGHTS_FILE))
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if cfg["architecture"] == "jumprelu" else set())
    assert w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"]) and w["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
    assert cfg["normalize_activations"] == "none" and not cfg.get("rescale_acts_by_decoder_norm", False)
    pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]  # [B, d_sae]
    if cfg["architecture"] == "topk":  # top k pre-activations, ReLU'd, the rest zero
        val, idx = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, idx, val.relu())
    elif cfg["architecture"] == "jumprelu":  # ReLU, then zero at or below each latent's threshold
        z = pre.relu() * (pre > w["threshold"])
    else:
        assert cfg["architecture"] == "standard"
        z = pre.relu()
    return z, z @ w["W_dec"] + w["b_dec"]


def assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    for got, want in zip(a, b, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "architecture"), [("topk", "topk"), ("relu", "standard"),
                                                     ("batchtopk", "jumprelu"), ("matryoshka", "jumprelu")])
def test_unmodulated_variants_export_as_one_exact_checkpoint(tmp_path, variant, architecture):
    sae, x = make_sae(variant), acts()
    [ck] = export_saelens(sae, tmp_path / "out")
    assert ck.path == tmp_path / "out" and ck.architecture == architecture and ck.timestep is None
    assert_same(saelens_forward(ck.path, x), ours(sae, x, None))
    cfg = json.loads((ck.path / SAELENS_CONFIG_FILE).read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, N, "float32")
    assert cfg["metadata"]["tide_sae_id"] == f"L01-resid-{variant}" and cfg["metadata"]["tide_layer"] == 1
    if architecture == "jumprelu":  # the threshold matters: some positive pre-activations are dropped
        pre = sae.encoder_input(x) @ sae.W_enc.detach().t() + sae.b_enc.detach()  # [B, n]
        assert ((pre > 0) & (pre <= sae.threshold)).any() and (ours(sae, x, None)[0] > 0).any()


def test_modulated_batch_variants_export_per_timestep(tmp_path):
    x = acts()
    for variant in ("tide_batchtopk", "tide_matryoshka"):
        sae = make_sae(variant)
        written = export_saelens(sae, tmp_path / variant, TIMESTEPS)
        assert {c.architecture for c in written} == {"jumprelu"}
        for ck in written:
            assert_same(saelens_forward(ck.path, x), ours(sae, x, ck.timestep))


def test_tide_exports_one_checkpoint_per_timestep_that_matches_only_there(tmp_path):
    sae, x = make_sae("tide"), acts()
    written = export_saelens(sae, tmp_path / "out", TIMESTEPS, metadata={"model_name": "digits"})
    assert [(c.path.name, c.timestep) for c in written] == [("t0999", 999), ("t0500", 500), ("t0020", 20)]
    for ck in written:
        exported = saelens_forward(ck.path, x)
        assert_same(exported, ours(sae, x, ck.timestep))
        other = ours(sae, x, 500 if ck.timestep != 500 else 999)  # the modulation of another timestep
        assert (exported[0] - other[0]).abs().max() > 1e-2 and (exported[1] - other[1]).abs().max() > 1e-2
        meta = json.loads((ck.path / SAELENS_CONFIG_FILE).read_text())["metadata"]
        assert meta["tide_timestep"] == ck.timestep and meta["model_name"] == "digits"
        assert meta["tide_variant"] == "tide" and meta["sae_lens_version"].startswith("6.")


def test_export_refuses_what_it_cannot_write_exactly(tmp_path):
    with pytest.raises(ValueError, match="per diffusion timestep"):
        export_saelens(make_sae("tide"), tmp_path / "a")
    with pytest.raises(ValueError, match="no timestep modulation"):
        export_saelens(make_sae("topk"), tmp_path / "a", [999])
    with pytest.raises(ValueError, match="num_train_timesteps"):  # folded before anything is written
        export_saelens(make_sae("tide"), tmp_path / "a", [999, 1001])
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a SAELens checkpoint"):
        export_saelens(make_sae("topk"), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export_saelens(make_sae("topk"), tmp_path / "again")
    export_saelens(make_sae("topk", seed=2), tmp_path / "again")  # an earlier export is replaced


def test_saelens_loads_the_export_with_its_own_loader(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x = acts()
    for variant in ("topk", "relu", "tide", "batchtopk", "tide_matryoshka"):
        sae = make_sae(variant)
        for ck in export_saelens(sae, tmp_path / variant, TIMESTEPS if sae.spec.modulated else None):
            loaded = sae_lens.SAE.load_from_disk(str(ck.path), device="cpu")
            assert loaded.cfg.architecture() == ck.architecture
            with torch.no_grad():
                z = loaded.encode(x)
                assert_same((z, loaded.decode(z)), ours(sae, x, ck.timestep))
            assert loaded.cfg.metadata.tide_timestep == ck.timestep
            assert loaded.cfg.metadata.tide_sae_id == f"L01-resid-{variant}"


def test_cli_exports_a_warehouse_sae(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    from storage import ActivationStore, StoreLayout, Warehouse
    from tide_core.config import CONFIG_ENV

    config = tmp_path / "tide.toml"
    config.write_text('[warehouse]\nroot = "wh"\n')
    monkeypatch.setenv(CONFIG_ENV, str(config))  # the CLI sets it; restored after the test
    root = tmp_path / "wh"
    store_url = str(tmp_path / "run0.zarr")  # not the config's default store: found through the runs row
    layout = StoreLayout(num_samples=8, shard_size=8, steps=[0, 1, 2], layers=[1], sites=["resid"], tokens_total=4,
                         tokens_stored=4, token_grid=[2, 2], d_model=D, image_shape=[4, 4, 1])
    ActivationStore.create(store_url, layout, {"run_id": "run0", "capture_timesteps": TIMESTEPS})
    wh = Warehouse(root / "warehouse.duckdb")
    wh.upsert_run("run0", {"config": {}, "store_url": store_url}, model_source="digits")
    saes = {v: make_sae(v) for v in ("tide", "topk")}
    for variant, sae in saes.items():
        sid = f"L01-resid-{variant}"
        sae.save(root / "saes" / sid)
        wh.replace_partition("saes", {"sae_id": sid}, [{"run_id": "run0", "layer": 1, "site": "resid",
                                                         "variant": variant, "n_latents": N, "k": K,
                                                         "path": str(root / "saes" / sid), "tokens_seen": 1}])
    out = tmp_path / "export"
    assert main(["export-sae", "L01-resid-tide", "--format", "saelens", str(out / "tide")]) == 0
    assert sorted(p.name for p in (out / "tide").iterdir()) == ["t0020", "t0500", "t0999"]  # the run's timesteps
    x = acts()
    assert_same(saelens_forward(out / "tide" / "t0500", x), ours(saes["tide"], x, 500))
    assert json.loads((out / "tide" / "t0500" / SAELENS_CONFIG_FILE).read_text())["metadata"]["model_name"] == "digits"
    assert main(["export-sae", "L01-resid-tide", str(out / "one"), "--timestep", "42"]) == 0
    assert [p.name for p in (out / "one").iterdir()] == ["t0042"]
    assert main(["export-sae", "L01-resid-topk", str(out / "topk")]) == 0
    assert_same(saelens_forward(out / "topk", x), ours(saes["topk"], x, None))
    capsys.readouterr()
    assert main(["export-sae", "L01-resid-tpk", str(out / "x")]) == 1
    assert "Did you mean L01-resid-topk" in capsys.readouterr().err
    assert main(["export-sae", "L01-resid-topk", str(out / "x"), "--timestep", "5"]) == 1
    assert "no timestep modulation" in capsys.readouterr().err
