"""Feature-guided editing: the hook's math and window, style transfer, refusals, and the CLI / asset path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import quiet
from tide_core.edit import EditError, EditHook, EditSpec, StepWindow
from tide_core.sae import SAESpec, SparseAutoencoder

LAYER = 1


def exact_sae(d: int, layer: int = LAYER, variant: str = "tide") -> SparseAutoencoder:
    """An SAE that reconstructs exactly: latents relu(x) and relu(-x) (k = n_latents = 2d), decoder [I; -I].
    dec(z') - dec(z) is then exactly the change the edit asks for, so tests can predict block outputs."""
    sae = SparseAutoencoder(SAESpec(d_in=d, n_latents=2 * d, k=2 * d, variant=variant),
                            meta={"layer": layer, "site": "resid", "sae_id": f"L{layer:02d}-exact"})
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


class Recorder:
    """Records the block output the rest of the model sees (registered after the edit hook)."""

    def __init__(self, model, layer):
        self.outputs: list[torch.Tensor] = []
        self.handle = model.transformer_blocks[layer].register_forward_hook(
            lambda _m, _i, out: self.outputs.append(out.detach().clone()))

    def close(self):
        self.handle.remove()


@pytest.fixture
def sampler(tiny_project):
    return quiet(tiny_project()).sampler()


def run(sampler, ids, classes, hook=None, record=False):
    rec = Recorder(sampler.model.transformer, LAYER) if record else None
    try:
        if hook is None:
            images = sampler.sample(ids, classes).images
        else:
            with hook:
                if rec is not None:  # re-register so the recorder sees the edited output
                    rec.close()
                    rec = Recorder(sampler.model.transformer, LAYER)
                images = sampler.sample(ids, classes, observer=hook).images
    finally:
        if rec is not None:
            rec.close()
    return images, (rec.outputs if rec is not None else None)


def hook_for(sampler, sae, spec, **kw):
    return EditHook(sampler.model, LAYER, sae, spec, sampler.num_steps, **kw)


# --- the hook ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,strength", [("add", 0.0), ("scale", 1.0), ("zero", 0.0)])
def test_an_edit_that_changes_nothing_reproduces_the_unedited_images(sampler, op, strength):
    ids, classes = [0, 1, 2], [0, 1, 2]
    sae = SparseAutoencoder(SAESpec(d_in=32, n_latents=64, k=4, variant="tide"), seed=1, meta={"layer": LAYER})
    plain, _ = run(sampler, ids, classes)
    # zero on a latent that never fires in the top k (bias -inf) changes nothing either
    with torch.no_grad():
        sae.b_enc[5] = -1e9
    features = (5,) if op == "zero" else (3, 5)
    spec = EditSpec(op, features, strength, StepWindow(0, sampler.num_steps - 1))
    edited, _ = run(sampler, ids, classes, hook_for(sampler, sae, spec))
    assert np.array_equal(plain, edited)  # x + dec(z) - dec(z) is x exactly, not just closely


def test_zeroing_changes_the_block_output_only_inside_the_window(sampler):
    ids, classes = [0, 1], [3, 4]
    sae = exact_sae(32)
    _, plain = run(sampler, ids, classes, record=True)
    hook = hook_for(sampler, sae, EditSpec("zero", tuple(range(32)), 0.0, StepWindow(1, 2)))
    images, edited = run(sampler, ids, classes, hook, record=True)
    assert [r.step for r in hook.records] == [1, 2]
    assert torch.equal(plain[0], edited[0])  # before the window: untouched
    # at the window's first step the input is unchanged, so the edit is exactly the output's change:
    # zeroing relu(x) for every channel leaves x - relu(x) = min(x, 0)
    assert torch.allclose(edited[1], plain[1].clamp(max=0), atol=1e-6)
    assert hook.records[0].delta_norm > 0


def test_boosting_adds_the_decoder_direction_in_units_and_only_to_the_conditional_half_if_asked(sampler):
    ids, classes = [0, 1], [5, 6]
    sae = exact_sae(32)
    _, plain = run(sampler, ids, classes, record=True)
    spec = EditSpec("add", (7,), 2.0, StepWindow(0, 0), branch="cond")
    hook = hook_for(sampler, sae, spec, feature_units={7: 0.5})
    _, edited = run(sampler, ids, classes, hook, record=True)
    diff = edited[0] - plain[0]  # [2B, T, D]: cond rows first
    assert torch.allclose(diff[:2, :, 7], torch.full_like(diff[:2, :, 7], 1.0))  # 2.0 x unit 0.5, W_dec row 7 = e_7
    assert diff[:2].abs().sum() == diff[:2, :, 7].abs().sum()
    assert torch.equal(edited[0][2:], plain[0][2:])  # the unconditional half is untouched


@pytest.mark.parametrize("branch", ["both", "cond"])
def test_steering_adds_each_rows_direction_at_its_steps_to_the_branches_asked(sampler, branch):
    from tide_core.steer import SteerHook, value_means

    ids, classes = [0, 1], [5, 6]
    _, plain = run(sampler, ids, classes, record=True)
    dirs = {0: np.stack([np.eye(32)[3], -2 * np.eye(32)[9]])}  # [rows, D] at step 0 only
    _, edited = run(sampler, ids, classes, SteerHook(sampler.model, LAYER, dirs, 1.5, branch=branch), record=True)
    diff = edited[0] - plain[0]  # [2 rows x 2 halves, T, D]: cond rows first
    halves = 1 if branch == "cond" else 2
    want = torch.zeros_like(diff)
    for h in range(halves):
        want[2 * h, :, 3], want[2 * h + 1, :, 9] = 1.5, -3.0
    assert torch.allclose(diff, want, atol=1e-5)
    acts = np.arange(12, dtype=np.float32).reshape(3, 2, 2)  # [N, P, d]: per-image means [1, 2], [5, 6], [9, 10]
    means = value_means(acts, np.array([1, -1, 1]), 3)
    assert np.isnan(means[0]).all() and np.allclose(means[1], [(1 + 9) / 2, (2 + 10) / 2])
    with pytest.raises(ValueError, match="'both' or 'cond'"):
        SteerHook(sampler.model, LAYER, dirs, 1.0, branch="uncond")


def test_hit_rate_compares_the_judges_class_with_the_class_the_target_condition_asks_for():
    """In a text run condition 7 is a prompt (say "a red three"): the judge's verdicts are digits, so a hit
    is a verdict of 3, not of 7; a target prompt that names no class has no hit rate."""
    from pipelines.stages.edit import EditResult, Judged, summarise

    images = np.zeros((3, 4, 4, 3), np.uint8)

    def result(target_judged):
        return EditResult(edit_id="e", spec=EditSpec("add", (1,), 2.0, StepWindow(0, 1)), config={},
                          sample_ids=np.arange(3), class_ids=np.zeros(3, np.int64), feature_ids=[[1]] * 3,
                          reference_ids=None, target_class=7, before=Judged(images, np.array([1, 3, 2]), np.ones(3)),
                          after=Judged(images, np.array([3, 3, 1]), np.ones(3)), references=None, delta_ratio=0.1,
                          target_judged=target_judged)

    s = summarise(result(3))
    assert (s.eligible, s.hit_rate, s.changed) == (2, 0.5, 2 / 3)  # samples 0 and 2 were not a 3; one became one
    assert summarise(result(-1)).hit_rate is None and summarise(result(-1)).eligible == 0
    assert summarise(result(None)).eligible == 3  # a class run: the condition is the judge's class (7)


def test_style_copies_the_reference_latents(sampler):
    ids, classes, ref = [0, 1], [2, 3], 9
    sae = exact_sae(32)
    _, plain_ref = run(sampler, [ref], [7], record=True)
    hook = hook_for(sampler, sae, EditSpec("style", (), 1.0, StepWindow(0, 0)), n_references=1)
    _, edited = run(sampler, [*ids, ref], [*classes, 7], hook, record=True)
    n = len(ids) + 1
    for half in (0, 1):  # with an exact SAE, copying every latent copies the block output
        rows = edited[0][half * n: (half + 1) * n]
        assert torch.allclose(rows[0], rows[2], atol=1e-5) and torch.allclose(rows[1], rows[2], atol=1e-5)
        assert torch.allclose(rows[2], plain_ref[0][half], atol=1e-4)  # the reference itself is not edited


def test_style_with_the_target_as_its_own_reference_changes_nothing(sampler):
    sae = SparseAutoencoder(SAESpec(d_in=32, n_latents=64, k=4, variant="tide"), seed=2, meta={"layer": LAYER})
    plain, _ = run(sampler, [4], [4])
    hook = hook_for(sampler, sae, EditSpec("style", (), 1.0, StepWindow(0, sampler.num_steps - 1)), n_references=1)
    edited, _ = run(sampler, [4, 4], [4, 4], hook)
    assert np.allclose(edited[0], plain[0], atol=1e-5)


def test_edit_latents_ops():
    hook = EditHook.__new__(EditHook)  # only the latent arithmetic, no model
    z = torch.tensor([[[[1.0, 2.0, 0.0]], [[3.0, 0.0, 4.0]], [[9.0, 8.0, 7.0]]]])  # [H=1, n=3, T=1, F=3]
    hook.n_references = 1
    hook._mask = torch.tensor([[True, False, True]])
    hook._units = torch.tensor([1.0, 1.0, 2.0])
    expect = {
        ("add", 1.5): [[2.5, 2.0, 3.0], [4.5, 0.0, 7.0]],
        ("clamp", 1.5): [[1.5, 2.0, 3.0], [1.5, 0.0, 3.0]],
        ("scale", 2.0): [[2.0, 2.0, 0.0], [6.0, 0.0, 8.0]],
        ("zero", 0.0): [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]],
        ("style", 0.5): [[5.0, 2.0, 3.5], [6.0, 0.0, 5.5]],
    }
    for (op, s), want in expect.items():
        hook.spec = EditSpec(op, (0, 2), s, StepWindow(0, 0))
        out = hook.edit_latents(z)
        assert torch.allclose(out[0, :2, 0], torch.tensor(want)), op
        assert torch.equal(out[0, 2], z[0, 2])  # the reference row never changes


def test_feature_maps_weight_the_add_per_token(sampler):
    ids, classes = [0], [1]
    sae = exact_sae(32)
    _, plain = run(sampler, ids, classes, record=True)
    n_tok = plain[0].shape[1]
    where = torch.zeros(n_tok)
    where[5] = 1.0
    hook = hook_for(sampler, sae, EditSpec("add", (7,), 2.0, StepWindow(0, 0)), feature_maps={7: where.tolist()})
    _, edited = run(sampler, ids, classes, hook, record=True)
    diff = edited[0] - plain[0]  # [2, T, D]
    assert torch.allclose(diff[:, 5, 7], torch.full((2,), 2.0)) and diff.abs().sum() == diff[:, 5, 7].abs().sum()
    with pytest.raises(EditError, match="cover 3 tokens but the model has"):
        bad = hook_for(sampler, sae, EditSpec("add", (7,), 2.0, StepWindow(0, 0)), feature_maps={7: [1, 0, 0]})
        run(sampler, ids, classes, bad)


def test_pooled_style_matches_feature_means_and_keeps_the_layout():
    hook = EditHook.__new__(EditHook)
    hook.n_references, hook._mask, hook._units = 1, torch.tensor([[True, True]]), torch.ones(2)
    z = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[8.0, 5.0], [4.0, 5.0]]]])  # [H=1, n=2, T=2, F=2]
    hook.spec = EditSpec("style", (), 1.0, StepWindow(0, 0), pooled=True)
    out = hook.edit_latents(z)[0, 0]  # [T, F] of the target
    assert torch.allclose(out[:, 0], torch.tensor([3.0, 9.0]))  # mean 2 -> 6, layout 1:3 kept
    assert torch.equal(out[:, 1], torch.zeros(2))  # absent in the target: stays absent
    hook.spec = EditSpec("style", (), 1.0, StepWindow(0, 0))
    assert torch.allclose(hook.edit_latents(z)[0, 0], z[0, 1])  # token by token: a copy
    with pytest.raises(EditError, match="pooled applies to op 'style' only"):
        EditSpec("add", (1,), 1.0, StepWindow(0, 0), pooled=True).check(4, 1)


def test_named_windows_split_the_schedule_into_thirds():
    thirds = [StepWindow.named(n, 50) for n in ("early", "middle", "late")]
    assert [(w.start, w.end) for w in thirds] == [(0, 16), (17, 32), (33, 49)]
    assert StepWindow.parse("all", 50) == StepWindow(0, 49)
    assert StepWindow.parse("10-20", 50) == StepWindow(10, 20) and StepWindow.parse("7", 50) == StepWindow(7, 7)


def test_cfg_renorm_caps_the_guided_norm_at_the_conditional_one():
    from tide_core.sampling import renorm_guided

    cond = torch.ones(2, 1, 4, 4)
    guided = torch.stack([3 * torch.ones(1, 4, 4), 0.5 * torch.ones(1, 4, 4)])
    out = renorm_guided(guided, cond, 1.0)
    assert torch.allclose(out[0].norm(), cond[0].norm()) and torch.equal(out[1], guided[1])


# --- refusals ----------------------------------------------------------------------------------------------


def test_bad_edits_fail_before_sampling_with_what_to_change(sampler):
    sae = exact_sae(32)
    n = sampler.num_steps
    with pytest.raises(EditError, match=r"unknown feature id\(s\) \[64\].*ids 0..63"):
        hook_for(sampler, sae, EditSpec("zero", (64,), 0.0, StepWindow(0, 0)))
    with pytest.raises(EditError, match=f"outside the schedule: sampling has {n} steps"):
        hook_for(sampler, sae, EditSpec("zero", (1,), 0.0, StepWindow(2, n)))
    with pytest.raises(EditError, match="outside the schedule"):
        StepWindow.parse("3-1", n)
    with pytest.raises(EditError, match="trained on layer 0, not layer 1"):
        hook_for(sampler, exact_sae(32, layer=0), EditSpec("zero", (1,), 0.0, StepWindow(0, 0)))
    with pytest.raises(EditError, match="expects 16 channels but the model's blocks output 32"):
        hook_for(sampler, exact_sae(16), EditSpec("zero", (1,), 0.0, StepWindow(0, 0)))
    with pytest.raises(EditError, match="needs reference rows"):
        hook_for(sampler, sae, EditSpec("style", (), 1.0, StepWindow(0, 0)))
    with pytest.raises(EditError, match="needs at least one feature id"):
        hook_for(sampler, sae, EditSpec("add", (), 1.0, StepWindow(0, 0)))
    with pytest.raises(EditError, match="strength >= 0"):
        hook_for(sampler, sae, EditSpec("scale", (1,), -1.0, StepWindow(0, 0)))


# --- the warehouse side ------------------------------------------------------------------------------------


@pytest.fixture
def edit_project(tiny_project):
    """A tiny project with a captured store, published samples and an exact SAE of layer 1 in `saes`."""
    from pipelines.stages import capture, samples
    from storage import Warehouse

    project = tiny_project({"edit": {"strengths": [3.0], "windows": ["all"], "n_samples": 3,
                                     "units": "absolute", "spatial": False, "unconditional": False}})
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    run_id = samples.publish_samples(ctx).run_id
    sae_id = f"L01-resid-tide-exact-{run_id[:8]}"
    path = exact_sae(32).save(project.root / "saes" / sae_id, meta={"sae_id": sae_id, "run_id": run_id})
    wh = Warehouse(project.duckdb_path)
    wh.replace_partition("saes", {"sae_id": sae_id}, [{"run_id": run_id, "layer": 1, "site": "resid",
                                                       "variant": "tide", "n_latents": 64, "k": 64,
                                                       "path": str(path)}])
    return project, wh, sae_id


def put_features(wh, sae_id, rows):
    wh.replace_partition("features", {"sae_id": sae_id}, [
        {"feature_id": f, "top_class": c, "class_selectivity": sel, "fire_rate": rate, "mean_act": 0.5}
        for f, c, sel, rate in rows])


def test_feature_selection_takes_the_most_selective_for_the_class(edit_project):
    from pipelines.stages.edit_plan import feature_maps, feature_units, select_features

    _, wh, sae_id = edit_project
    with pytest.raises(EditError, match="no rows for SAE"):
        select_features(wh, sae_id, 3, 2)
    put_features(wh, sae_id, [(1, 3, 0.9, 0.0001), (2, 3, 0.8, 0.01), (4, 3, 0.6, 0.02), (5, 3, 0.7, 0.05),
                              (6, 2, 0.95, 0.05)])
    assert select_features(wh, sae_id, 3, 2, min_fire_rate=0.001) == [2, 5]
    assert select_features(wh, sae_id, 3, 10) == [1, 2, 5, 4]
    with pytest.raises(EditError, match="no feature of SAE .* has top_class 7"):
        select_features(wh, sae_id, 7, 2)
    assert feature_units(wh, sae_id, [2, 5]) == {2: 0.5, 5: 0.5}
    with pytest.raises(EditError, match="units='absolute'"):
        feature_units(wh, sae_id, [2, 9])
    with pytest.raises(EditError, match="no top-image heatmaps"):
        feature_maps(wh, sae_id, [2])
    wh.replace_partition("top_images", {"sae_id": sae_id}, [
        {"feature_id": 2, "scope": "overall", "rank": k, "sample_id": k, "heatmap": h, "grid_h": 1, "grid_w": 3}
        for k, h in enumerate([[0.0, 1.0, 3.0], [0.0, 3.0, 1.0]], start=1)])
    assert feature_maps(wh, sae_id, [2])[2].tolist() == [0.0, 1.0, 1.0]  # mean heatmap, peak 1


def put_concepts(wh, sae_id, rows):
    wh.replace_partition("feature_concepts", {"sae_id": sae_id}, [
        {"feature_id": f, "concept": c, "kind": "class", "images": 10, "fire_rate": rate, "mean_act": 0.5,
         "lift": lift} for f, c, rate, lift in rows])


def test_concept_edits_take_the_highest_lift_latents_and_score_the_concept(edit_project):
    """--concept picks latents from feature_concepts (lift > 1, highest first), edits held-out samples of
    conditions without the concept, and each row says whether the judge saw it before and after."""
    from pipelines.stages.edit import run_configured_edits, summarise
    from pipelines.stages.edit_plan import plan_edits, with_edit
    from tide_core.sampling import condition_for

    project, wh, sae_id = edit_project
    put_features(wh, sae_id, [(f, f % 10, 0.5, 0.01) for f in range(64)])
    put_concepts(wh, sae_id, [(5, "3", 0.2, 2.0), (9, "3", 0.3, 4.0), (11, "3", 0.0001, 9.0), (12, "3", 0.4, 0.9),
                              (13, "4", 0.5, 8.0)])
    p = with_edit(project, sae_id=sae_id, concept="3", feature_ids=[], n_features=5, n_samples=2,
                  windows=["1-2"])
    plan = plan_edits(quiet(p))
    assert plan.feature_ids == [9, 5]  # 11 fires too rarely, 12 not more often with the concept
    assert plan.target_class is None and (plan.concept.kind, plan.concept.factor, plan.concept.value) == ("class", 0, 3)
    classes = quiet(p).store().provenance["sampling"]["classes"]
    assert all(condition_for(int(i), classes) != 3 for i in plan.sample_ids)
    assert plan_edits(quiet(with_edit(p, concept="class:3"))).feature_ids == [9, 5]
    for bad, match in (("purple", "not a concept of this run; its concepts are class:0, class:1"),
                       ("word:3", "not a concept of this run")):
        with pytest.raises(EditError, match=match):
            plan_edits(quiet(with_edit(p, concept=bad)))
    with pytest.raises(EditError, match="lower edit.min_fire_rate"):
        plan_edits(quiet(with_edit(p, concept="3", min_fire_rate=0.9)))
    with pytest.raises(ValueError, match="both pick the latents"):
        with_edit(p, feature_ids=[1])
    assert with_edit(p, target_class=4).config.edit.concept is None  # a class asked for replaces the concept

    r = run_configured_edits(quiet(p)).results[0]
    rows = wh.query("SELECT * FROM edits WHERE edit_id = ? ORDER BY sample_id", [r.edit_id]).to_pylist()
    assert [row["concept"] for row in rows] == ["3", "3"] and rows[0]["target_class"] is None
    assert [row["concept_before"] for row in rows] == [row["pred_before"] == 3 for row in rows]
    assert [row["concept_after"] for row in rows] == [row["pred_after"] == 3 for row in rows]
    assert json.loads(rows[0]["config_json"])["concept"] == "class:3"
    s = summarise(r)
    assert s.eligible == sum(not row["concept_before"] for row in rows)
    if s.eligible:
        assert s.hit_rate == np.mean([row["concept_after"] for row in rows if not row["concept_before"]])


def test_plan_refuses_an_sae_of_another_model_or_run(edit_project):
    from pipelines.stages.edit_plan import plan_edits, with_edit

    project, wh, sae_id = edit_project
    project = with_edit(project, sae_id=sae_id, feature_ids=[1])
    assert plan_edits(quiet(project)).target.layer == 1
    with pytest.raises(EditError, match="no SAE 'nope'"):
        plan_edits(quiet(with_edit(project, sae_id="nope")))
    rec = wh.require_sae(sae_id)
    wh.replace_partition("saes", {"sae_id": "other-run"}, [{"run_id": "0123456789ab", "layer": 1, "site": "resid",
                                                            "variant": "tide", "n_latents": 64, "path": rec.path}])
    with pytest.raises(EditError, match="trained on run 0123456789ab"):
        plan_edits(quiet(with_edit(project, sae_id="other-run")))
    run = wh.query("SELECT * FROM runs").to_pylist()[0]
    wh.upsert_run(run["run_id"], run["config_json"], model_hash="feedfacefeedface")
    with pytest.raises(EditError, match="comes from model feedfacefeedface"):
        plan_edits(quiet(project))


@pytest.mark.slow
def test_cli_writes_before_after_rows_and_a_grid(edit_project, capsys):
    from pipelines.cli import main

    project, wh, sae_id = edit_project
    args = ["edit", "--config", str(project.config_path), "--features", "3,7", "--strength", "2",
            "--strength", "0", "--window", "1-2", "--samples", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grid:" in out
    rows = wh.query("SELECT * FROM v_edits ORDER BY strength, sample_id").to_pylist()
    assert len(rows) == 6 and {r["sample_id"] for r in rows} == {16, 17, 18}  # held-out shard
    assert {(r["op"], r["step_start"], r["step_end"], r["layer"]) for r in rows} == {("add", 1, 2, 1)}
    zero = [r for r in rows if r["strength"] == 0]
    assert all(r["pred_after"] == r["pred_before"] and r["conf_after"] == pytest.approx(r["conf_before"])
               for r in zero)  # strength 0 is the unedited image
    assert json.loads(rows[0]["config_json"])["feature_ids"] == [3, 7]
    assert wh.check_grain("edits") == 0
    assert len(list((project.root / "edits").glob("*.png"))) == 1
    png = {(r["sample_id"], r["strength"], side): (project.root / r[f"image_{side}"]).read_bytes()
           for r in rows for side in ("before", "after")}  # each row's images, under the warehouse root
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in png.values())
    assert all(png[s, 0.0, "after"] == png[s, 0.0, "before"] for s in (16, 17, 18))
    assert any(png[s, 2.0, "after"] != png[s, 2.0, "before"] for s in (16, 17, 18))
    assert main(args) == 0  # a rerun replaces its rows
    assert wh.query("SELECT count(*) AS n FROM edits").column("n")[0].as_py() == 6
    assert main([*args[:3], "--features", "99"]) == 2
    assert "unknown feature id(s) [99]" in capsys.readouterr().err
    assert main([*args, "--unconditional"]) == 0  # null class, no guidance: the run's seeds, not its images
    free = wh.query("SELECT * FROM v_edits WHERE run_id IS NULL").to_pylist()
    assert len(free) == 6 and all(r["class_id"] is None for r in free)
    assert json.loads(free[0]["config_json"])["sampler"]["guidance_scale"] == 1.0


@pytest.mark.slow
def test_edits_asset_picks_class_features_and_style_references(edit_project):
    import dagster as dg

    from pipelines.definitions import build_definitions

    project, wh, sae_id = edit_project
    put_features(wh, sae_id, [(f, f % 10, 0.5, 0.01) for f in range(64)])
    defs = build_definitions(str(project.config_path))
    job = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey("edits")])
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey("edits")])
    assert result.success
    assert [c.passed for c in result.get_asset_check_evaluations()] == [True]  # edits_grain
    rows = wh.query("SELECT * FROM v_edits").to_pylist()
    assert {r["target_class"] for r in rows} == {0} and all(r["class_id"] != 0 for r in rows)
    assert sorted(rows[0]["feature_ids"]) == [0, 10, 20, 30, 40, 50, 60]

    from pipelines.stages.edit import run_configured_edits
    from pipelines.stages.edit_plan import with_edit

    style = with_edit(project, op="style", strengths=[1.0], windows=["0-1"], n_samples=2)
    report = run_configured_edits(quiet(style))
    r = report.results[0]
    assert r.reference_ids.tolist() == [18, 19] and r.references is not None
    assert {row["reference_id"] for row in wh.query("SELECT * FROM edits WHERE op = 'style'").to_pylist()} == {18, 19}


# --- CLI flags, sample choice, missing checkpoints ---------------------------------------------------------


def test_no_flags_turn_off_config_defaults(tmp_path):
    from pipelines.cli import build_parser, edit_overrides
    from pipelines.project import Project
    from pipelines.stages.edit_plan import with_edit
    from tests.conftest import write_config

    project = Project.load(write_config(tmp_path, {"edit": {"unconditional": True, "spatial": True}}))

    def edit_config(*argv):
        return with_edit(project, **edit_overrides(build_parser().parse_args(["edit", *argv]))).config.edit

    off = edit_config("--no-unconditional", "--no-spatial")
    assert off.unconditional is False and off.spatial is False
    kept = edit_config()  # not given: the config's values stay
    assert kept.unconditional is True and kept.spatial is True and kept.pooled is False
    assert edit_config("--op", "style", "--pooled").pooled is True


def test_suppressing_edits_take_samples_of_the_target_class(edit_project):
    from pipelines.stages.edit_plan import _samples, resolve_sae, suppresses, with_edit
    from tide_core.sampling import condition_for

    assert suppresses("add", -8.0) and suppresses("zero", 0.0) and suppresses("scale", 0.5)
    assert not suppresses("add", 8.0) and not suppresses("scale", 2.0) and not suppresses("clamp", 1.0)
    project, wh, sae_id = edit_project
    store = quiet(project).store()
    classes = store.provenance["sampling"]["classes"]
    target = resolve_sae(quiet(with_edit(project, sae_id=sae_id)))
    for strength, own in ((-8.0, True), (8.0, False)):
        p = with_edit(project, sae_id=sae_id, op="add", target_class=int(classes[16 % len(classes)]),
                      strengths=[strength], n_samples=3)
        ids, refs = _samples(quiet(p), p.config.edit, target, store)
        got = {condition_for(int(i), classes) == p.config.edit.target_class for i in ids}
        assert len(ids) and refs is None and got == {own}, (strength, ids)


def test_a_missing_sae_checkpoint_fails_in_the_plan_naming_the_asset_to_rerun(edit_project):
    import shutil

    from pipelines.stages.edit_plan import plan_edits, with_edit

    project, wh, sae_id = edit_project
    path = wh.require_sae(sae_id).path
    shutil.rmtree(path)
    with pytest.raises(EditError, match=rf"{sae_id} is missing: {path} .*Re-materialize the `sae` asset's partition "
                                        r"01\|resid"):
        plan_edits(quiet(with_edit(project, sae_id=sae_id, feature_ids=[1])))
