"""Block-sparse weight layouts: sizes, densities, symmetry, determinism, small-world path lengths, pruning."""

import math

import networkx as nx
import pytest
import torch

from kernels import (
    average_path_length,
    banded_layout,
    layout_density,
    layout_from_dense,
    random_layout,
    small_world_ba,
    small_world_ws,
)


def test_random_density_and_seed():
    layout = random_layout(40, 30, 0.1, seed=3)
    assert layout.shape == (40, 30) and layout.dtype == torch.bool
    assert layout.sum().item() == 120 and layout_density(layout) == pytest.approx(0.1)
    assert torch.equal(layout, random_layout(40, 30, 0.1, seed=3))
    assert not torch.equal(layout, random_layout(40, 30, 0.1, seed=4))
    assert random_layout(10, 10, 1e-6).sum() == 1  # at least one block
    assert random_layout(4, 5, 1.0).all()


def test_watts_strogatz_is_a_symmetric_small_world():
    ring = small_world_ws(128, 4, 0.0)  # p = 0: the ring lattice itself
    assert torch.equal(ring, ring.t()) and (ring.sum(1) == 5).all()  # 4 neighbours + itself
    i = torch.arange(128)
    assert ring[i, (i + 2) % 128].all() and not ring[i, (i + 3) % 128].any()
    world = small_world_ws(128, 4, 0.2, seed=1)
    assert torch.equal(world, world.t()) and world.diagonal().all()
    assert layout_density(world) == pytest.approx(layout_density(ring))  # rewiring keeps the edge count
    assert torch.equal(world, small_world_ws(128, 4, 0.2, seed=1))
    assert not torch.equal(world, small_world_ws(128, 4, 0.2, seed=2))
    assert average_path_length(world) < average_path_length(ring) / 2
    assert not small_world_ws(16, 2, 0.5, self_loops=False).diagonal().any()


def test_small_worlds_stay_short_when_very_sparse():
    """The original's point: ~2% dense, yet any block reaches any other in under 5 layers."""
    ws = small_world_ws(256, 4, 0.3, seed=0)
    ba = small_world_ba(256, 2, seed=0)
    ring = small_world_ws(256, 4, 0.0)
    for layout in (ws, ba):
        assert layout_density(layout) < 0.025
        assert average_path_length(layout) < 5 < average_path_length(ring)


def test_barabasi_albert_is_symmetric_with_hubs():
    layout = small_world_ba(100, 3, seed=7)
    assert torch.equal(layout, layout.t()) and layout.diagonal().all()
    degree = layout.sum(1) - 1
    assert degree[4:].min() >= 3 and degree.max() > 4 * degree.float().median()  # new blocks join 3; hubs
    assert torch.equal(layout, small_world_ba(100, 3, seed=7))
    edges = (layout.sum() - 100) / 2
    assert edges == 3 * (100 - 3)  # networkx's construction: m edges per new node


def test_banded():
    square = banded_layout(8, 8, 1)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(square, (i - j).abs() <= 1) and torch.equal(square, square.t())
    for shape in ((12, 5), (5, 12), (7, 3)):
        layout = banded_layout(*shape, 0)
        assert layout.any(0).all() and layout.any(1).all()  # every block keeps a neighbour
        assert layout.sum() <= shape[0] + shape[1]


def test_from_dense_keeps_the_largest_blocks():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * 8, 3 * 8, generator=g) * 0.01
    weight[8:16, 0:8] += 5  # block (1, 0): the largest
    weight[24:32, 16:24] -= 3  # block (3, 2): second (sign does not matter)
    weight[0:8, 8:16] += 1  # block (0, 1): third
    layout = layout_from_dense(weight, 8, 3 / 12)
    assert layout.nonzero().tolist() == [[0, 1], [1, 0], [3, 2]]
    assert layout_from_dense(weight, 8, 1 / 12).nonzero().tolist() == [[1, 0]]


def test_path_length_is_the_directed_graph_mean_and_inf_when_cut():
    layout = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)  # a directed 3-cycle
    assert average_path_length(layout) == pytest.approx(1.5)
    assert average_path_length(layout) == nx.average_shortest_path_length(nx.DiGraph([(0, 1), (1, 2), (2, 0)]))
    cut = small_world_ws(8, 2, 0.0)
    cut[3] = False  # block 3 feeds nothing
    assert math.isinf(average_path_length(cut))


def test_bad_layout_arguments():
    calls = [
        (lambda: random_layout(0, 4, 0.5), "in_blocks must be a positive int"),
        (lambda: random_layout(4, 4, 0.0), r"density must be in \(0, 1\]"),
        (lambda: small_world_ws(8, 3, 0.1), "degree must be an even int"),
        (lambda: small_world_ws(8, 8, 0.1), "degree must be an even int"),
        (lambda: small_world_ws(8, 2, 1.5), r"rewire_p must be in \[0, 1\]"),
        (lambda: small_world_ba(8, 8), r"m must be an int in \[1, blocks\)"),
        (lambda: banded_layout(4, 4, -1), "bandwidth must be a non-negative int"),
        (lambda: layout_from_dense(torch.randn(20, 16), 8, 0.5), "not a multiple of the block 8"),
        (lambda: layout_from_dense(torch.randn(16), 8, 0.5), "2-D tensor"),
        (lambda: average_path_length(torch.ones(2, 3)), "square layout"),
        (lambda: layout_density(torch.zeros(3, 3)), "no non-zero block"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
