"""The `feature_tokens` table of a text-site SAE: where each latent fired, per prompt token.

The feature pass counts firings by (condition, text position) (``PositionStats``); this names them: a
condition's prompt (``prompt_id``; a prompt listed twice in the file is one prompt, its conditions summed), the
position's token as the family's tokenizer wrote it (``DiTAdapter.text_sequences``: the same tokenizer calls
that embedded the prompt), and how often the position was seen, so rates read per prompt token and, through
``v_feature_tokens``, per token string.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from tide_core.features import PositionKey, PositionStats
from tide_core.models.base import TextSequence


def token_table(stats: PositionStats, sequences: list[TextSequence], provenance: dict,
                images_per_condition: np.ndarray, n_steps: int, n_latents: int) -> pa.Table:
    """Rows (feature_id, prompt_id, position, token, piece, part, observations, fires, fire_rate, mean_act,
    max_act, token_observations) of one SAE (sae_id is the partition), one per fired (latent, prompt, position).

    ``sequences``: one per prompt of the run (in ``provenance["prompts"]`` order, the condition order);
    ``images_per_condition``: images of each condition the pass read, each seen at ``n_steps`` steps.
    """
    prompt_ids = [p["prompt_id"] for p in provenance["prompts"]]
    if len(sequences) != len(prompt_ids):
        raise ValueError(f"{len(sequences)} text sequences for {len(prompt_ids)} prompts")
    length = len(sequences[0].tokens)
    distinct = list(dict.fromkeys(prompt_ids))
    which = np.array([distinct.index(p) for p in prompt_ids], np.int64)  # condition -> distinct prompt
    first = [prompt_ids.index(p) for p in distinct]  # a distinct prompt's first condition (its sequence)
    seen = np.bincount(which, weights=np.asarray(images_per_condition[:len(which)], np.float64),
                       minlength=len(distinct)).astype(np.int64) * n_steps  # (image, step) pairs per prompt
    condition, position, latent = PositionKey(length, n_latents).unpack(stats.keys)
    merged = PositionStats(PositionKey(length, n_latents).pack(which[condition], position, latent), stats.fires,
                           stats.act_sum, stats.act_max).merge(PositionStats.empty())  # conditions of a prompt summed
    prompt, position, latent = PositionKey(length, n_latents).unpack(merged.keys)
    seqs = [sequences[c] for c in first]
    by_string: Counter[str] = Counter()
    for u, seq in enumerate(seqs):
        for token, valid in zip(seq.tokens, seq.valid, strict=True):
            if valid:
                by_string[token] += int(seen[u])
    tokens = [seqs[u].tokens[j] for u, j in zip(prompt, position, strict=True)]
    observations = seen[prompt]
    return pa.table({
        "feature_id": latent.astype(np.int64), "prompt_id": pa.array([distinct[u] for u in prompt], pa.string()),
        "position": position.astype(np.int64), "token": pa.array(tokens, pa.string()),
        "piece": pa.array([seqs[u].pieces[j] for u, j in zip(prompt, position, strict=True)], pa.string()),
        "part": pa.array([seqs[u].part[j] for u, j in zip(prompt, position, strict=True)], pa.string()),
        "observations": observations, "fires": merged.fires, "fire_rate": merged.fires / np.maximum(observations, 1),
        "mean_act": merged.act_sum / merged.fires, "max_act": merged.act_max.astype(np.float64),
        "token_observations": np.array([by_string[t] for t in tokens], np.int64),
    })
