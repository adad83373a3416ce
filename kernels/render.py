"""Draw layouts as in the paper's Figure 3: what one query reads on a 2-D grid, and the N x N connectivity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .layout import Layout

# one colour per layout (local-like first), the query, empty cells and the background
COLOURS = np.array([[40, 90, 200], [230, 120, 30], [40, 160, 80], [170, 50, 160]], dtype=np.float64)
QUERY, EMPTY, BACKGROUND = (200, 30, 30), (236, 236, 240), (255, 255, 255)


def _panel(masks: list[np.ndarray], shape: tuple[int, int], cell: int) -> np.ndarray:
    """Colour cells of a grid [rows, cols] by which masks are set there (overlaps average the colours)."""
    hits = np.stack([m.reshape(shape) for m in masks]).astype(np.float64)  # [L, rows, cols]
    count = hits.sum(0)
    rgb = np.einsum("lrc,lk->rck", hits, COLOURS[: len(masks)]) / np.maximum(count, 1)[..., None]
    rgb[count == 0] = EMPTY
    img = np.repeat(np.repeat(rgb, cell, 0), cell, 1)
    if cell >= 4:  # thin grid lines between cells
        img[::cell, :] = BACKGROUND
        img[:, ::cell] = BACKGROUND
    return img.astype(np.uint8)


def render_layout(layouts: Layout | list[Layout], path: str | Path, query: int | None = None,
                  width: int | None = None, head: int = 0) -> Path:
    """Write a PNG of one or more layouts of the same sequence (e.g. a local and a strided layer).

    Top: the positions ``query`` (default: a position in the middle of the last row) reads,
    drawn on a grid ``width`` wide (default: the stride or window). Bottom: the N x N
    connectivity matrix, query rows down, key columns across. N must be <= 1024.
    """
    layouts = [layouts] if isinstance(layouts, Layout) else list(layouts)
    if not layouts or not all(isinstance(x, Layout) for x in layouts):
        raise ValueError("layouts must be a Layout or a non-empty list of Layouts")
    if len(layouts) > len(COLOURS):
        raise ValueError(f"at most {len(COLOURS)} layouts per figure, got {len(layouts)}")
    n = layouts[0].seq_len
    if any(x.seq_len != n for x in layouts):
        raise ValueError("all layouts of one figure must have the same seq_len")
    if n > 1024:
        raise ValueError(f"render_layout draws N <= 1024 positions, got N={n}")
    width = width or next((x.stride or x.window for x in layouts if x.stride or x.window), None) or int(n**0.5)
    if not 1 <= width <= n:
        raise ValueError(f"width must be in [1, {n}], got {width}")
    rows = -(-n // width)
    if query is None:
        query = min(n - 1, (rows - 1) * width + width // 2)
    if not 0 <= query < n:
        raise ValueError(f"query must be in [0, {n}), got {query}")
    full = [x.dense_mask(head).numpy() for x in layouts]

    grid = [np.pad(m[query], (0, rows * width - n)) for m in full]
    cell = max(2, min(24, 480 // width))
    top = _panel(grid, (rows, width), cell)
    q_r, q_c = divmod(query, width)
    top[q_r * cell + 1:(q_r + 1) * cell, q_c * cell + 1:(q_c + 1) * cell] = QUERY

    cell_m = max(1, 480 // n)
    bottom = _panel(full, (n, n), cell_m)

    pad = 16
    w = max(top.shape[1], bottom.shape[1]) + 2 * pad
    h = top.shape[0] + bottom.shape[0] + 3 * pad
    canvas = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    canvas[pad:pad + top.shape[0], pad:pad + top.shape[1]] = top
    y = 2 * pad + top.shape[0]
    canvas[y:y + bottom.shape[0], pad:pad + bottom.shape[1]] = bottom
    path = Path(path)
    Image.fromarray(canvas).save(path, format="PNG")
    return path
