"""Warehouse schema: every table, declared once and rendered to DDL (the views over them: ``storage.views``).

The same declarations drive the DDL, the column validation of ``Warehouse.replace_partition`` and
the grain checks, so they cannot drift apart. Each table states its grain (the columns that
identify one row); the grain is also its PRIMARY KEY, and its ``COMMENT ON TABLE`` starts with
``grain:`` so ``tide sql --schema`` shows it.

Foreign keys are deliberately absent: DuckDB refuses to delete a referenced parent row, which would
make replacing one partition (say, one run's SAEs) impossible without rewriting every child table.
The views join with LEFT JOINs instead, so an orphan row stays visible rather than vanishing.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "heldout")
# class, prompt word or tag; or the factor a value belongs to, for a judge that knows factors (the styled
# digits' style factors; their class values are of kind class)
CONCEPT_KINDS = ("class", "word", "tag", "colour", "thickness", "background")
TOP_IMAGE_SCOPES = ("overall", "peak_step")
OVERALL_STEP = -1  # sae_metrics.step of the aggregate over all diffusion steps
# An SAE with more held-out latents that never fire is not usable, whatever its error: the `sae` asset's
# check, and the bar a sweep's best point must pass (a high learning rate buys error with dead latents).
MAX_DEAD_FRACTION = 0.05


@dataclass(frozen=True)
class Col:
    """One column: ``type`` is a DuckDB type, ``constraint`` extra DDL such as ``NOT NULL``."""

    name: str
    type: str
    doc: str = ""
    constraint: str = ""


@dataclass(frozen=True)
class Table:
    """One table; ``grain`` names the columns that identify a row and form the PRIMARY KEY."""

    name: str
    grain: tuple[str, ...]
    grain_doc: str
    columns: tuple[Col, ...]
    checks: tuple[str, ...] = ()

    @property
    def comment(self) -> str:
        return f"grain: {self.grain_doc} ({', '.join(self.grain)})"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Col:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name!r} has no column {name!r}; it has {', '.join(self.column_names)}")


@dataclass(frozen=True)
class View:
    name: str
    comment: str
    sql: str


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_METRICS = ("mse", "nmse", "cosine", "explained_variance", "l0", "dead_fraction", "dense_fraction")

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "runs",
            ("run_id",),
            "one capture run",
            (
                Col("run_id", "VARCHAR"),
                Col("config_json", "JSON", "the full validated run config", "NOT NULL"),
                Col("code_version", "VARCHAR", "version of the code that produced the run"),
                Col("model_source", "VARCHAR", "'digits' or a Hub model id"),
                Col("model_hash", "VARCHAR", "hash of the DiT weights"),
                Col("created_at", "TIMESTAMP", "UTC", "NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')"),
            ),
        ),
        Table(
            "samples",
            ("run_id", "sample_id"),
            "one generated image",
            (
                Col("run_id", "VARCHAR"),
                Col("sample_id", "BIGINT", "unique within the run"),
                Col("class_id", "INTEGER", "its condition: the class id, or (text-conditional runs) the position of "
                    "its prompt in the run's prompt set", "NOT NULL"),
                Col("class_name", "VARCHAR", "the class name, or the prompt's text"),
                Col("prompt_id", "VARCHAR", "its prompt (table prompts); NULL for class-conditional runs"),
                Col("seed", "BIGINT", "noise seed of the image", "NOT NULL"),
                Col("shard", "INTEGER", "activation-store shard holding its activations", "NOT NULL"),
                Col("judge_pred", "INTEGER", "class the judge classifier predicts (NULL: not judged)"),
                Col("judge_conf", "DOUBLE", "judge probability of judge_pred"),
            ),
        ),
        Table(
            "steps",
            ("run_id", "step"),
            "one captured diffusion step of a run, with its time",
            (
                Col("run_id", "VARCHAR"),
                Col("step", "INTEGER", "captured step (0 = noisiest), as every per-step table numbers it"),
                Col("timestep", "INTEGER", "the scheduler's timestep: DDPM-family 0..999; flow matching "
                    "round(1000 sigma)", "NOT NULL"),
                Col("model_time", "DOUBLE", "what the denoiser reads: the timestep (DDPM family) or sigma in (0, 1] "
                    "(flow matching, x_t = (1 - sigma) x_0 + sigma noise)", "NOT NULL"),
                Col("time_kind", "VARCHAR", "discrete (DDPM family) or flow (flow matching)", "NOT NULL"),
            ),
        ),
        Table(
            "prompts",
            ("prompt_id",),
            "one prompt (a hash of its text: the same prompt has the same id in every run)",
            (
                Col("prompt_id", "VARCHAR"),
                Col("text", "VARCHAR", "", "NOT NULL"),
                Col("tags", "VARCHAR[]", "tags from the prompt file (empty: none)"),
                Col("words", "VARCHAR[]", "its concept words: lower-cased, function words left out"),
                Col("tokens", "INTEGER", "text-encoder tokens with the end token, before truncation"),
                Col("max_tokens", "INTEGER", "tokens the text encoder saw at most (model.max_prompt_tokens)"),
                Col("truncated", "BOOLEAN", "tokens > max_tokens: the end of the prompt was cut"),
            ),
        ),
        Table(
            "saes",
            ("sae_id",),
            "one trained SAE",
            (
                Col("sae_id", "VARCHAR"),
                Col("run_id", "VARCHAR", "capture run whose activations trained it", "NOT NULL"),
                Col("layer", "INTEGER", "DiT block index", "NOT NULL"),
                Col("site", "VARCHAR", "resid, attn or mlp", "NOT NULL"),
                Col("variant", "VARCHAR", "SAE training variant", "NOT NULL"),
                Col("n_latents", "INTEGER", "dictionary size", "NOT NULL"),
                Col("k", "INTEGER", "active latents per token (TopK); NULL if not TopK"),
                Col("path", "VARCHAR", "where the weights are stored"),
                Col("tokens_seen", "BIGINT", "training tokens"),
                Col("created_at", "TIMESTAMP", "UTC", "NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')"),
            ),
        ),
        Table(
            "sae_metrics",
            ("sae_id", "split", "step"),
            f"one SAE on one split at one diffusion step; step = {OVERALL_STEP} is the aggregate over all steps",
            (
                Col("sae_id", "VARCHAR"),
                Col("split", "VARCHAR", "train or heldout", f"CHECK (split IN ({_sql_list(SPLITS)}))"),
                Col("step", "INTEGER", f"diffusion step index; {OVERALL_STEP} = all steps together"),
                *(Col(m, "DOUBLE") for m in _METRICS),
            ),
        ),
        Table(
            "sae_splice",
            ("sae_id", "split"),
            "one SAE spliced into its site: the denoiser's loss with the reconstruction in place of the site's"
            " output, and images sampled with it at every step against the unspliced images of the same seeds",
            (
                Col("sae_id", "VARCHAR"),
                Col("split", "VARCHAR", "which samples' seeds were used", f"CHECK (split IN ({_sql_list(SPLITS)}))"),
                Col("n_samples", "INTEGER", "images compared"),
                Col("loss_clean", "DOUBLE", "noise-prediction MSE on the noised images, model as it is"),
                Col("loss_spliced", "DOUBLE", "the same with the SAE's reconstruction spliced in"),
                Col("loss_ablated", "DOUBLE", "the same with the site's output replaced by the SAE's decoder bias"),
                Col("loss_recovered", "DOUBLE", "(ablated - spliced) / (ablated - clean): 1 = nothing lost"),
                Col("pixel_mse", "DOUBLE", "mean squared pixel difference, images in [-1, 1]"),
                Col("frechet_to_unspliced", "DOUBLE",
                    "Frechet distance between spliced and unspliced images (the judge's features, else pooled pixels)"),
                Col("accuracy_spliced", "DOUBLE", "judge accuracy of the spliced images (NULL: no judge)"),
                Col("accuracy_unspliced", "DOUBLE", "judge accuracy of the original images"),
                Col("frechet_spliced", "DOUBLE", "Frechet distance of the spliced images to the judge's real images"),
                Col("frechet_unspliced", "DOUBLE", "the same for the original images"),
                Col("agreement", "DOUBLE", "fraction of images the judge labels the same with and without"),
            ),
        ),
        Table(
            "sae_sweep",
            ("sweep_id", "point", "variant", "step"),
            f"one SAE variant trained at one point of a sweep, on the held-out samples at one diffusion step; "
            f"step = {OVERALL_STEP} is the aggregate over all steps",
            (
                Col("sweep_id", "VARCHAR", "the sweep: its run, site, token budget and fixed [sae] settings"),
                Col("point", "VARCHAR", "the point's layer and settings, e.g. L03-lr0.004-b1024-k32-n1024"),
                Col("variant", "VARCHAR"),
                Col("step", "INTEGER", f"diffusion step index; {OVERALL_STEP} = all steps together"),
                Col("run_id", "VARCHAR"),
                Col("layer", "INTEGER"),
                Col("site", "VARCHAR"),
                Col("lr", "DOUBLE", "peak learning rate"),
                Col("batch_size", "INTEGER", "tokens per optimizer step"),
                Col("k", "INTEGER", "active latents (TopK variants)"),
                Col("n_latents", "INTEGER"),
                Col("tokens", "BIGINT", "training tokens"),
                Col("seconds", "DOUBLE", "training wall time of the point (every variant trains on the same batches)"),
                *(Col(m, "DOUBLE") for m in _METRICS),
            ),
        ),
        Table(
            "feature_stats",
            ("sae_id", "feature_id", "step"),
            "one SAE latent at one diffusion step",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER", "latent index"),
                Col("step", "INTEGER", "diffusion step index"),
                Col("fire_rate", "DOUBLE", "fraction of tokens where the latent is > 0"),
                Col("mean_act", "DOUBLE", "mean activation over the tokens where it fires"),
                Col("max_act", "DOUBLE"),
                Col("top_class", "INTEGER", "class with the highest fire rate at this step; NULL if silent"),
                Col("class_selectivity", "DOUBLE", "class selectivity at this step (see features)"),
            ),
        ),
        Table(
            "features",
            ("sae_id", "feature_id"),
            "one SAE latent over all steps",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER", "latent index"),
                Col("fire_rate", "DOUBLE", "fraction of tokens where the latent is > 0"),
                Col("mean_act", "DOUBLE", "mean activation over the tokens where it fires"),
                Col("max_act", "DOUBLE"),
                Col("peak_step", "INTEGER", "diffusion step with the highest fire rate"),
                Col("top_class", "INTEGER", "class with the highest fire rate"),
                Col("class_selectivity", "DOUBLE",
                    "(max share - 1/C) / (1 - 1/C), share = class fire rate / sum of class fire rates: "
                    "0 = fires alike on every class, 1 = on top_class only; NULL if it never fires"),
                Col("label", "VARCHAR", "human or automatic label; NULL if unlabelled"),
                Col("histogram", "DOUBLE[]", "counts of activation values when firing (log-spaced bins)"),
                Col("histogram_edges", "DOUBLE[]", "bin edges of histogram (one more than bins)"),
                Col("act_quantiles", "DOUBLE[]", "activation deciles when firing (10%, 20%, ..., 90%)"),
                Col("tokens", "BIGINT", "tokens the statistics were computed over"),
            ),
        ),
        Table(
            "feature_concepts",
            ("sae_id", "feature_id", "concept"),
            "one SAE latent on the images of one concept (a class; a word or tag of their prompts); only pairs "
            "where the latent fired have a row",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER"),
                Col("concept", "VARCHAR", "a class name, or a prompt word or tag"),
                Col("kind", "VARCHAR", "class, word, tag, or a factor value's factor (colour, thickness, background)",
                    f"CHECK (kind IN ({_sql_list(CONCEPT_KINDS)}))"),
                Col("images", "BIGINT", "images whose condition carries the concept"),
                Col("fire_rate", "DOUBLE", "fraction of those images' tokens (all steps) where the latent is > 0"),
                Col("mean_act", "DOUBLE", "mean activation over those tokens where it fires"),
                Col("lift", "DOUBLE", "fire_rate / the latent's fire rate over all images: > 1 = more often with "
                    "the concept"),
            ),
        ),
        Table(
            "feature_factors",
            ("sae_id", "feature_id", "factor", "step"),
            "one SAE latent and one generative factor at one diffusion step (step = -1: all steps pooled), over the "
            "tokens of images whose prompt asks for a value of the factor; only where the latent fired on them "
            "(families whose judge knows factors: the styled digits)",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER"),
                Col("factor", "VARCHAR", "class, colour, thickness or background"),
                Col("step", "INTEGER", f"diffusion step index; {OVERALL_STEP} = all steps pooled"),
                Col("best_value", "VARCHAR", "the factor value on whose tokens the latent fires most often"),
                Col("mutual_info", "DOUBLE", "bits: mutual information between firing on a token and the "
                    "token's factor value"),
                Col("normalized_mi", "DOUBLE", "mutual_info / the factor's entropy at the step: the share of the "
                    "factor this latent's firing tells", "CHECK (normalized_mi BETWEEN 0 AND 1)"),
                Col("best_rate", "DOUBLE", "fire rate on the best value's tokens"),
                Col("lift", "DOUBLE", "best_rate / fire rate on all the factor's tokens"),
            ),
        ),
        Table(
            "factor_probes",
            ("sae_id", "factor", "step", "k"),
            "one sparse probe of one generative factor at one diffusion step: k of the SAE's latents (k = 0: "
            "every raw channel of its block) averaged over each image's tokens, predicting the factor value the "
            "judge sees in the final image; held-out accuracy by stratified cross-validation (families whose "
            "judge knows factors)",
            (
                Col("sae_id", "VARCHAR"),
                Col("factor", "VARCHAR", "class, colour, thickness or background"),
                Col("step", "INTEGER", "diffusion step index (features.probe_steps of the captured steps)"),
                Col("k", "INTEGER", "latents the probe reads (the k with the largest ANOVA F on its training "
                    "folds); 0: every raw channel, the baseline (the same for every SAE of a layer)"),
                Col("accuracy", "DOUBLE", "mean held-out accuracy over the folds",
                    "CHECK (accuracy BETWEEN 0 AND 1)"),
                Col("accuracy_std", "DOUBLE", "its standard deviation over the folds"),
                Col("chance", "DOUBLE", "share of the most common value: the accuracy of always guessing it"),
                Col("n_images", "INTEGER", "images probed (values on fewer images than folds are left out)"),
                Col("n_values", "INTEGER", "factor values among them"),
                Col("features", "INTEGER[]", "the k latents picked on all the images; NULL for k = 0"),
            ),
            checks=("k >= 0", "n_values >= 2"),
        ),
        Table(
            "feature_tokens",
            ("sae_id", "feature_id", "prompt_id", "position"),
            "one SAE latent of a text site (resid_text) at one token of one prompt, over its images and steps; only "
            "where the latent fired",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER"),
                Col("prompt_id", "VARCHAR", "the prompt (table prompts)"),
                Col("position", "INTEGER", "position in the text stream (SD3: CLIP's 77, then T5's; FLUX: T5's)"),
                Col("token", "VARCHAR", "the token as text, as the family's tokenizer decodes it ('red', '</s>')",
                    "NOT NULL"),
                Col("piece", "VARCHAR", "the tokenizer's own piece ('red</w>', '▁red')"),
                Col("part", "VARCHAR", "the tokenizer that made it: clip or t5"),
                Col("observations", "BIGINT", "(image, step) pairs of this prompt the statistics read", "NOT NULL"),
                Col("fires", "BIGINT", "of those, where the latent is > 0 at this position", "NOT NULL"),
                Col("fire_rate", "DOUBLE", "fires / observations"),
                Col("mean_act", "DOUBLE", "mean activation where it fires"),
                Col("max_act", "DOUBLE", "largest activation"),
                Col("token_observations", "BIGINT", "(image, step) pairs at every non-padding position of every "
                    "prompt holding this token string: v_feature_tokens' denominator"),
            ),
            checks=("fires BETWEEN 1 AND observations",),
        ),
        Table(
            "top_images",
            ("sae_id", "feature_id", "scope", "rank"),
            "one of the top-activating images of a latent, per scope",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER"),
                Col(
                    "scope",
                    "VARCHAR",
                    "overall: across all steps; peak_step: at the latent's peak step",
                    f"CHECK (scope IN ({_sql_list(TOP_IMAGE_SCOPES)}))",
                ),
                Col("rank", "INTEGER", "1 = strongest"),
                Col("sample_id", "BIGINT", "", "NOT NULL"),
                Col("step", "INTEGER", "diffusion step of the activation"),
                Col("activation", "DOUBLE", "max activation over the image's patches"),
                Col("heatmap", "FLOAT[]", "activation per patch, the grid_h x grid_w grid row-major"),
                Col("grid_h", "INTEGER"),
                Col("grid_w", "INTEGER"),
            ),
            checks=("heatmap IS NULL OR len(heatmap) = grid_h * grid_w",),
        ),
        Table(
            "feature_neighbors",
            ("sae_id", "feature_id", "rank"),
            "one nearest neighbour of a latent by decoder direction",
            (
                Col("sae_id", "VARCHAR"),
                Col("feature_id", "INTEGER"),
                Col("rank", "INTEGER", "1 = nearest"),
                Col("neighbor_id", "INTEGER", "", "NOT NULL"),
                Col("cosine", "DOUBLE", "cosine of the two decoder directions"),
            ),
        ),
        Table(
            "edits",
            ("edit_id", "sample_id"),
            "one image regenerated under one feature edit",
            (
                Col("edit_id", "VARCHAR"),
                Col("sample_id", "BIGINT"),
                Col("run_id", "VARCHAR", "run of sample_id; NULL for unconditional edits (the run's seed, "
                    "not its label)"),
                Col("sae_id", "VARCHAR", "SAE whose latents were edited"),
                Col("config_json", "JSON", "the edit's full config"),
                Col("op", "VARCHAR", "add, scale, clamp, zero or style (README, Editing)"),
                Col("feature_ids", "INTEGER[]", "edited latents (empty: all of them, style only)"),
                Col("target_class", "INTEGER", "class the latents were picked for; NULL if given by id"),
                Col("reference_id", "BIGINT", "style only: the sample whose latents were copied"),
                Col("strength", "DOUBLE", "add / clamp: multiple of the feature's unit; scale: factor; "
                    "style: fraction of the way to the reference"),
                Col("step_start", "INTEGER", "first diffusion step edited"),
                Col("step_end", "INTEGER", "last diffusion step edited"),
                Col("pred_before", "INTEGER", "judge prediction without the edit"),
                Col("conf_before", "DOUBLE"),
                Col("pred_after", "INTEGER", "judge prediction with the edit"),
                Col("conf_after", "DOUBLE"),
                Col("image_before", "VARCHAR", "PNG of the unedited image, relative to the warehouse root"),
                Col("image_after", "VARCHAR", "PNG of the edited image (same seed), relative to the warehouse root"),
                Col("concept", "VARCHAR", "concept the latents were picked for (feature_concepts); NULL if by "
                    "class or id"),
                Col("concept_before", "BOOLEAN", "the judge sees the concept in the unedited image; NULL if it "
                    "does not score the concept"),
                Col("concept_after", "BOOLEAN", "the judge sees the concept in the edited image"),
            ),
        ),
    )
}
