"""Warehouse views: what readers (dashboards, `tide sql`) query, declared once over the tables of
``storage.schema`` and rendered to DDL with them. Each view attaches the SAE's layer, site and variant (and
names, timesteps) so a query rarely needs a join of its own."""

from __future__ import annotations

from storage.schema import MAX_DEAD_FRACTION, OVERALL_STEP, View

SAE_CONTEXT = ("run_id", "layer", "site", "variant", "n_latents")  # what each v_* view adds from `saes`
_SAE_COLS = ", ".join(f"s.{c}" for c in SAE_CONTEXT)

VIEWS: dict[str, View] = {
    v.name: v
    for v in (
        View(
            "v_classes",
            "one class of one run, with its name and image count",
            "SELECT run_id, class_id, any_value(class_name) AS class_name, count(*) AS n_samples "
            "FROM samples GROUP BY run_id, class_id",
        ),
        View(
            "v_features",
            "features with their SAE (layer, site, variant) and the name of top_class",
            f"SELECT {_SAE_COLS}, f.*, c.class_name AS top_class_name FROM features f "
            "LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN v_classes c ON c.run_id = s.run_id AND c.class_id = f.top_class",
        ),
        View(
            "v_feature_stats",
            "feature_stats with their SAE (layer, site, variant) and the step's timestep and model time",
            f"SELECT {_SAE_COLS}, t.timestep, t.model_time, fs.* FROM feature_stats fs LEFT JOIN saes s USING "
            "(sae_id) LEFT JOIN steps t ON t.run_id = s.run_id AND t.step = fs.step",
        ),
        View(
            "v_feature_concepts",
            "feature_concepts with their SAE (layer, site, variant)",
            f"SELECT {_SAE_COLS}, fc.* FROM feature_concepts fc LEFT JOIN saes s USING (sae_id)",
        ),
        View(
            "v_feature_factors",
            "feature_factors with their SAE (layer, site, variant) and the step's timestep",
            f"SELECT {_SAE_COLS}, t.timestep, ff.* FROM feature_factors ff LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN steps t ON t.run_id = s.run_id AND t.step = ff.step",
        ),
        View(
            "v_factor_emergence",
            "per SAE, factor and step: the most informative latent's normalized_mi and how many latents carry "
            "at least a tenth of the factor: where (layer) and when (step) a factor appears",
            f"SELECT {_SAE_COLS}, ff.sae_id, ff.factor, ff.step, max(ff.normalized_mi) AS best_normalized_mi, "
            "arg_max(ff.feature_id, ff.normalized_mi) AS best_feature, "
            "count(*) FILTER (WHERE ff.normalized_mi >= 0.1) AS carriers "
            f"FROM feature_factors ff LEFT JOIN saes s USING (sae_id) WHERE ff.step <> {OVERALL_STEP} GROUP BY ALL",
        ),
        View(
            "v_factor_probes",
            "factor_probes with their SAE (layer, site, variant) and the step's timestep; k = 0 is the probe on "
            "the raw channels: how well each factor of the final image can be read at each step and layer",
            f"SELECT {_SAE_COLS}, t.timestep, p.* FROM factor_probes p LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN steps t ON t.run_id = s.run_id AND t.step = p.step",
        ),
        View(
            "v_feature_tokens",
            "feature_tokens per token string (all its prompts and positions) with the SAE (layer, site, variant): "
            "which words a text-stream latent fires on",
            f"SELECT ft.sae_id, {_SAE_COLS}, ft.feature_id, ft.token, count(DISTINCT ft.prompt_id) AS prompts, "
            "sum(ft.fires) AS fires, any_value(ft.token_observations) AS observations, "
            "sum(ft.fires) / any_value(ft.token_observations) AS fire_rate, "
            "sum(ft.mean_act * ft.fires) / sum(ft.fires) AS mean_act, max(ft.max_act) AS max_act "
            "FROM feature_tokens ft LEFT JOIN saes s USING (sae_id) GROUP BY ALL",
        ),
        View(
            "v_sae_metrics",
            f"sae_metrics with their SAE and the step's timestep and model time; step = {OVERALL_STEP} is the "
            "aggregate over all steps",
            f"SELECT {_SAE_COLS}, s.k, s.tokens_seen, t.timestep, t.model_time, m.* FROM sae_metrics m LEFT JOIN saes s "
            "USING (sae_id) LEFT JOIN steps t ON t.run_id = s.run_id AND t.step = m.step",
        ),
        View(
            "v_sae_sweep_best",
            f"the best point of each variant on each layer of each sweep: the lowest held-out nmse over all steps "
            f"among the points with dead_fraction < {MAX_DEAD_FRACTION} (if none, the one with the fewest dead)",
            "SELECT * FROM sae_sweep WHERE step = -1 QUALIFY row_number() OVER (PARTITION BY sweep_id, layer, "
            f"variant ORDER BY dead_fraction >= {MAX_DEAD_FRACTION}, CASE WHEN dead_fraction < {MAX_DEAD_FRACTION} "
            "THEN nmse ELSE dead_fraction END, point) = 1",
        ),
        View(
            "v_top_images",
            "top_images with their SAE and the image's class (or prompt), seed and judge verdict",
            f"SELECT {_SAE_COLS}, t.*, sm.class_id, sm.class_name, sm.prompt_id, sm.seed, sm.judge_pred, sm.judge_conf "
            "FROM top_images t LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN samples sm ON sm.run_id = s.run_id AND sm.sample_id = t.sample_id",
        ),
        View(
            "v_feature_neighbors",
            "feature_neighbors with the neighbour's label and fire rate",
            f"SELECT {_SAE_COLS}, n.*, f.label AS neighbor_label, f.fire_rate AS neighbor_fire_rate "
            "FROM feature_neighbors n LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN features f ON f.sae_id = n.sae_id AND f.feature_id = n.neighbor_id",
        ),
        View(
            "v_edits",
            "edits with the SAE's layer, the edited image's class; flipped = the judge changed its prediction",
            "SELECT e.*, s.layer, s.variant, sm.class_id, sm.class_name, "
            "e.pred_after IS DISTINCT FROM e.pred_before AS flipped "
            "FROM edits e LEFT JOIN saes s USING (sae_id) "
            "LEFT JOIN samples sm ON sm.run_id = e.run_id AND sm.sample_id = e.sample_id",
        ),
    )
}
