"""Coordinate arrays beside each site's activation arrays, so generic Zarr readers see what the axes mean.

``xr.open_zarr(url, group="acts/resid", consolidated=False)`` then shows ``step`` (the index: schedule
positions) with its ``timestep`` values, ``sample_id`` along ``sample``, and ``row`` / ``col`` of each token
in the patch grid. A subsampled store keeps other tokens for every (step, sample), so it has no row / col:
its positions are ``acts/token_index``. A text site's token axis is its text sequence: no row / col either
(its positions are the prompt's tokens, and ``token_mask`` beside its arrays marks the padding). The arrays are small and written once, when the store is created
(or, for a store written before they existed, when it is next reopened upstream of the shard writers).
"""

from __future__ import annotations

import numpy as np
import zarr

# The data variables list their non-index coordinates in this attribute (the CF convention xarray decodes).
COORDINATES_ATTR = "coordinates"


def coordinate_values(layout, timesteps: list[int] | None, site: str | None = None
                      ) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dimension, values) of every coordinate the layout has (at ``site``: a text site has no row /
    col)."""
    coords = {"step": ("step", np.asarray(layout.steps, np.int32)),
              "sample_id": ("sample", np.arange(layout.num_samples, dtype=np.int64))}
    if timesteps is not None and len(timesteps) == len(layout.steps):
        coords["timestep"] = ("step", np.asarray(timesteps, np.int32))
    if not layout.subsampled and not (site is not None and layout.is_text(site)):
        _, grid_w = layout.token_grid
        token = np.arange(layout.tokens_total, dtype=np.int16)
        coords["row"], coords["col"] = ("token", token // grid_w), ("token", token % grid_w)
    return coords


def write_coordinates(group: zarr.Group, layout, timesteps: list[int] | None, act_paths: list[str]) -> bool:
    """Write the coordinates into each ``acts/<site>`` group and name them on its arrays; False when they
    were all there already."""
    wrote = False
    for site in layout.sites:
        coords = coordinate_values(layout, timesteps, site)
        site_group = group[f"acts/{site}"]
        for name, (dim, values) in coords.items():
            if name in site_group:
                continue
            arr = site_group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                          fill_value=0, dimension_names=[dim])
            arr[:] = values
            wrote = True
    for path in act_paths:
        site = path.split("/")[1]  # acts/<site>/layer_<LL>
        names = " ".join(n for n in coordinate_values(layout, timesteps, site) if n != "step")  # step: an index
        if group[path].attrs.get(COORDINATES_ATTR) != names:
            group[path].attrs[COORDINATES_ATTR] = names
            wrote = True
    return wrote
