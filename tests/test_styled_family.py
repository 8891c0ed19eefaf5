"""The styled-digits family: what each prompt asks of each factor, per-factor accuracy against a plain loop,
factor values as concepts, the shipped prompt set, and `tide run` end to end on a tiny trained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import CONCEPT_KINDS
from tide_core.factors import UNASKED, class_factors, factor_accuracy
from tide_core.features.concepts import class_concepts, factor_concepts
from tide_core.models.styled import FactorJudgeAdapter
from tide_core.styled_digits import FACTORS, STYLE_FACTORS, caption, factor_grid

REPO = Path(__file__).resolve().parents[1]


def test_a_prompt_asks_for_what_it_names_and_unknown_words_are_kept():
    asked = FactorJudgeAdapter.condition_factors(
        ["a bold red seven on a white background", "a blue two", "a seven in watercolor", "a red blue three"])
    assert asked.names == ("class", "colour", "thickness", "background")
    v = {f.name: f.values for f in FACTORS}
    assert asked.codes[0].tolist() == [7, v["colour"].index("red"), 2, v["background"].index("white")]
    assert asked.codes[1].tolist() == [2, v["colour"].index("blue"), UNASKED, UNASKED]
    assert asked.codes[2].tolist() == [7, UNASKED, UNASKED, UNASKED]
    assert asked.unknown[2] == ("watercolor",) and asked.unknown[3] == ("blue",)  # two colours: the second
    assert asked.unknown_words() == {"blue": 1, "watercolor": 1}
    missing = asked.missing_values()
    assert "thin" in missing["thickness"] and "zero" in missing["class"] and "background" in missing


def test_factor_accuracy_equals_a_plain_loop():
    rng = np.random.default_rng(0)
    grid = factor_grid()
    texts = [caption(c, keep) for c, keep in zip(grid[::7], rng.random((len(grid[::7]), 4)) > 0.3, strict=True)]
    asked = FactorJudgeAdapter.condition_factors(texts)
    conditions = rng.integers(len(texts), size=300)
    pred = np.stack([rng.integers(len(f.values), size=300) for f in FACTORS], axis=1)  # [N, F]
    pred[::2] = asked.codes[conditions[::2]].clip(0)  # half right where asked
    got = factor_accuracy(asked, conditions, pred)
    for j, f in enumerate(FACTORS):
        hits = [pred[i, j] == asked.codes[c, j] for i, c in enumerate(conditions) if asked.codes[c, j] != UNASKED]
        assert got.per_factor[f.name] == pytest.approx(np.mean(hits)) and got.images[f.name] == len(hits)
        for k, value in enumerate(f.values):
            hv = [pred[i, j] == k for i, c in enumerate(conditions) if asked.codes[c, j] == k]
            assert (value in got.per_value[f.name]) == bool(hv)
            if hv:
                assert got.per_value[f.name][value] == pytest.approx(np.mean(hv))


def test_factor_values_are_concepts_of_their_factor():
    texts = ["a bold red seven on a white background", "a blue seven", "a two"]
    c = factor_concepts(FactorJudgeAdapter.condition_factors(texts))
    kinds = dict(zip(c.names, c.kinds, strict=True))
    assert kinds == {"two": "class", "seven": "class", "red": "colour", "blue": "colour", "bold": "thickness",
                     "white": "background"}
    col = {n: j for j, n in enumerate(c.names)}
    assert c.incidence[:, col["seven"]].tolist() == [True, True, False]
    assert c.incidence[:, col["red"]].tolist() == [True, False, False]
    assert set(kinds.values()) <= set(CONCEPT_KINDS)  # the table's CHECK accepts every factor
    assert set(STYLE_FACTORS) <= set(CONCEPT_KINDS)
    # a class run: the class factor's concepts are the class concepts
    names = [str(i) for i in range(10)]
    a, b = factor_concepts(class_factors(names)), class_concepts(names)
    assert (a.names, a.kinds) == (b.names, b.kinds) and (a.incidence == b.incidence).all()


def test_the_shipped_prompt_set_is_balanced_and_unconfounded():
    """60 full captions: every class x colour pair once, each thickness and background 20 times, and no factor
    tells about another (else a colour latent would look like a class latent)."""
    from sklearn.metrics import mutual_info_score

    with open(REPO / "configs" / "styled-digits-prompts.csv") as f:
        texts = [r["prompt"] for r in csv.DictReader(f)]
    asked = FactorJudgeAdapter.condition_factors(texts)
    assert len(set(texts)) == 60 and set(texts) <= {caption(c) for c in factor_grid()}
    assert asked.missing_values() == {} and asked.unknown_words() == {} and (asked.codes != UNASKED).all()
    assert len({(a, b) for a, b in asked.codes[:, :2].tolist()}) == 60
    assert [np.bincount(asked.codes[:, j]).tolist() for j in (2, 3)] == [[20, 20, 20]] * 2
    pairs = [mutual_info_score(asked.codes[:, i], asked.codes[:, j]) / np.log(2) for i in range(4) for j in range(i)]
    assert max(pairs) < 0.02  # bits


TINY = {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, "head_dim": 16, "text_width": 16,
        "text_layers": 1, "train_steps": 3, "batch_size": 8, "warmup_steps": 1}


@pytest.mark.slow
def test_a_styled_digits_run_end_to_end_scores_every_factor(tmp_path):
    """tide run on a tiny styled-digits PixArt (3 training steps): the judge reports every head, sample quality
    reports every factor (naming the values the prompts never ask for and the words it cannot score), the
    samples carry the judge's class, and the concept table holds factor values."""
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.project import Project
    from pipelines.runner import materialize
    from storage import Warehouse
    from tests.conftest import write_config

    (tmp_path / "prompts.csv").write_text("prompt\na bold red seven on a white background\na thin blue two\n"
                                          "a green seven on a black background\na regular two in watercolor\n")
    cfg = {"model": {"source": "styled-digits", "max_prompt_tokens": 12,
                     "styled_digits": {**TINY, "checkpoint_dir": str(tmp_path / "styled")},
                     "judge": {"epochs": 1, "quality_samples": 16}},
           "sampling": {"prompts": str(tmp_path / "prompts.csv"), "num_steps": 3, "guidance_scale": 2.0,
                        "num_samples": 12, "shard_size": 6},
           "capture": {"layers": [1], "sites": ["resid"]},
           "sae": {"variants": ["topk"], "spec": {"n_latents": 32, "k": 4}},
           "edit": {"feature_ids": [0], "n_samples": 2}, "features": {"probe_folds": 2}}
    project = Project.load(write_config(tmp_path / "run", cfg))
    logs: list[str] = []
    report = materialize(definitions_for(project), warehouse_instance(project), log=logs.append)
    assert report.success
    meta = json.loads((tmp_path / "styled" / "tide_model.json").read_text())
    assert meta["styled_digits_fingerprint"] and meta["loss_curve"]["step"][-1] == 3
    # a v-prediction model: its scheduler says so, and the splice's denoiser loss targets v, as training did
    from tide_core.models.registry import load_model
    from tide_core.prompts import read_prompt_file

    model = load_model(project.config.model, read_prompt_file(tmp_path / "prompts.csv"))
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    x0, noise, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    noised, target = model.training_pair(x0, noise, t)
    a = model.training_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noised, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    judge = json.loads((project.judge_dir / "judge.json").read_text())
    assert set(judge["test_accuracy_per_factor"]) == {"class", "colour", "thickness", "background"}
    assert judge["test_accuracy"] == min(judge["test_accuracy_per_factor"].values())
    quality = json.loads((project.root / "sample_quality.json").read_text())
    assert set(quality["per_factor_accuracy"]) == {"class", "colour", "thickness", "background"}
    assert quality["accuracy"] == quality["per_factor_accuracy"]["class"]
    assert "zero" in quality["missing_values"]["class"] and "grey" in quality["missing_values"]["background"]
    assert quality["unknown_words"] == {"watercolor": 1}
    for factor in ("colour", "thickness", "background"):
        assert (project.root / f"sample_quality_{factor}.png").is_file()
    wh = Warehouse(project.duckdb_path)
    rows = wh.query("SELECT count(*) AS n, count(judge_pred) AS judged FROM samples").to_pylist()[0]
    assert rows == {"n": 12, "judged": 12}
    kinds = wh.query("SELECT DISTINCT kind, concept FROM feature_concepts ORDER BY ALL").to_pylist()
    assert {k["kind"] for k in kinds} <= {"class", "colour", "thickness", "background"}
    assert {"kind": "colour", "concept": "red"} in kinds or {"kind": "colour", "concept": "blue"} in kinds
    # the association of every latent with every factor the prompts name, per step and pooled; a unique grain
    assert wh.check_grain("feature_factors") == 0
    factors = wh.query("SELECT factor, count(DISTINCT step) AS steps, min(normalized_mi) AS lo, "
                       "max(normalized_mi) AS hi FROM v_feature_factors GROUP BY factor ORDER BY factor").to_pylist()
    assert [f["factor"] for f in factors] == ["background", "class", "colour", "thickness"]
    assert all(f["steps"] == 3 + 1 and 0 <= f["lo"] <= f["hi"] <= 1 for f in factors)  # 3 steps and pooled
    first = wh.query("SELECT layer, variant, min(step) AS first_step FROM v_factor_emergence "
                     "WHERE factor = 'colour' AND best_normalized_mi > 0 GROUP BY ALL").to_pylist()
    assert first and first[0]["layer"] == 1
    # sparse probes of what the judge sees, at every probed step: the SAE's k latents and the raw channels
    assert wh.check_grain("factor_probes") == 0
    probes = wh.query("SELECT factor, k, count(DISTINCT step) AS steps, min(accuracy) AS lo, max(accuracy) AS hi, "
                      "bool_and(features IS NULL) AS raw FROM v_factor_probes GROUP BY ALL ORDER BY ALL").to_pylist()
    # 12 images: only the colour shows two values on at least 2 images each (the folds); every k, every step
    assert [(p["factor"], p["k"]) for p in probes] == [("colour", 0), ("colour", 1), ("colour", 4), ("colour", 16)]
    assert all(p["steps"] == 3 and 0 <= p["lo"] <= p["hi"] <= 1 and p["raw"] == (p["k"] == 0) for p in probes)
    assert (project.root / "dashboard" / "index.html").is_file()
    # feature pages carry each feature's factor information by step
    chunks = [json.loads(p.read_text()) for p in (project.root / "dashboard" / "data" / "sae").glob("*/f/*.json")]
    with_factors = [d["factors"] for c in chunks for d in c["features"].values() if d["factors"]]
    assert with_factors and {"factor", "step", "normalized_mi"} <= set(with_factors[0])
    # the overview charts the probes: every SAE carries its rows, column-wise
    site = json.loads((project.root / "dashboard" / "data" / "site.json").read_text())
    assert all(set(s["probes"]) == {"factor", "step", "k", "accuracy", "chance"} for s in site["saes"])
    assert sorted(set(site["saes"][0]["probes"]["k"])) == [0, 1, 4, 16]


def test_the_committed_model_is_the_one_the_config_trains():
    """models/styled-digits records the fingerprint of configs/styled-digits.toml's section, so a run of that
    config uses it instead of training (and a change to the section would retrain)."""
    from tide_core.config import load_config

    cfg = load_config(REPO / "configs" / "styled-digits.toml").model.styled_digits
    meta = json.loads((REPO / "models" / "styled-digits" / "tide_model.json").read_text())
    assert meta["styled_digits_fingerprint"] == cfg.fingerprint()
    assert meta["styled_digits_config"]["prediction_type"] == "v_prediction"
    scheduler = json.loads((REPO / "models" / "styled-digits" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_a_factor_no_prompt_asks_for_has_no_grid():
    """Prompts that name only the digit ("a seven"): the style factors get no grid (and no accuracy to check)
    instead of failing the quality asset."""
    from pipelines.stages.model import factor_grid_png

    images = np.zeros((6, 3, 8, 8), np.float32)
    assert factor_grid_png(images, np.full(6, -1), 3) is None
    assert factor_grid_png(images, np.array([0, 0, 1, 1, -1, -1]), 3)[:8] == b"\x89PNG\r\n\x1a\n"
