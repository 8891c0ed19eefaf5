"""Feature statistics of one SAE as a map-reduce over chunks of stored activations.

* ``encode.py``: which latents fire on which tokens (the SAE's encode, or the fused kernel path).
* ``partials.py``: the map step, ``step_partial`` (``StepPartial``, mergeable exactly in any order).
* ``summary.py``: the reduce step's result, ``summarise`` -> ``FeatureSummary``.
* ``positions.py``: a text site's firing by (condition, text position), ``PositionStats``.
* ``neighbors.py``: nearest latents by decoder direction.

The compiled loops live in ``tide_core.kernels``.
"""

from tide_core.features.concepts import (
    ConceptRows,
    Concepts,
    class_concepts,
    concept_rows,
    factor_concepts,
    prompt_concepts,
)
from tide_core.features.encode import ChunkEncoder, Fired, chunk_encoder, count_chunk, fired_latents, heatmaps
from tide_core.features.neighbors import Neighbors, decoder_neighbors
from tide_core.features.partials import (
    Chunk,
    StepPartial,
    chunk_partial,
    merge_all,
    step_partial,
    tree_reduce,
)
from tide_core.features.positions import PositionKey, PositionStats
from tide_core.features.summary import FeatureSummary, TopImages, selectivity, summarise
from tide_core.kernels import EMPTY, HIST_EDGES

__all__ = [
    "ConceptRows", "Concepts", "class_concepts", "concept_rows", "factor_concepts", "prompt_concepts",
    "EMPTY", "HIST_EDGES", "Chunk", "ChunkEncoder", "FeatureSummary", "Fired", "Neighbors", "PositionKey",
    "PositionStats", "StepPartial",
    "TopImages", "chunk_encoder", "chunk_partial", "count_chunk", "decoder_neighbors", "fired_latents",
    "heatmaps", "merge_all", "selectivity", "step_partial", "summarise", "tree_reduce",
]
