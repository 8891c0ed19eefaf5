"""The activation histogram's bins, and a lookup that finds a value's bin without a logarithm."""

from __future__ import annotations

import numpy as np

# One fixed log-spaced binning (mergeable across chunks without a first pass for each latent's range):
# 10 bins per decade over [1e-3, 1e3); values outside land in the end bins.
HIST_LOG_LO, HIST_LOG_HI, HIST_PER_DECADE = -3, 3, 10
HIST_EDGES = np.logspace(HIST_LOG_LO, HIST_LOG_HI, (HIST_LOG_HI - HIST_LOG_LO) * HIST_PER_DECADE + 1)


def _bin_table(edges: np.ndarray = HIST_EDGES) -> tuple[int, np.ndarray, np.ndarray]:
    """A lookup for the histogram bin of a positive float32 v, exact against ``edges`` (bin b holds
    [edges[b], edges[b+1]); values outside go to the end bins) without a log: v's top 16 bits (exponent
    and 7 mantissa bits) index a slice 2^-7 wide in relative terms, which holds at most one edge (bins are
    10^0.1 wide), so bin = first[slice] + (v >= edge_in[slice]). Returns (first slice key, first, edge_in)."""
    as_key = lambda x: int(np.float32(x).view(np.int32)) >> 16  # noqa: E731
    lo, hi = as_key(edges[0]), as_key(edges[-1])
    keys = np.arange(lo, hi + 1)
    start = (keys << 16).astype(np.int32).view(np.float32).astype(np.float64)  # smallest value of each slice
    stop = ((keys + 1) << 16).astype(np.int32).view(np.float32).astype(np.float64)
    last = len(edges) - 2
    first = np.clip(np.searchsorted(edges, start, side="right") - 1, 0, last)
    nxt = edges[np.minimum(first + 1, len(edges) - 1)]
    edge_in = np.where((nxt < stop) & (first < last), nxt, np.inf)
    return lo, first.astype(np.int64), edge_in


BIN_KEY0, BIN_FIRST, BIN_EDGE = _bin_table()


def hist_bins_exact(values: np.ndarray) -> np.ndarray:
    """The definition the lookup must match: bin of each value > 0 [m] by binary search over the edges."""
    bins = np.searchsorted(HIST_EDGES, np.asarray(values, np.float64), side="right") - 1
    return np.clip(bins, 0, len(HIST_EDGES) - 2)
