"""Text sites (resid_text): the store's per-site token axis and padding mask, token streams that skip padding,
the feature pass's per-position counts, and the errors before sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from storage import ActivationStore, ShardStats, StoreLayout
from storage.token_batches import shuffled_token_batches
from tide_core.features import Chunk, PositionKey, step_partial
from tide_core.sae import SAEDesign, SparseAutoencoder

STEPS, N, SHARD, T, L, D = 2, 8, 4, 4, 6, 8


def _layout(text: bool) -> StoreLayout:
    return StoreLayout(num_samples=N, shard_size=SHARD, steps=[0, 3], layers=[1],
                       sites=["resid", "resid_text"] if text else ["resid"], tokens_total=T, tokens_stored=T,
                       token_grid=[2, 2], d_model=D, image_shape=[4, 4, 3],
                       text_tokens={"resid_text": L} if text else {})


def _mask() -> np.ndarray:
    """bool [N, L]: sample i holds 2 + i % 3 tokens, then padding."""
    return np.arange(L)[None, :] < (2 + np.arange(N) % 3)[:, None]


def test_an_image_only_store_keeps_its_layout_attributes(tmp_path):
    store = ActivationStore.create(str(tmp_path / "a.zarr"), _layout(text=False), {"capture_timesteps": [9, 5]})
    attrs = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["attributes"]["layout"]
    assert "text_tokens" not in attrs  # the attributes image-site stores had before text sites existed
    assert StoreLayout(**attrs) == store.layout and store.token_mask("resid", 0, 4) is None


@pytest.fixture
def text_store(tmp_path) -> ActivationStore:
    store = ActivationStore.create(str(tmp_path / "t.zarr"), _layout(text=True), {"capture_timesteps": [9, 5]})
    rng = np.random.default_rng(0)
    for shard in range(2):
        ids = store.begin_shard(shard)
        sl = slice(ids.start, ids.stop)
        store.write_samples(shard, np.zeros((SHARD, 4, 4, 3), np.uint8), np.arange(SHARD) % 2, np.arange(SHARD))
        store.write_token_mask(shard, "resid_text", _mask()[sl])
        for step in (0, 3):
            acts = {("resid", 1): rng.normal(size=(SHARD, T, D)),
                    ("resid_text", 1): rng.normal(size=(SHARD, L, D))}
            store.write_step(shard, step, acts, None)
        store.mark_done(shard, ShardStats(shard=shard, samples=SHARD))
    return store


def test_a_text_site_has_its_own_token_axis_and_mask(text_store):
    assert text_store.array("resid_text", 1).shape == (STEPS, N, L, D)
    assert text_store.array("resid", 1).shape == (STEPS, N, T, D)
    assert text_store.read_block("resid_text", 1, 3, 1).shape == (SHARD, L, D)
    assert np.array_equal(text_store.token_mask("resid_text", 0, N), _mask())
    with pytest.raises(Exception, match="expects bool"):
        text_store.write_token_mask(0, "resid", _mask()[:SHARD])


def test_the_token_stream_of_a_text_site_holds_its_valid_positions_only(text_store):
    batches = list(text_store.iter_token_batches("resid_text", 1, 5, seed=0, drop_last=False))
    got = np.concatenate([b.acts for b in batches])
    assert len(got) == STEPS * _mask().sum() == text_store.stream_tokens("resid_text", range(N))
    arr = text_store.array("resid_text", 1)[:].astype(np.float32)  # [S, N, L, D]
    valid = arr[:, _mask()]  # [S, valid, D]
    want = {tuple(r) for r in valid.reshape(-1, D)}
    assert {tuple(r) for r in got} == want  # every valid token once, no padding
    # a stream opened at a token continues the same stream
    full = np.concatenate([b.acts for b in text_store.iter_token_batches("resid_text", 1, 5, seed=0,
                                                                          drop_last=False)])
    later = np.concatenate([b.acts for b in text_store.iter_token_batches("resid_text", 1, 5, seed=0,
                                                                           drop_last=False, start=7)])
    assert np.array_equal(full[7:], later)


def test_the_mask_none_path_is_the_image_stream_unchanged(text_store):
    arr = text_store.array("resid", 1)
    kw = dict(steps=np.array([0, 3]), timesteps=np.array([9, 5]), batch_size=4, seed=3, epochs=1, block=SHARD,
              drop_last=False)
    a = [b.acts for b in shuffled_token_batches(arr, np.arange(2), np.arange(N), **kw)]
    b = [b.acts for b in shuffled_token_batches(arr, np.arange(2), np.arange(N), valid=np.ones((N, T), bool), **kw)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_feature_pass_counts_valid_positions_by_prompt_token():
    sae = SparseAutoencoder(SAEDesign(n_latents=16, k=3).bind(d_in=D, variant="topk"), seed=0).eval()
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(SHARD, L, D)).astype(np.float32)
    valid, classes = _mask()[:SHARD], np.array([0, 1, 0, 1])
    part = step_partial(sae, [Chunk(acts, np.arange(SHARD), classes, valid)], SHARD, 0, 500, 2, 4)
    assert part.tokens == valid.sum()
    with torch.no_grad():  # by hand: encode each valid token alone
        z = sae.encode(torch.from_numpy(acts[valid]), None).numpy()  # [valid, n]
    image, position = np.nonzero(valid)
    assert np.array_equal(part.fires.sum(0), (z > 0).sum(0))
    c, p, f = PositionKey(L, 16).unpack(part.positions.keys)
    for cc, pp, ff, fires in zip(c, p, f, part.positions.fires, strict=True):
        rows = (classes[image] == cc) & (position == pp)
        assert fires == (z[rows, ff] > 0).sum()
    assert part.positions.fires.sum() == (z > 0).sum()  # padding never counted


def test_a_text_site_is_refused_where_there_is_no_text_stream(tmp_path):
    from pipelines.preflight import check
    from pipelines.project import Project
    from tests.conftest import write_config
    from tide_core.config import TideConfig

    with pytest.raises(ValueError, match="set capture.branch = 'cond'"):
        TideConfig.model_validate({"capture": {"sites": ["resid", "resid_text"], "branch": "uncond"}})
    project = Project.load(write_config(tmp_path, {"capture": {"sites": ["resid", "resid_text"]}}))
    problems = check(project).problems  # the digits DiT, before anything is sampled
    assert any("capture.sites contains ['resid_text']" in p and "'resid'" in p for p in problems), problems
