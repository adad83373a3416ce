"""Layouts for block-sparse weights: which (input block, output block) pairs hold a weight block.

A layout is a bool tensor [in_features // block, out_features // block]; layout[i, j] is True when
input block i feeds output block j (OpenAI blocksparse's convention). Every builder is deterministic:
the random ones take a ``seed``. Small-world layouts are square (a graph on the blocks, symmetric);
``average_path_length`` tells how many stacked layers of a square layout connect any block to any other.
"""

from __future__ import annotations

import math

import networkx as nx
import torch


def as_layout(layout: object) -> torch.Tensor:
    """Any 2-D 0/1 array (tensor, numpy array, nested lists) -> bool tensor on the CPU; ValueError if not one."""
    try:
        t = torch.as_tensor(layout).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"layout must be a 2-D 0/1 array [in_blocks, out_blocks], got {type(layout).__name__}") from e
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"layout must be a non-empty 2-D 0/1 array [in_blocks, out_blocks], got {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("layout must hold only 0 and 1")
        t = t != 0
    if not bool(t.any()):
        raise ValueError("layout has no non-zero block: the product would be identically zero")
    return t.contiguous()


def density(layout: object) -> float:
    """Share of the blocks that are non-zero."""
    t = as_layout(layout)
    return t.sum().item() / t.numel()


def average_path_length(layout: object) -> float:
    """Mean number of stacked layers of this square layout that take input block i to output block j (i != j).

    The layout is read as a directed graph (edge i -> j when layout[i, j]; self-loops ignored); ``inf`` when
    some block cannot reach another (an empty row or column, for example).
    """
    t = as_layout(layout)
    if t.shape[0] != t.shape[1]:
        raise ValueError(f"path length needs a square layout (a graph on the blocks), got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        return 0.0
    g = nx.DiGraph()
    g.add_nodes_from(range(t.shape[0]))
    g.add_edges_from((i, j) for i, j in t.nonzero().tolist() if i != j)
    if not nx.is_strongly_connected(g):
        return math.inf
    return float(nx.average_shortest_path_length(g))


def _blocks(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int (a number of blocks), got {n!r}")
    return n


def _fraction(name: str, p: object, low_open: bool) -> float:
    ok = isinstance(p, (int, float)) and not isinstance(p, bool) and (0 < p <= 1 if low_open else 0 <= p <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {p!r}")
    return float(p)


def _from_graph(g: nx.Graph, n: int, self_loops: bool) -> torch.Tensor:
    t = torch.zeros(n, n, dtype=torch.bool)
    edges = torch.tensor(list(g.edges()), dtype=torch.long).reshape(-1, 2)
    t[edges[:, 0], edges[:, 1]] = True
    t[edges[:, 1], edges[:, 0]] = True
    if self_loops:
        t.fill_diagonal_(True)
    return t


def random(in_blocks: int, out_blocks: int, density: float, seed: int = 0) -> torch.Tensor:
    """[in_blocks, out_blocks]: round(density * in_blocks * out_blocks) blocks (at least one) drawn uniformly."""
    _blocks("in_blocks", in_blocks), _blocks("out_blocks", out_blocks)
    total = in_blocks * out_blocks
    k = max(1, round(_fraction("density", density, low_open=True) * total))
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(total, dtype=torch.bool)
    t[torch.randperm(total, generator=g)[:k]] = True
    return t.view(in_blocks, out_blocks)


def small_world_ws(blocks: int, degree: int, rewire_p: float, seed: int = 0, self_loops: bool = True) -> torch.Tensor:
    """[blocks, blocks], symmetric: a Watts-Strogatz graph on the blocks.

    A ring lattice where each block is joined to its ``degree`` nearest blocks (degree // 2 on each side),
    then each edge rewired with probability ``rewire_p`` (0: the ring lattice itself). ``self_loops`` adds
    the diagonal (each block also feeds itself).
    """
    _blocks("blocks", blocks)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2 or degree >= blocks:
        raise ValueError(f"degree must be an even int in [2, blocks), got {degree!r} with blocks={blocks}")
    g = nx.watts_strogatz_graph(blocks, degree, _fraction("rewire_p", rewire_p, low_open=False), seed=seed)
    return _from_graph(g, blocks, self_loops)


def small_world_ba(blocks: int, m: int, seed: int = 0, self_loops: bool = True) -> torch.Tensor:
    """[blocks, blocks], symmetric: a Barabasi-Albert graph (each new block attaches to ``m`` existing ones
    with probability proportional to their degree: a few hubs, short paths). ``self_loops`` adds the diagonal."""
    _blocks("blocks", blocks)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m < blocks:
        raise ValueError(f"m must be an int in [1, blocks), got {m!r} with blocks={blocks}")
    return _from_graph(nx.barabasi_albert_graph(blocks, m, seed=seed), blocks, self_loops)


def banded(in_blocks: int, out_blocks: int, bandwidth: int) -> torch.Tensor:
    """[in_blocks, out_blocks]: output block j reads the input blocks its position covers on the diagonal
    (rows j*in/out .. (j+1)*in/out, rounded outwards) and ``bandwidth`` more on each side. Square: |i - j| <=
    bandwidth (symmetric). Every row and column keeps a block."""
    _blocks("in_blocks", in_blocks), _blocks("out_blocks", out_blocks)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth < 0:
        raise ValueError(f"bandwidth must be a non-negative int, got {bandwidth!r}")
    i = torch.arange(in_blocks)[:, None]
    j = torch.arange(out_blocks)[None, :]
    first = j * in_blocks // out_blocks
    last = ((j + 1) * in_blocks + out_blocks - 1) // out_blocks - 1
    return (i >= first - bandwidth) & (i <= last + bandwidth)


def from_dense(weight: torch.Tensor, block: int, density: float) -> torch.Tensor:
    """[in/block, out/block]: the round(density * blocks) blocks (at least one) of the dense ``weight``
    [in_features, out_features] with the largest Frobenius norm (ties: the earlier block in row-major
    order). For pruning: pass the result and ``weight`` to ``BlockSparseMatMul(...).from_dense``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [in_features, out_features]")
    _blocks("block", block)
    if weight.shape[0] % block or weight.shape[1] % block:
        raise ValueError(f"weight's shape {tuple(weight.shape)} is not a multiple of the block {block}")
    nb_in, nb_out = weight.shape[0] // block, weight.shape[1] // block
    k = max(1, round(_fraction("density", density, low_open=True) * nb_in * nb_out))
    norms = weight.detach().float().reshape(nb_in, block, nb_out, block).square().sum((1, 3)).flatten()
    t = torch.zeros(nb_in * nb_out, dtype=torch.bool)
    t[torch.argsort(norms.cpu(), descending=True, stable=True)[:k]] = True
    return t.view(nb_in, nb_out)
