"""PNG figures for asset metadata and docs (matplotlib, Agg backend, nothing shown on screen)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 1, scale: int = 4) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad), cols*(W+pad), 3] mosaic, upscaled for viewing."""
    n, h, w, c = images.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(min(n, rows * cols)):
        r, q = divmod(i, cols)
        tile = images[i] if c == 3 else np.repeat(images[i][..., :1], 3, axis=2)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = tile
    return np.kron(grid, np.ones((scale, scale, 1), np.uint8))


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: the Dagster definitions import this
    module at every load and need none of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes_of_array(rgb: np.ndarray) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    plt.imsave(buf, rgb, format="png")
    return buf.getvalue()


def png_bytes_of_figure(fig) -> bytes:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def line_plot(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
              logy: bool = False) -> bytes:
    fig, ax = pyplot().subplots(figsize=(6, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return png_bytes_of_figure(fig)


def markdown_image(png: bytes, alt: str = "plot") -> str:
    """Markdown that the Dagster UI renders inline (data URI)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def save_png(png: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return path
