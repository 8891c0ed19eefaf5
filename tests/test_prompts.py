"""Prompt files (formats, bad input), the preflight of text and class runs, concepts against a brute-force
count, and a text-conditional `tide run` end to end on a tiny random PixArt."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_config
from tide_core.features.concepts import class_concepts, concept_rows, prompt_concepts
from tide_core.features.summary import FeatureSummary
from tide_core.prompts import Prompt, PromptError, read_prompt_file


def test_the_three_prompt_formats_read_the_same_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\nA red seven\n\n  a cat on a mat  \n", encoding="utf-8")
    (tmp_path / "p.csv").write_text("Prompt,Tags\nA red seven,Red; digit\na cat on a mat,\n", encoding="utf-8")
    pq.write_table(pa.table({"prompt": ["A red seven", "a cat on a mat"], "tags": [["red", "digit"], None]}),
                   tmp_path / "p.parquet")
    sets = [read_prompt_file(tmp_path / f"p.{ext}") for ext in ("txt", "csv", "parquet")]
    assert all(s.texts == ["A red seven", "a cat on a mat"] for s in sets)
    assert sets[1].prompts[0].tags == sets[2].prompts[0].tags == ("red", "digit") and sets[0].prompts[0].tags == ()
    assert sets[0].prompts[0].prompt_id == sets[1].prompts[0].prompt_id  # the id is the text's, not the file's
    assert sets[0].prompts[1].words() == ["cat", "mat"]  # lower-cased, function words left out
    assert len({s.sha256 for s in sets}) == 3


@pytest.mark.parametrize("name, data, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"# only a comment\n\n", "holds no prompts"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), "is not UTF-8 text"),
    ("cols.csv", b"text,tags\na cat,\n", "has no 'prompt' column"),
    ("bad.parquet", b"not parquet", "not a readable Parquet file"),
])
def test_bad_prompt_files_say_what_to_change(tmp_path, name, data, message):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(PromptError, match=message):
        read_prompt_file(path)


def test_preflight_matches_prompts_to_the_model(tmp_path, tiny_model_dir):
    from pipelines.preflight import preflight
    from pipelines.project import Project

    (tmp_path / "p.txt").write_text("a cat\n")
    digits = {"model": {"digits": {"checkpoint_dir": str(tiny_model_dir / "dit")}}}
    with_prompts = Project.load(write_config(tmp_path / "a", {**digits, "sampling": {"prompts": str(tmp_path / "p.txt")}}))
    assert any("class-conditional: remove sampling.prompts" in p for p in preflight(with_prompts))
    cross = Project.load(write_config(tmp_path / "d", {**digits, "capture": {"sites": ["resid", "cross"]}}))
    assert any("capture.sites contains ['cross']" in p for p in preflight(cross))
    text = {"model": {"source": "tiny-pixart", "tiny_pixart": {"checkpoint_dir": str(tmp_path / "tp")}}}
    without = Project.load(write_config(tmp_path / "b", text))
    assert any("text-conditional: set sampling.prompts" in p for p in preflight(without))
    (tmp_path / "empty.txt").write_text("\n")
    empty = Project.load(write_config(tmp_path / "c", {**text, "sampling": {"prompts": str(tmp_path / "empty.txt")}}))
    assert any("holds no prompts" in p for p in preflight(empty))


def _summary(rng, steps=3, conditions=4, n=6) -> FeatureSummary:
    class_tokens = rng.integers(5, 20, (steps, conditions))  # [S, C]
    fires = rng.integers(0, 5, (steps, conditions, n)) * (rng.random((1, 1, n)) > 0.2)  # [S, C, n]; some dead
    return FeatureSummary(steps=np.arange(steps), tokens=class_tokens.sum(1), class_tokens=class_tokens, fires=fires,
                          act_sum=fires * rng.uniform(1, 2, fires.shape), act_max=np.ones((steps, n), np.float32),
                          hist=np.zeros((n, 3), np.int64), top_val=np.zeros((steps, n, 1), np.float32),
                          top_sid=np.zeros((steps, n, 1), np.int64))


def test_concept_rows_equal_a_brute_force_count():
    rng = np.random.default_rng(1)
    s = _summary(rng)
    prompts = [Prompt("a red seven", ("digit",)), Prompt("a blue seven"), Prompt("a red cat", ("animal",)),
               Prompt("red red red")]
    concepts = prompt_concepts(prompts)
    assert concepts.names == ["animal", "blue", "cat", "digit", "red", "seven"]
    assert concepts.kinds == ["tag", "word", "word", "tag", "word", "word"]
    images = np.array([2, 3, 1, 4])
    rows = concept_rows(s, concepts, images, per_feature=100)
    got = {(int(f), c): (r, lift, im) for f, c, r, lift, im in
           zip(rows.feature_id, rows.concept, rows.fire_rate, rows.lift, rows.images, strict=True)}
    overall = s.fires.sum((0, 1)) / s.tokens.sum()
    expect = {}
    for name in concepts.names:
        carriers = [i for i, p in enumerate(prompts) if name in p.words() or name in p.tags]
        fires = s.fires[:, carriers].sum((0, 1))  # [n]
        rate = fires / s.class_tokens[:, carriers].sum()
        for f in np.nonzero(fires)[0]:
            expect[(int(f), name)] = (rate[f], rate[f] / overall[f], images[carriers].sum())
    assert got.keys() == expect.keys()
    for key, (rate, lift, im) in expect.items():
        np.testing.assert_allclose(got[key][:2], (rate, lift), rtol=1e-12)
        assert got[key][2] == im
    # with a cap, each feature keeps its highest-lift concepts
    capped = concept_rows(s, concepts, images, per_feature=2)
    for f in np.unique(rows.feature_id):
        mine = sorted((-lift for (g, _), (_, lift, _) in expect.items() if g == f))[:2]
        kept = sorted(-capped.lift[capped.feature_id == f])
        np.testing.assert_allclose(kept, mine, rtol=1e-12)


def test_class_concepts_are_the_per_class_rates():
    rng = np.random.default_rng(2)
    s = _summary(rng)
    rows = concept_rows(s, class_concepts(["a", "b", "c", "d"]), np.array([1, 1, 1, 1]), per_feature=10)
    rates = s.fires.sum(0) / s.class_tokens.sum(0)[:, None]  # [C, n]
    for f, c, r in zip(rows.feature_id, rows.concept, rows.fire_rate, strict=True):
        assert r == pytest.approx(rates["abcd".index(c), f])
    assert len(rows.feature_id) == int((s.fires.sum(0) > 0).sum())


@pytest.mark.slow
def test_a_text_conditional_run_end_to_end(tmp_path):
    """tide run on a tiny random PixArt: prompts, samples tied to them, word and tag concepts, a dashboard."""
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.project import Project
    from pipelines.runner import materialize
    from storage import Warehouse

    (tmp_path / "prompts.csv").write_text("prompt,tags\na red seven,digit\na blue two on a black background,digit\n"
                                          "a cat in the city at night,animal\n" + "seven " * 40 + ",\n")
    cfg = {"model": {"source": "tiny-pixart", "max_prompt_tokens": 12,
                     "tiny_pixart": {"num_layers": 2, "sample_size": 8, "checkpoint_dir": str(tmp_path / "tp")}},
           "sampling": {"prompts": str(tmp_path / "prompts.csv"), "num_samples": 16, "shard_size": 8},
           "capture": {"layers": [1], "sites": ["resid", "cross"]},
           "sae": {"variants": ["tide"], "spec": {"n_latents": 32, "k": 4}},
           "edit": {"feature_ids": [0], "n_samples": 2}}
    project = Project.load(write_config(tmp_path / "run", cfg))
    report = materialize(definitions_for(project), warehouse_instance(project), log=lambda m: None)
    assert report.success
    wh = Warehouse(project.duckdb_path)
    prompts = wh.query("SELECT count(*) AS n, sum(truncated::INT) AS cut FROM prompts").to_pylist()[0]
    assert prompts == {"n": 4, "cut": 1}
    per = wh.query("SELECT count(DISTINCT prompt_id) AS p, count(*) FILTER (WHERE prompt_id IS NULL) AS missing "
                   "FROM samples").to_pylist()[0]
    assert per == {"p": 4, "missing": 0}
    kinds = {r["kind"]: r["n"] for r in wh.query("SELECT kind, count(*) AS n FROM feature_concepts GROUP BY 1"
                                                  ).to_pylist()}
    assert kinds.get("word", 0) > 0 and kinds.get("tag", 0) > 0 and "class" not in kinds
    assert (project.root / "dashboard" / "index.html").is_file()
