"""The layout figure is a PNG whose coloured cells are exactly what the query reads."""

import numpy as np
import pytest
from PIL import Image

from kernels import make_layout
from kernels.render import EMPTY, QUERY, render_layout


def test_render_local_and_strided_pair(tmp_path):
    n, width = 64, 8
    local = make_layout("local", n, 16, window=width)
    strided = make_layout("strided", n, 16, stride=width)
    path = render_layout([local, strided], tmp_path / "pair.png", query=60)
    img = np.asarray(Image.open(path))
    assert img.ndim == 3 and img.shape[2] == 3
    # top panel: one cell per position, 8 wide; count coloured (non-empty, non-query) cells
    cell = min(24, 480 // width)  # as render_layout sizes cells
    grid = img[16 + cell // 2: 16 + 8 * cell: cell, 16 + cell // 2: 16 + width * cell: cell]
    coloured = ~(np.all(grid == EMPTY, -1) | np.all(grid == QUERY, -1))
    reads = (local.dense_mask()[60] | strided.dense_mask()[60]).numpy()
    reads[60] = False  # the query cell is drawn in its own colour
    assert coloured.sum() == reads.sum()
    assert np.all(grid[60 // width, 60 % width] == QUERY)


def test_render_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="N <= 1024"):
        render_layout(make_layout("all", 2048, 64), tmp_path / "x.png")
    with pytest.raises(ValueError, match="same seq_len"):
        render_layout([make_layout("all", 32, 16), make_layout("all", 48, 16)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="query must be in"):
        render_layout(make_layout("all", 32, 16), tmp_path / "x.png", query=40)
